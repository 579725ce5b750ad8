"""Can the cluster ever hold what a stage (or a sweep) asks for? Checked in the driver before anything starts.

Ray answers a request that no node can hold with a pending demand and "the job may hang forever". Here each
request is laid out on the nodes that are up now, the way Ray's placement groups would:
- a Train worker asks for `cpus_per_worker` CPUs (and `gpus_per_worker` GPUs) on one node; a stage needs its
  minimum worker count of them at once (`strict_spread`: each on its own node);
- beside them, Ray Data's read and decode tasks need `read_cpus` and `decode_cpus` on some node, or the workers
  wait for data forever; building the dataset runs Ray Data's metadata tasks of 1 CPU (before the workers start);
- a sweep trial's own driver holds `trial_cpus` while its workers run.
A request that cannot fit fails at once, naming it and the cluster's nodes. Clusters that add nodes on demand
(an autoscaler) can turn the check off with `train.check_resources: false`.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestration.config import Config, ConfigError


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
        Node(
            f"{n['NodeManagerAddress']}:{n.get('NodeManagerPort', '')}",
            n["Resources"].get("CPU", 0.0),
            n["Resources"].get("GPU", 0.0),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


def check(cfg: Config, nodes: list[Node], trial_cpus: float = 0.0, what: str = "the stage") -> None:
    """Raise ConfigError when `cfg`'s workers, Ray Data tasks and (sweeps) trial drivers cannot all be held."""
    if not cfg.train.check_resources:
        return
    t, d = cfg.train, cfg.data
    cpu, gpu = t.cpus_per_worker, (t.gpus_per_worker if t.use_gpu else 0.0)
    low = cfg.workers[0]
    listed = ", ".join(map(str, nodes))
    worker = f"{{CPU: {cpu:g}" + (f", GPU: {gpu:g}}}" if gpu else "}")
    free = [[n.cpu, n.gpu] for n in nodes]
    if trial_cpus and not _take(free, trial_cpus, 0.0):
        raise ConfigError(f"sweep.trial_cpus={trial_cpus:g}: no node has that many CPUs; the cluster: {listed}")
    placed = 0
    if t.placement == "strict_spread":  # one worker per node
        for f in free:
            if placed < low and _take([f], cpu, gpu):
                placed += 1
    else:
        while placed < low and _take(free, cpu, gpu):
            placed += 1
    if placed < low:
        held = "no" if placed == 0 else f"only {placed}"
        raise ConfigError(
            f"{what} needs {low} Train workers of {worker} at once (train.num_workers, train.cpus_per_worker"
            f"{', train.gpus_per_worker' if gpu else ''}{', placement strict_spread' if t.placement == 'strict_spread' else ''}"
            f"{f', beside a sweep trial of {trial_cpus:g} CPU' if trial_cpus else ''}), but the cluster can hold "
            f"{held}: {listed}. Lower them, or add nodes"
        )
    data_cpus = max(d.read_cpus, d.decode_cpus)
    if not any(f[0] >= data_cpus - 1e-9 for f in free):
        raise ConfigError(
            f"{what}: with its workers placed, no node has {data_cpus:g} CPU left for Ray Data's read/decode tasks "
            f"(data.read_cpus={d.read_cpus:g}, data.decode_cpus={d.decode_cpus:g}), so the workers would wait for "
            f"data forever. Lower train.cpus_per_worker or those, or add a node; the cluster: {listed}"
        )
    if not any(n.cpu >= 1.0 for n in nodes):
        raise ConfigError(f"Ray Data's metadata tasks need a node with 1 CPU; the cluster: {listed}")


def _take(free: list[list[float]], cpu: float, gpu: float) -> bool:
    """Reserve (cpu, gpu) on the fullest node that holds it (packing, as Ray's PACK strategy does)."""
    fits = [f for f in free if f[0] >= cpu - 1e-9 and f[1] >= gpu - 1e-9]
    if not fits:
        return False
    best = min(fits, key=lambda f: (f[0] - cpu, f[1] - gpu))
    best[0] -= cpu
    best[1] -= gpu
    return True
