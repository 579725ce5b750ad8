"""The step on DDP-wrapped G and D (2 CPU processes, gloo) equals one process on the combined batch, also with
the networks compiled in place before DDP wraps them (as the Train worker does; `aot_eager` on the CPU)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from model.step import TrainStep
from tests.conftest import tiny_batch, tiny_options

STEPS = 2


def _options():
    return tiny_options(netG="local", ngf=4)


def _train(step: TrainStep, batch, local_steps: int) -> None:
    step.set_trainable("local")
    for i in range(STEPS + local_steps):
        if i == local_steps:
            step.set_trainable("all")
        step.step(batch)


def _worker(rank: int, world: int, port: int, out_dir: str, compile: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    opt = _options()
    full = tiny_batch(opt, n=2)
    mine = {k: v[rank : rank + 1] for k, v in full.items()}
    step = TrainStep(opt, wrap=DDP, compile=compile)
    _train(step, mine, local_steps=1)
    torch.save({"G": step.G.state_dict(), "D": step.D.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("compile", [None, "aot_eager"])
def test_ddp_two_workers_match_one_process_on_the_whole_batch(tmp_path, compile):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path), compile), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = TrainStep(_options())
    _train(single, tiny_batch(_options(), n=2), local_steps=1)
    compared = 0
    for net, module in (("G", single.G), ("D", single.D)):
        for name, ref in module.named_parameters():
            assert torch.equal(r0[net][name], r1[net][name]), f"{net}.{name} differs between ranks"
            if ref.grad.abs().max() < 1e-6:
                # a conv bias right before an instance norm: its true gradient is 0, so Adam turns float noise
                # into +-lr steps that differ between any two summation orders
                continue
            torch.testing.assert_close(r0[net][name], ref.detach(), rtol=1e-4, atol=2e-6, msg=f"{net}.{name}")
            compared += 1
    assert compared > 20
