"""The numerics benchmark (bf16 / compiled training vs fp32 eager, against a one-ulp noise floor) can fail."""

from dataclasses import replace

import torch

import benchmarks.numerics as numerics
from benchmarks.step import Row, build_step

ARGS = ["--config", "tiny", "--steps", "12", "--skip", "2", "--device", "cpu", "--no-vgg"]


def test_nudge_moves_every_weight_by_one_ulp():
    step = build_step(Row("tiny", 1, "fp32"), torch.device("cpu"), vgg=False)
    before = [p.detach().clone() for p in step.G.parameters()]
    numerics.nudge_weights(step)
    for b, p in zip(before, step.G.parameters(), strict=True):
        assert torch.equal(p, torch.nextafter(b, torch.full_like(b, float("inf"))))


def test_a_recomputing_candidate_passes_and_a_dropped_loss_term_fails(capsys, monkeypatch):
    assert numerics.main([*ARGS, "--mode", "fp32:ckpt"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "D_real" in out and "G_VGG" not in out

    def without_feature_matching(row, device, vgg):
        step = build_step(row, device, vgg)
        if row.ckpt:  # the candidate only
            step.opt = replace(step.opt, lambda_feat=0.0)
        return step

    monkeypatch.setattr(numerics, "build_step", without_feature_matching)
    assert numerics.main([*ARGS, "--mode", "fp32:ckpt"]) == 1
    assert "FAIL" in capsys.readouterr().out
