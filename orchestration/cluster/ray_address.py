"""Whether a job joins a Ray cluster, from RAY_ADDRESS as Ray itself reads it.

Unset, empty or `local`: Ray starts an instance of its own for this process, which ends with it (`ray.init`'s
documented meaning of "local"); anything else (`auto`, `ray://…`, `host:port`, what `ray job submit` sets): a
running cluster that outlives the job.
"""

from __future__ import annotations

import os


def cluster_address() -> str | None:
    """RAY_ADDRESS when it names a running cluster, else None (this process's own local Ray)."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return None if address.lower() in ("", "local") else address
