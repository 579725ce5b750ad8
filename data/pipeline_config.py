"""How a split streams into training batches (geometry, instance output, batch, shuffling, Ray Data's CPUs, the
shard check): plain data, importable without Ray (orchestration/run builds it from a Config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from data.transforms import Geometry

INSTANCE_OUTPUTS = ("ids", "edges", "none")


@dataclass(frozen=True)
class PipelineConfig:
    geometry: Geometry = field(default_factory=Geometry)
    instance_output: str = "edges"  # what the model needs: ids (instance_feat), edges, or none (no_instance)
    batch_size: int = 1
    seed: int = 0
    shuffle_buffer: int = 16  # samples per worker in the seeded local shuffle buffer; 0 = off
    read_cpus: float = 0.25  # CPUs per Ray Data read task
    decode_cpus: float = 0.5  # CPUs per decode task
    decode_batch: int = 4  # samples per decode task call
    prefetch_batches: int = 2  # batches each worker prepares ahead of the training step
    verify: str = "sha256"  # shard check before streaming: sha256, size, or none

    def __post_init__(self) -> None:
        if self.instance_output not in INSTANCE_OUTPUTS:
            raise ValueError(f"instance_output={self.instance_output!r} is not one of {', '.join(INSTANCE_OUTPUTS)}")
        if self.verify not in ("sha256", "size", "none"):
            raise ValueError(f"verify={self.verify!r} is not one of sha256, size, none")
