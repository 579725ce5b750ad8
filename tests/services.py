"""Real local services for tests: moto's S3 server and a local Ray instance, on 127.0.0.1."""

from __future__ import annotations

import os
import select
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Outage:
    """A port on 127.0.0.1 that refuses every connection (a service that is down) until `end()`, after which it
    forwards connections to `target_port`: a service outage that ends at a moment the test chooses, with the
    service itself started beforehand (starting one under load can take a minute)."""

    def __init__(self, target_port: int):
        self.port, self.target = free_port(), target_port
        self._server: socketserver.ThreadingTCPServer | None = None

    def end(self) -> None:
        target = self.target

        class Forward(socketserver.BaseRequestHandler):
            def handle(self):
                with socket.create_connection(("127.0.0.1", target)) as upstream:
                    ends = {self.request: upstream, upstream: self.request}
                    while True:
                        readable, _, _ = select.select(list(ends), [], [], 120)
                        if not readable:
                            return
                        for sock in readable:
                            data = sock.recv(1 << 16)
                            if not data:
                                return
                            ends[sock].sendall(data)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Forward)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_tree(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop a server we started and everything it started, by PID: SIGTERM to the process and its descendants
    (collected first: Ray's workers leave the process group), then SIGKILL what is left. Never by name: other
    Ray instances on the host are not ours."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    proc.wait(10)


@contextmanager
def serving(cmd: list[str], env: dict[str, str], log_path: Path, ready_url: str | None, timeout: float):
    """Run a server process (its own process group, output to log_path) until the block ends; wait for
    ready_url first (when given). Stops it and its descendants by PID."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if ready_url:
                wait_http(ready_url, timeout=timeout, proc=proc)
            yield proc
        finally:
            stop_tree(proc)


@contextmanager
def moto_s3_server(log_dir: Path):
    """moto's S3 server as a separate process (Ray workers and pyarrow's C++ client must reach it over HTTP)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).with_name("moto_server")
    cmd = [str(moto), "-H", "127.0.0.1", "-p", str(port)]
    with serving(cmd, dict(os.environ), log_dir / "moto.log", f"{endpoint}/moto-api/", timeout=30):
        yield endpoint


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)


def s3_environment(endpoint: str) -> dict[str, str]:
    return {**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint}


