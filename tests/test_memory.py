"""The CPU memory estimate counts tensor storages exactly and extrapolates to full size."""

from functools import partial

import pytest
import torch

from benchmarks.memory import estimate
from benchmarks.reference_step import ReferenceStep
from benchmarks.step import Row
from model.memory import StorageTracker, extrapolate_peak, measure_step
from model.step import TrainStep
from tests.conftest import tiny_batch, tiny_options
from tests.helpers import prepared_city, write_fake_vgg19


def test_tracker_counts_live_storages_once_and_frees_them():
    held = torch.zeros(256)  # 1 KiB held from the start
    with StorageTracker([held, held.view(16, 16)]) as t:
        a = torch.empty(1000)  # 4000 B
        view = a[:10].view(2, 5)  # same storage: not counted again
        b = torch.empty(500, dtype=torch.float64)  # 4000 B
        del a, view
        c = torch.ones(10, dtype=torch.int8)
    assert t.start == 1024
    assert t.peak == 1024 + 4000 + 4000
    assert t.live == 1024 + 4000 + 10
    assert b.numel() + c.numel() == 510


def run_tiny_step(opt, step_class=TrainStep, **kw):
    return partial(measure_step, partial(step_class, opt, **kw), partial(tiny_batch, opt, 1))


@pytest.mark.parametrize("kw", [{}, {"precision": "bf16", "activation_checkpointing": True}])
def test_extrapolated_peak_matches_a_run_at_that_size(tmp_path, kw):
    write_fake_vgg19(tmp_path / "vgg.pth")
    opt = tiny_options(netG="local", ngf=4, vgg_weights=str(tmp_path / "vgg.pth"))
    run = run_tiny_step(opt, **kw)
    predicted = extrapolate_peak(run, ((32, 64), (64, 128)), (128, 256))
    measured = run(128, 256)
    assert predicted.peak_bytes == pytest.approx(measured.peak, rel=0.02)
    assert predicted.static_bytes < predicted.peak_bytes


def test_extrapolation_refuses_a_step_whose_ops_depend_on_size():
    def run(h, w):
        with StorageTracker() as t:
            for _ in range(h // 8):
                torch.empty(h * w)
        return t

    with pytest.raises(RuntimeError, match="op sequence depends on the size"):
        extrapolate_peak(run, ((8, 8), (16, 16)), (64, 64))


def test_memory_levers_lower_the_estimate_at_full_size(tmp_path):
    """At a size where activations dominate: bf16 < fp32 < the reference step, and checkpointing lowers bf16."""
    write_fake_vgg19(tmp_path / "vgg.pth")
    opt = tiny_options(netG="local", ngf=4, vgg_weights=str(tmp_path / "vgg.pth"))
    sizes, target = ((32, 64), (64, 128)), (512, 1024)
    fp32, bf16, ckpt = (
        extrapolate_peak(run_tiny_step(opt, **kw), sizes, target)
        for kw in ({}, {"precision": "bf16"}, {"precision": "bf16", "activation_checkpointing": True})
    )
    ref = extrapolate_peak(run_tiny_step(opt, step_class=ReferenceStep), sizes, target)
    assert ckpt.peak_bytes < 0.8 * bf16.peak_bytes < 0.8 * 0.8 * fp32.peak_bytes
    assert fp32.peak_bytes < ref.peak_bytes
    assert fp32.static_bytes == ref.static_bytes  # same networks and optimizers


def test_benchmark_rows_estimate():
    assert estimate(Row.parse("tiny:1:bf16:ckpt"), vgg=False).peak_bytes > 0


def test_train_job_estimates_each_stage_and_says_whether_it_fits(tmp_path, capsys):
    from jobs.train import main

    data = prepared_city(tmp_path, count=2)
    args = ["--config", "configs/tiny.yaml", "--data", data, "--storage", str(tmp_path / "runs")]

    assert main([*args, "--estimate-memory", "80"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"] and all(r[-1] == "yes" for r in rows)
    assert all(float(r[-2]) > 0 for r in rows)
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written

    assert main([*args, "--estimate-memory", "1.001", "--stages", "2"]) == 1
    out = capsys.readouterr().out
    assert "NO" in out and "train.activation_checkpointing=true" in out and "eager step's figures" not in out

    # checkpointing with torch.compile on the GPU (compile: auto): the figures are the eager step's, and it says so
    ckpt = [*args, "--stages", "1", "--set", "train.activation_checkpointing=true", "--estimate-memory", "80"]
    assert main(ckpt) == 0
    assert "eager step's figures" in capsys.readouterr().out
    assert main([*ckpt, "--set", "train.compile=none"]) == 0
    assert "eager step's figures" not in capsys.readouterr().out
