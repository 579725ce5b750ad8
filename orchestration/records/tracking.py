"""MLflow tracking that never stops training: one parent run per curriculum run id, one nested run per stage.

`Tracker` queues everything (params, metrics, tags, artifacts) and a background thread sends it. While the
tracking server is unreachable the queue is kept and retried with backoff; a warning is printed once per
outage. Runs are found again by tags, so a resumed or resubmitted run logs into the same MLflow runs, and a
server that comes back mid-run receives everything logged meanwhile. An outage costs a bounded delay: each
request gives up after one immediate retry (MLFLOW_HTTP_REQUEST_TIMEOUT, 10 s, each) instead of MLflow's
minutes-long backoff, and once the server is known to be unreachable, `flush` and `close` wait at most
`UNREACHABLE_WAIT_S` for it. What a tracker with an `unsent` file could not send by then is written there
(`{run}/tracking-unsent/*.json`) and `send_unsent` sends it later: the job driver after each stage and at the end,
`jobs.register`, or the next job of that run id.

Tracking URI: `--tracking-uri`, else MLFLOW_TRACKING_URI, else a local sqlite store (registry included) under
outputs/mlflow (the embedded default).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import queue
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from data import storage
from orchestration.cluster.ray_address import cluster_address
from orchestration.run.config import ConfigError

RUN_TAG, STAGE_TAG, SWEEP_TAG = "p2p.run_id", "p2p.stage", "p2p.sweep"
LOCAL_STORE = Path("outputs/mlflow")
UNREACHABLE_WAIT_S = 5.0  # what flush/close wait for a server that is known to be unreachable
UNSENT_DIR = "tracking-unsent"


def filter_value(value: str) -> str:
    """`value` as a string literal in an MLflow search filter. MLflow's filter grammar has no escapes: a value is
    quoted with whichever quote it does not contain."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"{value!r} holds both quote characters and cannot appear in an MLflow search filter")


def resolve_tracking_uri(explicit: str | None = None, ray_job: bool = True) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the embedded sqlite store — except for a job of a Ray
    cluster (`ray_job` and RAY_ADDRESS set, as under `ray job submit`): there the embedded store would live in the
    job's working-directory cache on one node and vanish with it, so that is an error saying what to set."""

    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if ray_job and cluster_address():
        raise ConfigError(
            "no MLflow tracking URI, and this job runs on a Ray cluster (RAY_ADDRESS is set): a local store would be "
            "written into the job's working directory and vanish with it. Give the job one through its runtime env "
            '(ray job submit --runtime-env-json \'{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}\' '
            "...), or pass --tracking-uri URI, or --no-tracking"
        )
    LOCAL_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(LOCAL_STORE / 'mlflow.db').resolve()}"


def local_artifact_location(uri: str) -> str | None:
    """For a sqlite/file store, keep artifacts beside it (not in whatever cwd a Ray worker has)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


MLFLOW_CLIENT_ENV = {
    # one retry, at once (urllib3 waits only before a second): a kept-alive connection that the server closes as a
    # request goes out on it (uvicorn closes idle ones after 5 s, the system metrics' interval) is reset, and that
    # is not an outage; more retries would be MLflow's minutes of backoff, which our queue does better
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # artifacts through the server: with S3 behind it, MLflow 3 servers hand clients presigned URLs of *their* S3
    # endpoint (compose's http://minio:9000), which a machine outside the cluster's network cannot resolve, and a
    # model pulled from a laptop failed to download; proxied, a transfer works wherever the server answers
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
}


def _not_a_retry(record: logging.LogRecord) -> bool:
    """urllib3 warns "Retrying (Retry(...)) after connection broken by ..." before its one retry: routine for a
    kept-alive connection the server closed, and a retry that fails too raises, which our callers report."""
    return not str(record.msg).startswith("Retrying (")


def configure_mlflow_client() -> None:
    """MLflow requests in this process give up after a retry instead of MLflow's minutes-long backoff (our
    callers retry where it helps: the tracking queue, registration, and say so), the retry is not a warning in the
    log, and MLflow does not print a "View run" link each time a run ends (the job log says where tracking goes
    once). Call on the main thread before MLflow's first request: it writes the environment."""
    for key, value in MLFLOW_CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    pool_log = logging.getLogger("urllib3.connectionpool")
    if _not_a_retry not in pool_log.filters:
        pool_log.addFilter(_not_a_retry)


def quiet_client(uri: str):
    """An MlflowClient that fails fast: our queue does the retrying, not MLflow's minutes-long backoff."""
    configure_mlflow_client()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def ensure_experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=local_artifact_location(uri))


class ParentNotYet(Exception):
    """A nested run's parent does not exist yet: its own tracker (the job's driver) creates it."""


