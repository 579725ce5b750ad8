"""Real local services for tests: moto's S3 server and a local Ray instance, on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
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


@contextmanager
def serving(cmd: list[str], env: dict[str, str], log_path: Path, ready_url: str, timeout: float):
    """Run a server process (its own process group, output to log_path) until the block ends; wait for
    ready_url first. Stops it with SIGTERM, then SIGKILL."""
    import signal

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(ready_url, timeout=timeout, proc=proc)
            yield proc
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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


@contextmanager
def ray_head(tmp_dir: Path, env: dict[str, str], num_cpus: int = 2):
    """`ray start --head --block` on 127.0.0.1 with its own temp dir and ports. Yields the dashboard URL.

    The cluster's processes inherit `env` (S3 endpoint and credentials for the moto server)."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dash = free_port(), free_port()
    venv_bin = str(Path(sys.executable).parent)  # as with an activated venv: jobs' `python` is this one
    full_env = {**os.environ, **env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "RAY_TMPDIR": str(tmp_dir), "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}  # fmt: skip
    cmd = [ray_bin, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--disable-usage-stats", f"--temp-dir={tmp_dir}"]  # fmt: skip
    url = f"http://127.0.0.1:{dash}"
    try:
        with serving(cmd, full_env, tmp_dir / "ray-head.log", f"{url}/api/version", timeout=90):
            yield url
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=full_env, capture_output=True, timeout=60)


def job_env(dashboard: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": dashboard}


def submit_job(dashboard: str, workdir: Path, entrypoint: list[str], wait: bool = True, timeout: float = 900):
    """`ray job submit` as a user runs it. With wait, returns the finished CompletedProcess (logs in stdout)."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "job", "submit", "--address", dashboard, "--working-dir", str(workdir)]
    if not wait:
        cmd.append("--no-wait")
    return subprocess.run([*cmd, "--", *entrypoint], env=job_env(dashboard), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@contextmanager
def mlflow_server(tmp_dir: Path, s3_endpoint: str, bucket: str, port: int | None = None):
    """`mlflow server` with a sqlite backend and artifacts in the (moto) S3 bucket. Yields its URL."""
    port = port or free_port()
    env = {**os.environ, **s3_environment(s3_endpoint), "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{tmp_dir}/mlflow.db", "--artifacts-destination",
           f"s3://{bucket}/mlflow", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with serving(cmd, env, tmp_dir / f"mlflow-{port}.log", f"{url}/health", timeout=120):
        yield url
