"""The editor's render API under load: POST /render at 512x256 from 1, 4 and 16 concurrent clients.

    python -m benchmarks.serve_load [--model models:/pix2pixhd-synthetic-city@champion] [--tracking-uri URI]
        [--requests 48] [--clients 1 4 16] [--replicas 1] [--max-batch 4] [--cpus 1]

Starts `python -m jobs.serve` on 127.0.0.1 (its own local Ray), sends the same street map (a car on a road,
random seeds) from each number of clients in turn, and prints requests/s, p50 and p95 latency, and the ratio of
each row's throughput to one client's (the machine-independent figure). Stops the server it started.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from serving.maps import encode_ids
from tests.services import free_port, serving


def street(h: int = 256, w: int = 512) -> tuple[np.ndarray, np.ndarray]:
    label = np.full((h, w), 23)
    label[h // 2 :] = 7
    label[h // 2 + 16 : h // 2 + 80, w // 4 : w // 4 + 128] = 26
    inst = np.where(label == 26, 26001, label)
    return label, inst


def post(url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
    return time.perf_counter() - t0


def load(url: str, clients: int, requests: int) -> dict:
    label, inst = street()
    bodies = [
        json.dumps(
            {
                "label": base64.b64encode(encode_ids(label)).decode(),
                "instances": base64.b64encode(encode_ids(inst)).decode(),
                "seed": i,
            }
        ).encode()
        for i in range(requests)
    ]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda b: post(f"{url}/render", b), bodies))
    took = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"clients": clients, "rps": requests / took, "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models:/pix2pixhd-synthetic-city@champion")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else the local store (make demo's)")
    p.add_argument("--requests", type=int, default=48, help="requests per row")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--cpus", type=float, default=1.0, help="per Generator replica")
    a = p.parse_args(argv)
    from orchestration.records.tracking import resolve_tracking_uri

    tracking = resolve_tracking_uri(a.tracking_uri, ray_job=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
        cmd = [sys.executable, "-m", "jobs.serve", "--model", a.model, "--tracking-uri", tracking, "--port", str(port)]
        cmd += ["--replicas", str(a.replicas), "--max-batch", str(a.max_batch), "--cpus", str(a.cpus)]
        with serving(cmd, env, Path(tmp) / "serve.log", f"{url}/classes", timeout=240):
            model = json.loads(urllib.request.urlopen(f"{url}/classes").read())["model"]
            load(url, 2, 4)  # warm-up: first requests build the batch path and the thumbnails' caches
            rows = [load(url, c, a.requests) for c in a.clients]
    print(
        f"{model}, 512x256, {a.requests} requests per row, {a.replicas} replica(s) x {a.cpus} CPU, batch {a.max_batch}"
    )
    print("| clients | requests/s | p50 ms | p95 ms | throughput / 1 client |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['rps'] / rows[0]['rps']:.2f} |"
        )


if __name__ == "__main__":
    main()