def find_run(client, experiment_id: str, tags: dict[str, str], parent: str | None = None):
    query = " and ".join(f"tags.`{k}` = {filter_value(v)}" for k, v in tags.items())
    if parent is None:
        query += f" and tags.`{STAGE_TAG}` = 'parent'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return found[0] if found else None


def find_or_create_run(
    client, experiment_id: str, tags: dict[str, str], run_name: str, parent: str | None = None, reopen: bool = True
) -> str:
    """The run with `tags` (a top-level one when `parent` is None), else a new one. `reopen`: a found run that
    ended is marked RUNNING again (a resumed stage); trackers that only add records to it leave its status."""
    found = find_run(client, experiment_id, tags, parent)
    if found:
        if reopen and found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    all_tags = dict(tags)
    if parent is None:
        all_tags[STAGE_TAG] = "parent"
    else:
        all_tags["mlflow.parentRunId"] = parent
    return client.create_run(experiment_id, tags=all_tags, run_name=run_name).info.run_id


REFUSALS_BEFORE_DROP = 3


def _refused(error: BaseException) -> bool:
    """The server answered the request and refused it (an HTTP error status), as opposed to not answering."""
    from mlflow.exceptions import RestException
    from requests import HTTPError

    return isinstance(error, RestException) or (isinstance(error, HTTPError) and error.response is not None)


_outages: set[str] = set()  # tracking URIs this process knows to be unreachable: one warning per outage
_outages_lock = threading.Lock()


def _outage_starts(uri: str) -> bool:
    with _outages_lock:
        new = uri not in _outages
        _outages.add(uri)
        return new


def _outage_ends(uri: str) -> bool:
    with _outages_lock:
        known = uri in _outages
        _outages.discard(uri)
        return known


