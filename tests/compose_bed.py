"""docker/compose.yaml run as a cluster of hosts (tests/hosts.py): the file itself is what is tested.

Each service (each replica: `ray-worker` with `deploy.replicas: 2` is hosts `ray-worker-1` and `ray-worker-2`)
gets a host of its own name and starts its own `command` with its own `environment`, the variables interpolated
from an env file as `docker compose --env-file` does (`${VAR}`, `${VAR:-default}`, `$$`), in the order and on the
conditions of `depends_on`, restarted as its `restart` policy says. Stand-ins only where an image cannot be had
here (no image registry is reachable):
- the project's image (`pix2pixhd-orchestrator`): this checkout's venv on PATH, the Dockerfile's ENV lines;
- `minio/minio`: moto's S3 server on :9000 (any credentials); `minio/mc` (minio-bucket): the bucket made with boto3;
- `postgres`: Debian's PostgreSQL (`make test` installs it when missing), initialised as the image does from
  POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB (password logins over TCP);
- `nginx`: Debian's nginx (`make test` installs it too) with the image's main configuration: the server blocks the
  service mounts into /etc/nginx/conf.d/ are included in its `http {}`.
Each host has its own temp dir (TMPDIR and RAY_TMPDIR name it: tests/hosts.py mounts it per host). Besides the services: client hosts
(`client`) with nothing but the Ray token, as a user's shell. Tests may add environment per service (e.g. Ray's
health-check period) — the only difference from the file, and stated where it is done.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.hosts import Hosts

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PROJECT_IMAGE = "pix2pixhd-orchestrator"
POSTGRES_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)
NO_AGENT = "No available agent to submit job"  # the head's job agent not registered yet (a loaded host, a new head)
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation of every string in `value`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        set_, val = name in env, env.get(name, "")
        if op in (":-", "-"):
            return val if (val if op == ":-" else set_) else arg
        if op in (":?", "?") and not (val if op == ":?" else set_):
            raise ValueError(f"compose: ${{{name}}} is required: {arg}")
        return val

    return _VAR.sub(one, value)


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip().strip('"')
    return out


def image_env(dockerfile: Path) -> dict[str, str]:
    """The ENV lines of the project's Dockerfile (`ENV K=V [K=V ...]`)."""
    env = {}
    for line in dockerfile.read_text().splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                k, _, v = item.partition("=")
                env[k] = v
    return env


@dataclass
class Service:
    name: str  # the host name (a replica: service-i)
    service: str  # the compose service
    spec: dict
    env: dict[str, str]
    depends_on: dict[str, str] = field(default_factory=dict)  # service -> condition
    proc: subprocess.Popen | None = None
    stopped: bool = False  # stopped on purpose: not restarted
    starts: int = 0
    started_at: float = 0.0
    restart_delay: float = 0.1  # Docker's: doubles on each restart up to a minute, reset after 10 s up

    @property
    def image(self) -> str:
        return self.spec.get("image", "")

    @property
    def restart(self) -> str:
        return self.spec.get("restart", "no")


