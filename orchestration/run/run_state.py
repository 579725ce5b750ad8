"""run.json: what one curriculum run did, in `{storage}/{run_id}/run.json`, written atomically by the job driver.

    {"run_id": ..., "data_uri": ..., "data_sha256": the train split's content (shards.content_sha256),
     "stages": {"1": {"status": "done", "checkpoint": URI, "checkpoint_sha256": its state.pt's, "epochs": ...,
                      "global_step": ..., "metrics": {...}}},
     "judgement": {"metric": ..., "value": ..., "checkpoint_sha256": ..., "data_sha256": ..., "split": ...},
     "registered": {"name": ..., "version": ..., "checkpoint": URI}}

Run ids are checked names (`config.check_name`), so `{storage}/{run_id}` never leaves the storage folder.
"""

from __future__ import annotations

import json

from data import storage
from orchestration.run.config import check_name


def run_root(storage_uri: str, run_id: str, what: str = "--run-id") -> storage.Location:
    return storage.resolve(storage_uri).join(check_name(run_id, what))


class RunState:
    def __init__(self, root: storage.Location):
        self.root = root
        self.loc = root.join("run.json")
        try:
            self.data = json.loads(storage.read_bytes(self.loc))
        except FileNotFoundError:
            self.data = {"stages": {}}

    def done(self, k: int) -> dict | None:
        entry = self.data["stages"].get(str(k))
        return entry if entry and entry.get("status") == "done" else None

    def record(self, k: int, **entry) -> None:
        self.data["stages"][str(k)] = {"status": "done", **entry}
        self._write()

    def update(self, **fields) -> None:
        """Top-level facts of the run (run_id, data_uri, registered)."""
        self.data.update(fields)
        self._write()

    def _write(self) -> None:
        storage.write_bytes_atomic(self.loc, json.dumps(self.data, indent=1).encode())