class Tracker:
    """Non-blocking MLflow logging into the run identified by `tags` (nested under the parent with `parent_tags`)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        tags: dict[str, str],
        run_name: str,
        *,
        parent_tags: dict[str, str] | None = None,
        log=None,
        unsent: str | None = None,
        create_parent: bool = False,
        reopen: bool = True,
        system_metrics_s: float = 0.0,
    ):
        """`unsent`: a storage URI (a file in `unsent_folder(run)`) where `close` keeps what the server did not
        receive in time, for `send_unsent`; without it those records are lost with the process.

        A nested tracker (`parent_tags`) waits for its parent run to exist: the parent's own tracker creates it,
        and only it, unless `create_parent` (a tracker that replays kept records with no parent tracker beside it).
        Two processes that each searched for the parent and found none would otherwise create two parents, as
        they did when a worker's and the driver's trackers reconnected together after an outage; the stray one
        stayed RUNNING. `reopen`: see `find_or_create_run`. `system_metrics_s`: every so many seconds, MLflow's
        system metrics of this host (CPU, memory, disk, network; GPU with pynvml) go to the run, from the moment
        the run is found until it ends (0: none)."""
        self.uri, self.experiment, self.tags, self.run_name, self.parent_tags = (
            uri,
            experiment,
            tags,
            run_name,
            parent_tags,
        )
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.unsent = unsent
        self.create_parent, self.reopen = create_parent, reopen
        self.system_metrics_s, self._monitor = system_metrics_s, None
        self._abandoned = False  # close gave up and kept the records in `unsent`: the thread sends no more
        # here, not in the sending thread: writing the environment while another thread's C code reads it (pyarrow's
        # S3 client does) crashes the process
        configure_mlflow_client()
        self.run_id: str | None = None
        self._ops: queue.Queue = queue.Queue()
        self._pending: list = []
        self._closing = threading.Event()
        self._wake = threading.Event()  # cuts a retry backoff short (flush, close)
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ---- what callers use (never raises, never blocks on the network) -------------------------
    def params(self, params: dict[str, Any]) -> None:
        self._ops.put(("params", flatten(params)))

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self._ops.put(("metrics", values, step, int(time.time() * 1000)))

    def tags_(self, tags: dict[str, str]) -> None:
        self._ops.put(("tags", {k: str(v) for k, v in tags.items()}))

    def artifact(self, data: bytes, path: str) -> None:
        self._ops.put(("artifact", data, path))

    def image(self, png: bytes, key: str, step: int) -> None:
        """A PNG as an MLflow image of `key` at `step` (the UI's image view and its step slider)."""
        self._ops.put(("image", png, key, step))

    @property
    def unreachable(self) -> bool:
        """The last attempt to reach the server failed (here, or in another tracker of this process)."""
        return self._down_since is not None or self.uri in _outages

    def _wait(self, done, timeout: float) -> bool:
        """Wait until done() or `timeout`; once the server is known to be unreachable, at most UNREACHABLE_WAIT_S."""
        self._wake.set()  # retry now rather than at the end of the backoff
        start = time.monotonic()
        while not done():
            waited = time.monotonic() - start
            if waited >= timeout or (self.unreachable and waited >= UNREACHABLE_WAIT_S):
                return False
            time.sleep(0.05)
        return True

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything queued so far was sent; False if the server stayed unreachable (waiting at most
        UNREACHABLE_WAIT_S once it is known to be down)."""
        sent = threading.Event()
        self._ops.put(("flush", sent))
        return self._wait(sent.is_set, timeout)

    def close(self, status: str = "FINISHED", timeout: float = 60.0, end_children: bool = False) -> bool:
        """Flush and end the run (and, with end_children, every run nested under it that is still RUNNING: the
        stage runs of workers that were stopped with the job); returns False (after a warning) if the server
        stayed unreachable, having written what was not sent to the `unsent` file when there is one."""
        self._ops.put(("end", status, end_children))
        return self._finish(timeout)

    def _finish(self, timeout: float) -> bool:
        self._closing.set()
        if self._wait(lambda: not self._thread.is_alive(), timeout):
            return True
        with self._ops.mutex:
            self._abandoned = bool(self.unsent)  # what is kept in the file is sent from there, not twice
            left = [op for op in [*self._pending, *self._ops.queue] if op[0] != "flush"]
        where = "were not sent"
        if self.unsent and left:
            try:
                record = dict(experiment=self.experiment, tags=self.tags, run_name=self.run_name)
                record.update(parent_tags=self.parent_tags, ops=[_encode(op) for op in left])
                storage.write_bytes_atomic(storage.resolve(self.unsent), json.dumps(record).encode())
                where = f"are kept in {self.unsent} and sent once the server answers"
            except OSError as e:
                where = f"were not sent (keeping them in {self.unsent} failed: {e})"
        self.log(f"mlflow: {self.uri} unreachable; {len(left)} tracking records for run '{self.run_name}' {where}")
        return False

    # ---- the sending thread ---------------------------------------------------------------------
    def _connect(self, client) -> None:
        exp = ensure_experiment(client, self.experiment, self.uri)
        parent = None
        if self.parent_tags is not None:
            if self.create_parent:
                parent = find_or_create_run(client, exp, self.parent_tags, " ".join(self.parent_tags.values()))
            elif (found := find_run(client, exp, self.parent_tags)) is not None:
                parent = found.info.run_id
            else:
                raise ParentNotYet(self.parent_tags)
        self.run_id = find_or_create_run(client, exp, self.tags, self.run_name, parent, reopen=self.reopen)
        if self.system_metrics_s and self._monitor is None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "Started monitoring ...": routine

            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=self.system_metrics_s, resume_logging=True, tracking_uri=self.uri
            )
            self._monitor.start()

    def _send(self, client, op) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op[0]
        if kind == "params":
            items = [Param(k, v) for k, v in op[1].items()]
            existing = client.get_run(self.run_id).data.params
            items = [p for p in items if p.key not in existing]  # params are immutable: a resumed run skips them
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i : i + 100])
        elif kind == "metrics":
            _, values, step, ts = op
            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op[1].items()])
        elif kind == "artifact":
            _, data, path = op
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / Path(path).name
                local.write_bytes(data)
                client.log_artifact(self.run_id, str(local), str(Path(path).parent) if "/" in path else None)
        elif kind == "image":
            _, png, key, step = op
            with Image.open(io.BytesIO(png)) as im:
                client.log_image(self.run_id, im.convert("RGB"), key=key, step=step, synchronous=True)
        elif kind == "flush":
            op[1].set()
        elif kind == "end":
            _, status, end_children = op
            if self._monitor is not None:
                self._monitor.finish()  # its last samples, before the run ends
                self._monitor = None
            if end_children:
                experiment = client.get_run(self.run_id).info.experiment_id
                query = f"tags.`mlflow.parentRunId` = '{self.run_id}' and attributes.status = 'RUNNING'"
                for child in client.search_runs([experiment], query):
                    client.set_terminated(child.info.run_id, status=status)
            client.set_terminated(self.run_id, status=status)

    def _loop(self) -> None:
        """The sender thread: queued records go to the server in order; an outage is waited out (backing off) and
        retried; a record the server keeps refusing is dropped after REFUSALS_BEFORE_DROP tries."""
        client = None
        backoff = 1.0
        self._refusals = 0
        while True:
            self._collect()
            if not self._pending and (self._closing.is_set() or self.run_id is not None):
                if self._closing.is_set():
                    return
                continue
            if self._abandoned:
                return
            try:
                client = client or quiet_client(self.uri)
                if self._send_pending(client):
                    return
                backoff = 1.0
            except ParentNotYet:  # the server answers; the parent's tracker has not created the parent run yet
                if self._down_since is not None and _outage_ends(self.uri):
                    self.log(f"mlflow: {self.uri} reachable again after {time.time() - self._down_since:.0f}s")
                self._down_since = None
                self._wake.wait(1.0)
                self._wake.clear()
            except Exception as e:  # noqa: BLE001 - a server that cannot be reached is retried
                if self._refused_record(e):
                    continue
                self._server_down(e)
                self._wake.wait(backoff)
                self._wake.clear()
                backoff = min(backoff * 2, 10.0)

    def _collect(self) -> None:
        """What was queued since, without waiting when records are already pending."""
        while True:
            try:
                self._pending.append(self._ops.get(timeout=0.2 if not self._pending else 0))
            except queue.Empty:
                return

    def _send_pending(self, client) -> bool:
        """Connect (at once, even with nothing to send: a parent run exists from the start) and send what is
        pending, oldest first. True when the tracker is done (its end sent, or abandoned)."""
        if self.run_id is None:
            self._connect(client)
        while self._pending:
            if self._abandoned:
                return True
            self._send(client, self._pending[0])
            done = self._pending.pop(0)
            self._refusals = 0
            if done[0] == "end":
                return True
        if self._down_since is not None:
            if _outage_ends(self.uri):
                self.log(
                    f"mlflow: {self.uri} reachable again after {time.time() - self._down_since:.0f}s; queued records sent"
                )
            self._down_since = None
        return False

    def _refused_record(self, e: Exception) -> bool:
        """The server answered and refused the first pending record: retried a few times, then dropped, so that one
        bad record (an artifact store that refuses uploads, say) does not hold back everything after it."""
        if not (_refused(e) and self.run_id is not None and self._pending):
            return False
        self._refusals += 1
        if self._refusals >= REFUSALS_BEFORE_DROP:
            dropped = self._pending.pop(0)
            self.log(
                f"mlflow: {self.uri} refused a {dropped[0]} record for run '{self.run_name}' "
                f"{self._refusals} times ({type(e).__name__}: {str(e).splitlines()[0][:200]}); dropped it"
            )
            self._refusals = 0
        return True

    def _server_down(self, e: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.time()
            if _outage_starts(self.uri):
                self.log(
                    f"mlflow: cannot log to {self.uri} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); training continues, records are queued and retried "
                    f"(waiting at most {UNREACHABLE_WAIT_S:.0f}s for the server when a stage ends)"
                )


def _encode(op: tuple) -> list:
    if op[0] in ("artifact", "image"):
        return [op[0], base64.b64encode(op[1]).decode(), *op[2:]]
    return list(op)


def _decode(op: list) -> tuple:
    if op[0] in ("artifact", "image"):
        return (op[0], base64.b64decode(op[1]), *op[2:])
    return tuple(op)


def unsent_folder(run_root: storage.Location) -> storage.Location:
    return run_root.join(UNSENT_DIR)


def unsent_file(run_root: storage.Location) -> str:
    """A new file for one tracker's unsent records, in the run's folder in storage."""
    return unsent_folder(run_root).join(f"{uuid.uuid4().hex}.json").uri


def send_unsent(uri: str, run_root: storage.Location, log=print) -> int:
    """Send the records that trackers of this run could not send before they closed (in `unsent_folder`), oldest
    first; each file is deleted once its records reached the server. Stops at the first file the server does not
    take (waiting at most UNREACHABLE_WAIT_S when it is known to be down). Returns how many files were sent."""
    files = storage.list_files(unsent_folder(run_root))
    files.sort(key=lambda f: f.fs.get_file_info(f.path).mtime or 0)
    sent = 0
    for f in files:
        try:
            record = json.loads(storage.read_bytes(f))
            ops = [_decode(op) for op in record["ops"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log(f"mlflow: {f.uri} holds no readable tracking records ({e}); left in place")
            continue
        tracker = Tracker(
            uri,
            record["experiment"],
            record["tags"],
            record["run_name"],
            parent_tags=record["parent_tags"],
            log=log,
            create_parent=True,  # the parent's tracker may have kept its records too (its file comes last)
            reopen=False,
        )
        tracker.unsent = f.uri  # what still does not go through is written back to the same file
        for op in ops:
            tracker._ops.put(op)
        if not tracker._finish(timeout=60.0):
            break
        storage.delete(f)
        sent += 1
        log(f"mlflow: sent {len(ops)} tracking records for run '{record['run_name']}' kept from an earlier outage")
    return sent


def send_kept_records(parent: Tracker, run_root: storage.Location, log=print) -> None:
    """`send_unsent` for the run of `parent`, when the server answers `parent` now (a job's driver calls it after
    each stage and at its end)."""
    if not parent.unreachable and parent.flush(timeout=30):
        send_unsent(parent.uri, run_root, log)