def apply_env(env: dict[str, str]) -> dict[str, str | None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _ray_env(tmp_dir: Path, env: dict[str, str]) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # as with an activated venv: jobs' `python` is this one
    return {
        **os.environ,
        **env,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_TMPDIR": str(tmp_dir),
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    }


def _start_node(tmp_dir: Path, env: dict[str, str], gcs: str, args: list[str], log_name: str) -> subprocess.Popen:
    """`ray start --block` in a session of its own; its output in tmp_dir/log_name. The node's processes get
    RAY_ADDRESS and RAY_TMPDIR: Ray's own State API calls inside them (Train's placement-group cleaner) otherwise
    look the cluster up by scanning the host, and fail when another Ray instance runs on it."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    tmp_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        ray_bin,
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        f"--temp-dir={tmp_dir}",
        *args,
    ]
    log = open(tmp_dir / log_name, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd,
        env={**_ray_env(tmp_dir, env), "RAY_ADDRESS": gcs},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


class RayCluster:
    """A Ray cluster on 127.0.0.1 as users run one: `ray start --head` and `ray start --address` workers, each
    with its own ports and temp dir. Workers can be stopped and started again (nodes coming and going)."""

    def __init__(self, tmp_dir: Path, env: dict[str, str], head_cpus: float, worker_cpus: list[float]):
        self.tmp_dir, self.env = tmp_dir, env
        self.gcs_port, dash = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.head = _start_node(
            tmp_dir / "head",
            env,
            self.gcs_address,
            [
                "--head",
                f"--num-cpus={head_cpus}",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                "--include-dashboard=true",
            ],
            "ray-head.log",
        )
        wait_http(f"{self.dashboard}/api/version", timeout=90, proc=self.head)
        self.workers: dict[int, subprocess.Popen] = {}
        self.worker_cpus = worker_cpus
        for i in range(len(worker_cpus)):
            self.start_worker(i)
        self.wait_nodes(1 + len(worker_cpus))

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start_worker(self, i: int) -> None:
        self.workers[i] = _start_node(
            self.tmp_dir / f"worker{i}",
            self.env,
            self.gcs_address,
            [
                f"--address={self.gcs_address}",
                f"--num-cpus={self.worker_cpus[i]}",
                f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}",
            ],
            f"ray-worker{i}.log",
        )

    def ray(self, *args: str) -> str:
        """A `ray` CLI command against this cluster; its stdout."""
        cmd = [str(Path(sys.executable).with_name("ray")), *args]
        env = _ray_env(self.tmp_dir, self.env)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=True).stdout

    def worker_node_id(self) -> str:
        """The node id of the (one) alive worker node."""
        import json

        out = self.ray(*f"list nodes --address {self.gcs_address} --format json --filter state=ALIVE".split())
        (node,) = [n for n in json.loads(out) if not n["is_head_node"]]
        return node["node_id"]

    def drain_worker(self, deadline_s: int = 60) -> None:
        """A preemption notice for the worker node, as a cloud's spot reclaim gives through Ray's autoscaler."""
        node = self.worker_node_id()
        self.ray(
            *f"drain-node --address {self.gcs_address} --node-id {node} --reason DRAIN_NODE_REASON_PREEMPTION "
            f"--deadline-remaining-seconds={deadline_s}".split(),
            "--reason-message",
            "spot reclaim (test)",
        )

    def stop_worker(self, i: int) -> None:
        """The node goes away as a preempted machine does: its processes are killed."""
        stop_tree(self.workers.pop(i), grace=0)

    def alive_nodes(self) -> int:
        import json

        with urllib.request.urlopen(f"{self.dashboard}/nodes?view=summary", timeout=10) as r:
            nodes = json.load(r)["data"]["summary"]
        return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not reach {n} alive nodes in {timeout}s")
            time.sleep(0.5)

    def stop(self) -> None:
        for i in list(self.workers):
            stop_tree(self.workers.pop(i), grace=10)
        stop_tree(self.head, grace=10)


@contextmanager
def ray_cluster(tmp_dir: Path, env: dict[str, str], head_cpus: float = 2, worker_cpus: list[float] | None = None):
    cluster = RayCluster(tmp_dir, env, head_cpus, worker_cpus or [])
    try:
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def ray_head(tmp_dir: Path, env: dict[str, str], num_cpus: int = 2):
    """A one-node cluster (`ray start --head`) on 127.0.0.1. Yields the dashboard URL."""
    with ray_cluster(tmp_dir, env, head_cpus=num_cpus) as cluster:
        yield cluster.dashboard


def job_env(dashboard: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": dashboard}


NO_AGENT = "No available agent to submit job"  # the head's job agent not registered yet (a loaded host, a new head)


def submit_job(dashboard: str, workdir: Path, entrypoint: list[str], wait: bool = True, timeout: float = 900):
    """`ray job submit` as a user runs it. With wait, returns the finished CompletedProcess (logs in stdout).
    Refused with NO_AGENT (nothing was started), it is submitted again, for up to a minute."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "job", "submit", "--address", dashboard, "--working-dir", str(workdir)]
    if not wait:
        cmd.append("--no-wait")
    deadline = time.monotonic() + 60
    while True:
        r = subprocess.run(
            [*cmd, "--", *entrypoint], env=job_env(dashboard), capture_output=True, text=True, timeout=timeout
        )
        if r.returncode == 0 or NO_AGENT not in r.stdout + r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(2)


def submit_with_client(client, **kwargs) -> str:
    """JobSubmissionClient.submit_job, submitted again while the head answers NO_AGENT (for up to a minute)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if NO_AGENT not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


@contextmanager
def mlflow_server(tmp_dir: Path, s3_endpoint: str, bucket: str, port: int | None = None):
    """`mlflow server` with a sqlite backend and artifacts in the (moto) S3 bucket. Yields its URL."""
    port = port or free_port()
    env = {
        **os.environ,
        **s3_environment(s3_endpoint),
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    cmd = [
        mlflow_bin,
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_dir}/mlflow.db",
        "--artifacts-destination",
        f"s3://{bucket}/mlflow",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    url = f"http://127.0.0.1:{port}"
    with serving(cmd, env, tmp_dir / f"mlflow-{port}.log", f"{url}/health", timeout=120):
        yield url


def finished_run(
    tmp: Path, run_id: str, stage: int = 3, seed: int = 0, overrides=("model.instance_feat=true",)
) -> Path:
    """A run of configs/tiny.yaml recorded as finished up to `stage` without training (the generator as
    initialised from `seed`), on the dataset at tmp/data (written first when missing: 4 procedural scenes,
    128x64). Its storage is tmp/runs; returns the checkpoint."""
    from orchestration.run.config import load_config
    from orchestration.run.run_state import RunState, run_root
    from tests.helpers import prepared_city, untrained_checkpoint

    if not (tmp / "data").exists():
        prepared_city(tmp, count=4)
    cfg = load_config("configs/tiny.yaml", list(overrides))
    state = RunState(run_root(str(tmp / "runs"), run_id))
    state.update(run_id=run_id, data_uri=str(tmp / "data"), config=cfg.to_dict())
    ckpt = untrained_checkpoint(tmp / "runs" / run_id / f"stage{stage}" / "checkpoint_0", cfg, stage, seed=seed)
    state.record(stage, checkpoint=str(ckpt), epochs=1, global_step=1, metrics={"val_L1": 0.5})
    return ckpt
