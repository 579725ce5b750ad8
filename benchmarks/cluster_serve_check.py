"""Issue 12/13 on a cluster, as a user runs them: two `ray start` nodes on 127.0.0.1 (1 CPU each), moto's S3
server, `mlflow server` with artifacts in S3, and `ray job submit` of jobs.cluster_features --model (the registered
version's E over a dataset in S3, a new version registered through the server) and of jobs.serve (deployed on the
cluster; the job returns, the application keeps serving), then POST /render to it.

    python -m benchmarks.cluster_serve_check

Not a test (it takes minutes and what it checks overlaps tests/test_editor.py, which runs locally); prints what it
saw and the seconds each step took. Stops only what it started.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city
from serving.maps import encode_ids
from tests.services import (
    apply_env,
    finished_run,
    free_port,
    make_bucket,
    mlflow_server,
    moto_s3_server,
    ray_cluster,
    restore_env,
    s3_environment,
    submit_job,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = "pix2pixhd-synthetic-city"


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="p2p-check-", dir="/tmp"))
    t0 = time.perf_counter()
    with moto_s3_server(tmp) as s3:
        old = apply_env(s3_environment(s3))
        try:
            for bucket in ("data", "tracking"):
                make_bucket(s3, bucket)
            src = write_city(tmp / "src", count=8, height=64, width=128, workers=1)
            prepare(PrepareOptions("flat", str(src), "s3://data/city", workers=1), log=lambda m: None)
            with mlflow_server(tmp, s3, "tracking") as tracking:
                finished_run(tmp, "r1")
                cmd = [sys.executable, "-m", "jobs.register", "--run", "r1", "--storage", str(tmp / "runs")]
                r = subprocess.run([*cmd, "--tracking-uri", tracking], capture_output=True, text=True, timeout=300)
                assert r.returncode == 0, r.stderr[-2000:]
                print(f"[{time.perf_counter() - t0:.0f}s] registered: {r.stdout.strip().splitlines()[-1]}")
                env = {**s3_environment(s3), "MLFLOW_TRACKING_URI": tracking}
                with ray_cluster(
                    Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")), env, head_cpus=1, worker_cpus=[1]
                ) as c:
                    c.wait_nodes(2)
                    print(f"[{time.perf_counter() - t0:.0f}s] two nodes up: {c.dashboard}")
                    job = ["python", "-m", "jobs.cluster_features", "--model", f"models:/{MODEL}@champion"]
                    r = submit_job(c.dashboard, REPO, [*job, "--data", "s3://data/city", "--cpus", "0.5"])
                    lines = [x for x in r.stdout.splitlines() if "cluster_features:" in x or x.startswith("models:/")]
                    print(
                        f"[{time.perf_counter() - t0:.0f}s] cluster_features job exit {r.returncode}:",
                        *lines,
                        sep="\n  ",
                    )
                    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
                    port = free_port()
                    serve = ["python", "-m", "jobs.serve", "--model", f"models:/{MODEL}@champion", "--port", str(port)]
                    r = submit_job(c.dashboard, REPO, [*serve, "--cpus", "0.5", "--reload-s", "5"])
                    print(
                        f"[{time.perf_counter() - t0:.0f}s] serve job exit {r.returncode}: {r.stdout.strip().splitlines()[-1]}"
                    )
                    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
                    label = np.full((64, 128), 7)
                    label[40:56, 20:60] = 26
                    inst = np.where(label == 26, 26001, label)
                    body = json.dumps(
                        {
                            "label": base64.b64encode(encode_ids(label)).decode(),
                            "instances": base64.b64encode(encode_ids(inst)).decode(),
                            "styles": {"26001": 1},
                        }
                    ).encode()
                    req = urllib.request.Request(f"http://127.0.0.1:{port}/render", data=body)
                    with urllib.request.urlopen(req, timeout=120) as answer:
                        png = answer.read()
                        print(
                            f"[{time.perf_counter() - t0:.0f}s] POST /render on the cluster: {answer.status}, "
                            f"{len(png)} bytes PNG, X-Model-Version {answer.headers['X-Model-Version']}, "
                            f"X-Render-Ms {answer.headers['X-Render-Ms']}"
                        )
        finally:
            restore_env(old)
    print(f"done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
