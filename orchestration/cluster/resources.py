"""Can the cluster hold what a stage (or a sweep) asks for, ever and now? Checked in the driver before a stage starts.

Ray answers a request that no node can hold with a pending demand and "the job may hang forever". Here each
request is laid out on the nodes, the way Ray's placement groups would:
- a Train worker asks for `cpus_per_worker` CPUs (and `gpus_per_worker` GPUs) on one node; a stage needs its
  minimum worker count of them at once (`strict_spread`: each on its own node);
- beside them, Ray Data's read and decode tasks need `read_cpus` and `decode_cpus` on some node, or the workers
  wait for data forever; building the dataset runs Ray Data's metadata tasks of 1 CPU (before the workers start);
- Ray Data's budget: it reserves, through its autoscaling coordinator, the *whole* CPUs each node has left once
  the Train workers' CPUs are taken (floor(node CPUs - workers' CPUs) per node). Fractions are lost: two 0.6-CPU
  workers on two 1-CPU nodes leave Ray Data 0 CPUs, and it then runs one task at a time (measured 13x slower
  than with a whole CPU left per node, benchmarks/multihost.py). A layout that leaves it no whole CPU is refused;
- a sweep trial's own driver holds `trial_cpus` while its workers run.
A request that cannot fit the nodes' totals fails at once, naming it and the nodes (`train.check_resources: false`
on clusters that add nodes on demand). One that fits the totals but not what is free now (other jobs, Serve
replicas hold the rest) is said at once, naming what holds the resources, and waits (a line a minute) or fails,
as `train.when_busy` says.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass

from orchestration.cluster.job_log import drop_ray_chatter
from orchestration.run.config import Config, ConfigError
from orchestration.run.stopping import signal_handlers_kept


class ResourcesBusy(ConfigError):
    """The cluster could hold the request, but other work holds what it needs now (train.when_busy: fail)."""


@dataclass
class Node:
    name: str
    cpu: float
    gpu: float = 0.0

    def __str__(self) -> str:
        return f"{self.name} (CPU {self.cpu:g}" + (f", GPU {self.gpu:g})" if self.gpu else ")")


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster and their total resources."""
    import ray

    return [
        Node(_node_name(n), n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def free_nodes() -> list[Node]:
    """The alive nodes and the resources free on each now."""
    import ray
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    return [
        Node(_node_name(n), free.get(n["NodeID"], {}).get("CPU", 0.0), free.get(n["NodeID"], {}).get("GPU", 0.0))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def _node_name(n: dict) -> str:
    return f"{n['NodeManagerAddress']}:{n.get('NodeManagerPort', '')}"


def check(cfg: Config, nodes: list[Node], trial_cpus: float = 0.0, what: str = "the stage") -> None:
    """Raise ConfigError when `cfg`'s workers, Ray Data tasks and (sweeps) trial drivers cannot all be held."""
    if not cfg.train.check_resources:
        return
    problem = _problem(cfg, nodes, trial_cpus, what, budget=True)
    if problem:
        raise ConfigError(problem)


def _problem(cfg: Config, nodes: list[Node], trial_cpus: float, what: str, budget: bool) -> str | None:
    """Why `nodes` (totals, or what is free) cannot hold the request, or None."""
    t, d = cfg.train, cfg.data
    cpu, gpu = t.cpus_per_worker, (t.gpus_per_worker if t.use_gpu else 0.0)
    low = cfg.workers[0]
    listed = ", ".join(map(str, nodes))
    worker = f"{{CPU: {cpu:g}" + (f", GPU: {gpu:g}}}" if gpu else "}")
    free = [[n.cpu, n.gpu] for n in nodes]
    if trial_cpus and _take(free, trial_cpus, 0.0) is None:
        return f"sweep.trial_cpus={trial_cpus:g}: no node has that many CPUs; the cluster: {listed}"
    workers_on = [0.0] * len(nodes)
    placed = 0
    if t.placement == "strict_spread":  # one worker per node
        for i, f in enumerate(free):
            if placed < low and _take([f], cpu, gpu) is not None:
                workers_on[i] += cpu
                placed += 1
    else:
        while placed < low and (i := _take(free, cpu, gpu)) is not None:
            workers_on[i] += cpu
            placed += 1
    if placed < low:
        held = "no" if placed == 0 else f"only {placed}"
        return (
            f"{what} needs {low} Train workers of {worker} at once (train.num_workers, train.cpus_per_worker"
            f"{', train.gpus_per_worker' if gpu else ''}{', placement strict_spread' if t.placement == 'strict_spread' else ''}"
            f"{f', beside a sweep trial of {trial_cpus:g} CPU' if trial_cpus else ''}), but the cluster can hold "
            f"{held}: {listed}" + (". Lower them, or add nodes" if budget else "")
        )
    data_cpus = max(d.read_cpus, d.decode_cpus)
    if not any(f[0] >= data_cpus - 1e-9 for f in free):
        return (
            f"{what}: with its workers placed, no node has {data_cpus:g} CPU left for Ray Data's read/decode tasks "
            f"(data.read_cpus={d.read_cpus:g}, data.decode_cpus={d.decode_cpus:g}), so the workers would wait for "
            f"data forever. Lower train.cpus_per_worker or those, or add a node; the cluster: {listed}"
        )
    whole = sum(math.floor(n.cpu - used + 1e-9) for n, used in zip(nodes, workers_on, strict=True))
    if budget and whole < 1:
        left = ", ".join(f"{n.cpu - used:g}" for n, used in zip(nodes, workers_on, strict=True))
        return (
            f"{what}: its workers ({low} x {worker}) leave the nodes {left} CPU, and Ray Data reserves only whole "
            f"CPUs per node: it would get none and run one read or decode task at a time (the workers then wait "
            f"for data most of each step). {_suggestion(nodes, low, t.placement)}; the cluster: {listed}"
        )
    if not budget and not any(n.cpu >= 1.0 - 1e-9 for n in nodes):
        return f"{what}: building its dataset runs Ray Data's metadata tasks of 1 CPU, and no node has one free"
    if budget and not any(n.cpu >= 1.0 for n in nodes):
        return f"Ray Data's metadata tasks need a node with 1 CPU; the cluster: {listed}"
    if budget and low < cfg.workers[1]:
        return _elastic_problem(cfg, nodes, what)
    return None


def _elastic_problem(cfg: Config, nodes: list[Node], what: str) -> str | None:
    """Shrunk by lost nodes, an elastic stage's Train still reserves its *maximum* workers' CPUs (Ray Train asks the
    autoscaling coordinator for max_workers, to grow back): on the node left, those may leave Ray Data no whole
    CPU, and the smaller stage then waits for data forever (seen: a 2-CPU node, workers of 1 CPU, [1, 2])."""
    t = cfg.train
    cpu, (low, high) = t.cpus_per_worker, cfg.workers
    gpu = t.gpus_per_worker if t.use_gpu else 0.0
    for n in nodes:
        fits = math.floor(n.cpu / cpu + 1e-9) if cpu else high
        if gpu:
            fits = min(fits, math.floor(n.gpu / gpu + 1e-9))
        held = min(high, fits)
        if held >= low and math.floor(n.cpu - held * cpu + 1e-9) < 1:
            most = math.floor((n.cpu - 1) / held * 10) / 10
            fix = f"train.cpus_per_worker <= {most:g}" if most >= 0.1 else "nodes of more CPUs"
            return (
                f"{what} is elastic ({low}-{high} workers): with the other nodes lost, Ray Train still reserves "
                f"{held} workers' CPUs on {n} (it asks for train.num_workers' maximum while smaller, to grow back), "
                f"which leaves Ray Data {n.cpu - held * cpu:g} CPU, no whole one: the stage would wait for data "
                f"forever. Choose {fix} so that a node left alone keeps a whole CPU, or nodes of more CPUs"
            )
    return None


def _suggestion(nodes: list[Node], workers: int, placement: str) -> str:
    """How to leave each node that holds workers a whole CPU."""
    big = [n.cpu for n in nodes if n.cpu >= 2]
    if not big:
        return "Use nodes of at least 2 CPUs (one whole CPU beside the workers), or fewer workers than nodes"
    per_node = workers if placement == "pack" else 1
    cpus = math.floor((min(big) - 1) / per_node * 10) / 10
    return f"Choose train.cpus_per_worker so that each node keeps a whole CPU, e.g. {max(cpus, 0.1):g}"


def _take(free: list[list[float]], cpu: float, gpu: float) -> int | None:
    """Reserve (cpu, gpu) on the fullest node that holds it (packing, as Ray's PACK strategy does); its index."""
    fits = [i for i, f in enumerate(free) if f[0] >= cpu - 1e-9 and f[1] >= gpu - 1e-9]
    if not fits:
        return None
    best = min(fits, key=lambda i: (free[i][0] - cpu, free[i][1] - gpu))
    free[best][0] -= cpu
    free[best][1] -= gpu
    return best


def wait_until_free(
    cfg: Config, what: str, log=print, poll_s: float = 2.0, note_every_s: float = 60.0, grace_s: float = 10.0
) -> None:
    """Return once what is free now holds `what`'s workers, Ray Data's tasks and its dataset's metadata tasks.
    Otherwise, once that has lasted `grace_s` (the previous stage's workers take a few seconds to let go), say so,
    naming what holds the resources; then wait (a line every `note_every_s`) or raise ResourcesBusy, as
    train.when_busy says (train.busy_timeout_s > 0: give up after that long)."""
    if not cfg.train.check_resources:
        return
    t0 = time.monotonic()
    last_note = None
    while True:
        problem = _problem(cfg, free_nodes(), 0.0, what, budget=False)
        if problem is None:
            if last_note is not None:
                log(f"resources: free after {time.monotonic() - t0:.0f}s; {what} starts")
            return
        waited = time.monotonic() - t0
        if waited < grace_s:
            time.sleep(poll_s)
            continue
        timeout = cfg.train.busy_timeout_s
        if cfg.train.when_busy == "fail" or (timeout and waited >= timeout):
            raise ResourcesBusy(
                f"{problem} (now: other work holds them). {holders_line()}. Stop that work (e.g. `serve shutdown`) "
                f"or add nodes, then submit again; train.when_busy=wait waits for them instead"
            )
        if last_note is None or time.monotonic() - last_note >= note_every_s:
            last_note = time.monotonic()
            log(
                f"resources: waiting{f' ({waited:.0f}s so far)' if waited >= 1 else ''}: {problem} (now: other work "
                f"holds them). {holders_line()}. It starts when they are free (train.when_busy=fail: stop instead)"
            )
        time.sleep(poll_s)


def holders_line() -> str:
    """What holds the cluster's CPUs and GPUs now: alive actors with resources, grouped (Serve replicas by
    application and deployment, Train workers, the rest by class), with their node addresses."""
    try:
        from ray.util.state import list_actors, list_jobs

        actors = list_actors(
            filters=[("state", "=", "ALIVE")], detail=True, limit=10_000, raise_on_missing_output=False
        )
        nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in __import__("ray").nodes()}
    except Exception as e:  # noqa: BLE001 - the State API is best effort here; the wait itself does not need it
        return f"(what holds them could not be listed: {type(e).__name__}: {e})"
    submissions = {j.job_id: j.submission_id for j in list_jobs(raise_on_missing_output=False) if j.submission_id}
    groups: dict[str, list] = defaultdict(list)
    for a in actors:
        held = {}
        for key, v in (a.required_resources or {}).items():  # inside a placement group: CPU_group_<id>
            m = re.fullmatch(r"(CPU|GPU)(_group_[0-9a-f]+)?", key)
            if m and v:
                held[m.group(1)] = v
        if not held:
            continue
        name = a.class_name or "?"
        if name.startswith("ServeReplica:"):
            label = f"Serve replicas of {name.split(':', 1)[1].replace(':', ' / ')}"
        elif name == "RayTrainWorker":
            label = f"Ray Train workers of job {submissions.get(a.job_id, a.job_id)}"
        else:
            label = f"{name} actors of job {submissions.get(a.job_id, a.job_id)}"
        groups[label].append((held, nodes.get(a.node_id, a.node_id)))
    if not groups:
        return "Held by: no actor (tasks or placement groups of another job)"
    parts = []
    for label, items in sorted(groups.items()):
        res = ", ".join(f"{k} {v:g}" for k, v in items[0][0].items())
        where = ", ".join(sorted({str(n) for _, n in items}))
        parts.append(f"{label}: {len(items)} x {{{res}}} on {where}")
    return "Held by: " + "; ".join(parts)


# What the job's worker processes (Train workers and controller, Ray Data tasks) get with train.ray_logs: quiet, so
# that the job log holds the project's lines: no stack dump of every worker process that `ray job stop` ends
# ("*** SIGTERM received ... PC: @", Ray's C++ failure-signal handler; crashes still end the job with their error),
# no c10d warning that a peer's address has no DNS name. train.ray_logs: info brings them back (and job_log's lines).
QUIET_WORKER_ENV = {"RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def connect_ray(
    cfg: Config, trial_cpus: float = 0.0, what: str = "the stage", client_env: dict[str, str] | None = None
) -> None:
    """Join the cluster (RAY_ADDRESS, as under `ray job submit`) or start a local Ray; Ray's routine INFO lines
    (Train's worker-group and checkpoint lines, Ray Data's execution and progress lines) stay out of the job log
    unless train.ray_logs is info. Then check the request fits the cluster's nodes. `client_env`: defaults of
    environment variables the job's processes need (e.g. its MLflow clients'), a user's own values kept.

    Environment variables that Ray reads go to this process now (before any thread starts: writing the environment
    while another thread's C code reads it crashes the process) and to the job's processes in its runtime env
    (none secret, none the submitter already set there)."""
    import ray

    if not ray.is_initialized():
        quiet = cfg.train.ray_logs == "quiet"
        env = {k: os.environ.get(k, v) for k, v in (client_env or {}).items()}  # a user's own values stay
        env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.train.worker_start_timeout_s)  # read by fit()
        if quiet:
            env.update(QUIET_WORKER_ENV)
            # this process read the variable when it imported ray: its own handler (the driver's dump on `ray job
            # stop`) follows the constant, which ray.init reads
            ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
            env["RAY_DATA_LOG_LEVEL"] = "WARNING"  # Ray Data configures its loggers from it in each process
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # this process configured them on import
            logging.getLogger("ray.experimental.tqdm_ray").setLevel(logging.ERROR)  # "tqdm is not installed"
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
        env = {k: v for k, v in env.items() if k not in (job_env.get("env_vars") or {})}  # a conflict is an error
        os.environ.update(env)
        with signal_handlers_kept():  # ray.init sets its own SIGTERM handler
            ray.init(
                logging_config=ray.LoggingConfig(log_level="WARNING" if quiet else "INFO"),
                runtime_env={"env_vars": env} if env else None,
            )
        if quiet:
            drop_ray_chatter()
    check(cfg, cluster_nodes(), trial_cpus, what)