class ComposeBed:
    """See the module docstring. `up()` starts everything and waits for MLflow and all Ray nodes."""

    def __init__(
        self,
        work: Path,
        env_file_values: dict[str, str],
        compose_file: Path = REPO / "docker" / "compose.yaml",
        extra_env: dict[str, dict[str, str]] | None = None,
        extra_args: dict[str, list[str]] | None = None,
        clients: tuple[str, ...] = ("client",),
        log=print,
    ):
        self.work, self.log = work, log
        self.env_file = {**read_env_file(compose_file.parent / ".env.example"), **env_file_values}
        raw = yaml.safe_load(compose_file.read_text())
        self.compose_dir = compose_file.parent  # volumes' relative paths start there
        self.file = interpolate(raw, self.env_file)
        self.image_env = image_env(REPO / "docker" / "Dockerfile")
        self.services: dict[str, Service] = {}
        for name, spec in self.file["services"].items():
            replicas = (spec.get("deploy") or {}).get("replicas")
            names = [f"{name}-{i}" for i in range(1, replicas + 1)] if replicas else [name]
            env = spec.get("environment") or {}
            if isinstance(env, list):
                env = dict(item.split("=", 1) for item in env)
            deps = spec.get("depends_on") or {}
            if isinstance(deps, list):
                deps = {d: "service_started" for d in deps}
            for host in names:
                extra = (extra_env or {}).get(name, {})
                self.services[host] = Service(
                    host,
                    name,
                    spec,
                    {k: str(v) for k, v in {**env, **extra}.items()},
                    {d: c.get("condition", "service_started") if isinstance(c, dict) else c for d, c in deps.items()},
                )
        self.extra_args = extra_args or {}  # appended to a service's command (benchmarks: a node's CPU count)
        self.clients = clients
        self.hosts = Hosts([*self.services, *clients], work)
        self._watch = threading.Event()
        self._lock = threading.Lock()

    # ---- addresses and commands ----------------------------------------------------------------------------

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def url(self, host: str, port: int) -> str:
        """A service's URL from this process (the root namespace reaches hosts by address)."""
        return f"http://{self.address(host)}:{port}"

    def replicas(self, service: str) -> list[str]:
        return [s.name for s in self.services.values() if s.service == service]

    def host_tmp(self, host: str) -> Path:
        """A host's temp dir, seen from this process (Ray's files of that node are under it)."""
        return self.hosts.private(host)

    def base_env(self, host: str) -> dict[str, str]:
        """What a container of the project's image starts with: its PATH, HOME, locale and own temp dir."""
        tmp = str(self.hosts.tmp)
        path = f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
        return {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": tmp, "RAY_TMPDIR": tmp}

    def client_env(self, host: str = "client", **extra: str) -> dict[str, str]:
        """A user's shell on a client host: the Ray token (when the cluster uses one), no S3 or MLflow secrets."""
        env = {**self.base_env(host), "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
        for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            if self.env_file.get(k):
                env[k] = self.env_file[k]
        return {**env, **extra}

    def run(self, host: str, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900, **kw):
        """`cmd` on a client host (a user's shell there, plus `env`) to its end."""
        return self.hosts.run(host, cmd, {**self.client_env(host), **(env or {})}, timeout=timeout, cwd=REPO, **kw)

    # ---- the user's side: ray job submit, the dashboard's API --------------------------------------------------

    @property
    def dashboard(self) -> str:
        """The Ray dashboard as the client host names it (ray-head's published port)."""
        return "http://ray-head:8265"

    def submit(self, entrypoint: list[str], wait: bool = True, timeout: float = 900, host: str = "client"):
        """`ray job submit --working-dir .` of the checkout from a client host, as a user runs it; with wait, the
        finished CompletedProcess (the job's log in stdout). A head whose job agent has not registered yet answers
        "No available agent to submit job" (nothing started): submitted again, for up to a minute."""
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO)]
        if not wait:
            cmd.append("--no-wait")
        deadline = time.monotonic() + 60
        while True:
            r = self.run(host, [*cmd, "--", *entrypoint], timeout=timeout)
            if r.returncode == 0 or NO_AGENT not in r.stdout + r.stderr or time.monotonic() > deadline:
                return r
            time.sleep(2)

    def api(self, path: str, method: str = "GET", body: bytes | None = None) -> dict:
        """The Ray dashboard's HTTP API (jobs, State API), from this process."""
        import json

        (head,) = self.replicas("ray-head")
        req = urllib.request.Request(
            f"{self.url(head, 8265)}{path}", data=body, method=method, headers=self.auth_headers()
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def job_status(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}")["status"]

    def job_logs(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def stop_job(self, submission_id: str) -> None:
        self.api(f"/api/jobs/{submission_id}/stop", method="POST")

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray's State API (`ray list RESOURCE --detail`), e.g. state("actors", class_name="RayTrainWorker")."""
        from urllib.parse import urlencode

        query = [("detail", "1"), ("limit", "10000")]
        for k, v in filters.items():
            query += [("filter_keys", k), ("filter_predicates", "="), ("filter_values", v)]
        return self.api(f"/api/v0/{resource}?{urlencode(query)}")["data"]["result"]["result"]

    def host_of_node(self) -> dict[str, str]:
        """Ray node id -> test bed host name, for every node the cluster has seen."""
        by_address = {h.address: h.name for h in self.hosts.hosts.values()}
        return {n["node_id"]: by_address.get(n["node_ip"], n["node_ip"]) for n in self.state("nodes")}

    # ---- services ------------------------------------------------------------------------------------------

    def _log(self, host: str) -> Path:
        return self.work / host / "service.log"

    def _start(self, s: Service) -> None:
        s.starts += 1
        s.stopped = False
        s.started_at = time.monotonic()
        (self.work / s.name).mkdir(parents=True, exist_ok=True)
        with open(self._log(s.name), "a") as f:
            f.write(f"---- start {s.starts} at {time.strftime('%H:%M:%S')}\n")
        if s.image.startswith(PROJECT_IMAGE):
            env = {**self.base_env(s.name), **self.image_env, **s.env}
            cmd = s.spec["command"]
            cmd = [*(shlex.split(cmd) if isinstance(cmd, str) else cmd), *self.extra_args.get(s.service, [])]
            s.proc = self.hosts.popen(s.name, cmd, env, self._log(s.name))
        elif s.image.startswith("minio/minio"):
            moto = str(VENV_BIN / "moto_server")
            s.proc = self.hosts.popen(
                s.name, [moto, "-H", "0.0.0.0", "-p", "9000"], self.base_env(s.name), self._log(s.name)
            )
        elif s.image.startswith("minio/mc"):
            s.proc = self.hosts.popen(
                s.name, [sys.executable, "-c", _MAKE_BUCKET], {**self.base_env(s.name), **s.env}, self._log(s.name)
            )
        elif s.image.startswith("postgres"):
            s.proc = self._postgres(s)
        elif s.image.startswith("nginx"):
            s.proc = self._nginx(s)
        else:
            raise ValueError(f"compose service {s.service}: no stand-in for image {s.image!r} on the test bed")

    def _nginx(self, s: Service) -> subprocess.Popen:
        """Debian's nginx in the foreground, its `http {}` including the files the service mounts into conf.d."""
        if shutil.which("nginx", path="/usr/sbin:/usr/bin") is None:
            raise RuntimeError("nginx is not installed: apt-get install nginx-light (make test does, as root)")
        prefix = self.work / s.name / "nginx"
        temps = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # nginx writes request bodies there
        for d in temps:
            (prefix / d).mkdir(parents=True, exist_ok=True)
        included = []
        for volume in s.spec.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if target.startswith("/etc/nginx/conf.d/"):
                included.append(f"    include {(self.compose_dir / source).resolve()};")
        main = prefix / "nginx.conf"
        paths = "\n".join(f"    {d}_temp_path {prefix / d};" for d in temps)
        main.write_text(
            # workers as root: the bed's folders are root's own (the image runs them as its nginx user)
            f"daemon off;\nuser root;\npid {prefix / 'nginx.pid'};\nerror_log stderr info;\nworker_processes 1;\n"
            f"events {{ worker_connections 1024; }}\nhttp {{\n    access_log off;\n{paths}\n"
            + "\n".join(included)
            + "\n}\n"
        )
        cmd = ["/usr/sbin/nginx", "-e", "stderr", "-p", str(prefix), "-c", str(main)]
        return self.hosts.popen(s.name, cmd, self.base_env(s.name), self._log(s.name))

    def _postgres(self, s: Service) -> subprocess.Popen:
        """Debian's PostgreSQL, set up as the postgres image's entrypoint does on an empty volume."""
        if POSTGRES_BIN is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (make test does, as root)")
        data = self.work / s.name / "pgdata"
        user, password = s.env.get("POSTGRES_USER", "postgres"), s.env["POSTGRES_PASSWORD"]
        env = {**self.base_env(s.name), "PGPASSWORD": password}
        if not data.exists():
            # PostgreSQL refuses to run as root; its user must reach the folder (the work dir is 0711)
            data.parent.chmod(0o755)
            data.mkdir()
            shutil.chown(data, "postgres", "postgres")
            pwfile = data.parent / "pwfile"
            pwfile.write_text(password)
            shutil.chown(pwfile, "postgres", "postgres")
            init = [
                str(POSTGRES_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                user,
                f"--pwfile={pwfile}",
                "-A",
                "scram-sha-256",
            ]
            r = subprocess.run(["runuser", "-u", "postgres", "--", *init], capture_output=True, text=True)
            pwfile.unlink()
            if r.returncode:
                raise RuntimeError(f"initdb failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
            with open(data / "pg_hba.conf", "a") as f:
                f.write("host all all 0.0.0.0/0 scram-sha-256\n")
        cmd = [
            str(POSTGRES_BIN / "postgres"),
            "-D",
            str(data),
            "-c",
            "listen_addresses=*",
            "-c",
            f"unix_socket_directories={data}",
            "-p",
            "5432",
        ]
        proc = self.hosts.popen(s.name, cmd, env, self._log(s.name), user="postgres")
        db = s.env.get("POSTGRES_DB", user)
        deadline = time.monotonic() + 60
        while True:
            ready = self.hosts.run(s.name, [str(POSTGRES_BIN / "pg_isready"), "-h", "127.0.0.1", "-U", user], env)
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"postgres did not start: {self._log(s.name).read_text()[-2000:]}")
            time.sleep(0.3)
        exists = self.hosts.run(
            s.name,
            [
                str(POSTGRES_BIN / "psql"),
                "-h",
                "127.0.0.1",
                "-U",
                user,
                "-d",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname='{db}'",
            ],
            env,
        )
        if exists.stdout.strip() != "1":
            made = self.hosts.run(s.name, [str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-U", user, db], env)
            if made.returncode:
                raise RuntimeError(f"createdb {db}: {made.stderr}")
        return proc

    def _healthy(self, s: Service) -> bool:
        if s.proc is None or s.proc.poll() is not None:
            return False
        if s.image.startswith("minio/minio"):
            return _answers(f"{self.url(s.name, 9000)}/moto-api/")
        return True  # postgres: _postgres returns once pg_isready answers and the database exists

    def _ready_for(self, s: Service) -> bool:
        for dep, condition in s.depends_on.items():
            for d in (self.services[h] for h in self.replicas(dep)):
                if d.proc is None:
                    return False
                if condition == "service_healthy" and not self._healthy(d):
                    return False
                if condition == "service_completed_successfully" and d.proc.poll() != 0:
                    if d.proc.poll() not in (None, 0):
                        raise RuntimeError(
                            f"{d.name} exited with {d.proc.poll()}: {self._log(d.name).read_text()[-2000:]}"
                        )
                    return False
        return True

    def up(self, timeout: float = 240) -> ComposeBed:
        self.hosts.up()
        self.log(f"test bed: hosts {', '.join(f'{h.name} {h.address}' for h in self.hosts.hosts.values())}")
        pending = list(self.services.values())
        deadline = time.monotonic() + timeout
        while pending:
            for s in [s for s in pending if self._ready_for(s)]:
                self._start(s)
                pending.remove(s)
            if time.monotonic() > deadline:
                raise TimeoutError(f"test bed: {[s.name for s in pending]} never had their depends_on met")
            time.sleep(0.2)
        threading.Thread(target=self._supervise, name="compose-restart", daemon=True).start()
        self.wait_mlflow()
        self.wait_ray_nodes(len(self.replicas("ray-head")) + len(self.replicas("ray-worker")))
        return self

    def _supervise(self) -> None:
        """Restart policies: a service that exits (not stopped on purpose) starts again (`restart: always` /
        `unless-stopped`, or `on-failure` for a non-zero exit), as Docker does."""
        exited: dict[str, float] = {}
        while not self._watch.wait(0.1):
            with self._lock:
                for s in self.services.values():
                    if s.proc is None or s.stopped or s.proc.poll() is None:
                        continue
                    code = s.proc.poll()
                    if not (s.restart in ("always", "unless-stopped") or (s.restart.startswith("on-failure") and code)):
                        continue
                    now = time.monotonic()
                    if s.name not in exited:
                        exited[s.name] = now
                        up = now - s.started_at
                        s.restart_delay = 0.1 if up > 10 else min(60.0, s.restart_delay * 2)
                    if now - exited[s.name] >= s.restart_delay:
                        del exited[s.name]
                        self.log(f"test bed: {s.name} exited with {code}; restarting it ({s.restart})")
                        self._start(s)

    def stop(self, host: str) -> None:
        """`docker compose stop` of one container: SIGTERM, then SIGKILL after 10 s; not restarted."""
        with self._lock:
            s = self.services[host]
            s.stopped = True
        self.hosts.kill_all(host, sig=15)
        deadline = time.monotonic() + 10
        while self.hosts.pids(host) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.hosts.kill_all(host)
        if s.proc is not None:
            s.proc.wait(10)

    def start(self, host: str) -> None:
        with self._lock:
            self._start(self.services[host])

    def cut(self, host: str) -> None:
        self.hosts.cut(host)

    def restore(self, host: str) -> None:
        self.hosts.restore(host)

    def wait_mlflow(self, timeout: float = 180) -> None:
        (mlflow,) = self.replicas("mlflow")
        self._wait_http(f"{self.url(mlflow, 5000)}/health", timeout, mlflow)

    def _wait_http(self, url: str, timeout: float, host: str) -> None:
        deadline = time.monotonic() + timeout
        while not _answers(url, self.auth_headers()):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{url} did not answer in {timeout}s; {host}'s log:\n{self._log(host).read_text()[-3000:]}"
                )
            time.sleep(0.5)

    def ray_nodes(self) -> list[dict]:
        """Ray's alive nodes, with the test bed's host name of each ("host")."""
        import json

        (head,) = self.replicas("ray-head")
        self._wait_http(f"{self.url(head, 8265)}/api/version", 120, head)
        by_address = {h.address: h.name for h in self.hosts.hosts.values()}
        req = urllib.request.Request(f"{self.url(head, 8265)}/nodes?view=summary", headers=self.auth_headers())
        with urllib.request.urlopen(req, timeout=10) as r:
            nodes = json.load(r)["data"]["summary"]
        alive = [n["raylet"] for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"]
        return [{**n, "host": by_address.get(n.get("nodeManagerAddress"), "?")} for n in alive]

    def auth_headers(self) -> dict[str, str]:
        token = self.env_file.get("RAY_AUTH_TOKEN") if self.env_file.get("RAY_AUTH_MODE") == "token" else None
        return {"Authorization": f"Bearer {token}"} if token else {}

    def wait_ray_nodes(self, n: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ray_nodes()) != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray cluster did not reach {n} alive nodes in {timeout}s")
            time.sleep(0.5)

    def logs(self, host: str) -> str:
        return self._log(host).read_text()

    def down(self) -> None:
        self._watch.set()
        with self._lock:
            for s in self.services.values():
                s.stopped = True
        self.hosts.down()


def _answers(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2):
            return True
    except OSError:
        return False


# minio/mc's `mc mb -p local/$BUCKET`, with boto3: the bucket, made once MinIO answers
_MAKE_BUCKET = """
import os, boto3
s3 = boto3.client("s3", endpoint_url="http://minio:9000", region_name="us-east-1",
                  aws_access_key_id=os.environ["MINIO_ROOT_USER"], aws_secret_access_key=os.environ["MINIO_ROOT_PASSWORD"])
names = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
if os.environ["BUCKET"] not in names:
    s3.create_bucket(Bucket=os.environ["BUCKET"])
print("bucket", os.environ["BUCKET"], "ready")
"""
