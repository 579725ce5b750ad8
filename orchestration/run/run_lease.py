"""One writer per run: `{storage}/{run_id}/lease.json`, taken by a job's driver before it writes anything of the run.

    {"owner": "ray-head pid 4711", "job": "raysubmit_…", "token": "…", "taken": 1796598506.1, "heartbeat": …}

Taken with a conditional create (S3: If-None-Match, local: O_EXCL), so two jobs that start together cannot both
hold it. The holder rewrites its heartbeat every HEARTBEAT_S seconds and deletes the lease when its job ends (also on
`ray job stop` / Ctrl-C). A lease whose heartbeat is older than STALE_S seconds belongs to a driver that died
without ending (kill -9, a lost node) and is taken over; a fresher one refuses the second job at once, naming the
holder, unless it is run with --take-over (after making sure the holder is dead).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from data import storage
from orchestration.run.config import ConfigError

STALE_S = 120.0
HEARTBEAT_S = 20.0


class RunLeaseHeld(ConfigError):
    """Another live job writes this run."""


class RunLease:
    def __init__(self, root: storage.Location, run_id: str, take_over: bool = False, log=print):
        self.loc, self.run_id, self.take_over, self.log = root.join("lease.json"), run_id, take_over, log
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, taken: float) -> bytes:
        job = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID")
        owner = f"{socket.gethostname()} pid {os.getpid()}"
        return json.dumps(
            {"owner": owner, "job": job, "token": self.token, "taken": taken, "heartbeat": time.time()}
        ).encode()

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.loc))
        except FileNotFoundError:
            return None
        except ValueError:  # being written this instant by its creator: as good as fresh
            return {"owner": "a job starting now", "job": None, "heartbeat": time.time()}

    def acquire(self) -> RunLease:
        self.taken = time.time()
        if not storage.create_exclusive(self.loc, self._record(self.taken)):
            held = self._read()
            if held is not None:
                age = time.time() - float(held.get("heartbeat", 0))
                if age < STALE_S and not self.take_over:
                    job = f" (job {held['job']})" if held.get("job") else ""
                    raise RunLeaseHeld(
                        f"run {self.run_id} is being written by {held.get('owner')}{job}, heartbeat {age:.0f}s ago "
                        f"({self.loc.uri}): one job writes a run at a time. Wait for that job to end or stop it; if it "
                        f"is dead, rerun with --take-over (a lease without a heartbeat for {STALE_S:.0f}s is taken "
                        f"over without it)"
                    )
                why = "--take-over" if age < STALE_S else f"its heartbeat is {age:.0f}s old"
                self.log(f"run {self.run_id}: taking over the lease of {held.get('owner')} ({why})")
            storage.write_bytes_atomic(self.loc, self._record(self.taken))
        self._thread = threading.Thread(target=self._beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                held = self._read()
                if held is not None and held.get("token") not in (None, self.token):
                    self.log(f"run {self.run_id}: another job took over its lease ({held.get('owner')})")
                    return
                storage.write_bytes_atomic(self.loc, self._record(self.taken))
            except storage.StorageError as e:  # storage down a while: the next beat tries again
                self.log(f"run {self.run_id}: lease heartbeat not written ({e})")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self._read()
            if held is not None and held.get("token") == self.token:
                storage.delete(self.loc)
        except storage.StorageError as e:
            self.log(f"run {self.run_id}: lease {self.loc.uri} not removed ({e}); it goes stale in {STALE_S:.0f}s")

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
