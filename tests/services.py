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
def moto_s3_server(log_dir: Path):
    """moto's S3 server as a separate process (Ray workers and pyarrow's C++ client must reach it over HTTP)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_dir / "moto.log", "w")  # noqa: SIM115 - closed below
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"{endpoint}/moto-api/", proc=proc)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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
    log = open(tmp_dir / "ray-head.log", "w")  # noqa: SIM115 - closed below
    cmd = [ray_bin, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--disable-usage-stats", f"--temp-dir={tmp_dir}"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_http(f"{url}/api/version", timeout=90, proc=proc)
        yield url
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([ray_bin, "stop", "--force"], env=full_env, capture_output=True, timeout=60)
        log.close()


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
    log = open(tmp_dir / f"mlflow-{port}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=120, proc=proc)
        yield url
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
