"""Performance levers keep results identical and their CPU/GPU selection is explicit."""

import pytest
import torch

from model.step import TrainStep, resolve_compile, resolve_fused_adam
from tests.conftest import tiny_batch, tiny_options
from tests.test_losses import write_fake_vgg19


def params_after_steps(n=2, vgg_weights=None, **kw):
    opt = tiny_options(netG="local", ngf=4, vgg_weights=vgg_weights)
    s = TrainStep(opt, seed=3, **kw)
    for _ in range(n):
        s.step(tiny_batch(opt))
    return s


def test_activation_checkpointing_gives_the_same_training(tmp_path):
    write_fake_vgg19(tmp_path / "vgg.pth")
    vgg = str(tmp_path / "vgg.pth")
    a, b = params_after_steps(vgg_weights=vgg), params_after_steps(vgg_weights=vgg, activation_checkpointing=True)
    recomputed = [type(m).__name__ for m in (*b.G.modules(), b.vgg_loss.vgg) if getattr(m, "checkpoint", False)]
    assert {"ResnetBlock", "LocalEnhancer", "VGG19Features"} <= set(recomputed)
    assert not any(getattr(m, "checkpoint", False) for m in (*a.G.modules(), a.vgg_loss.vgg))
    for (name, p), q in zip(a.G.named_parameters(), b.G.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_networks_train_like_eager_and_keep_their_state_dict_names(tmp_path):
    write_fake_vgg19(tmp_path / "vgg.pth")
    vgg = str(tmp_path / "vgg.pth")
    a, b = params_after_steps(vgg_weights=vgg), params_after_steps(vgg_weights=vgg, compile="eager")
    assert b.compiled == ("eager", None)
    assert b.vgg_loss.vgg._compiled_call_impl is not None and a.vgg_loss.vgg._compiled_call_impl is None
    assert list(a.G.state_dict()) == list(b.G.state_dict())  # compiled in place: no _orig_mod prefix
    for (name, p), q in zip(a.D.named_parameters(), b.D.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_gpu_levers_are_chosen_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cuda) == ("inductor", None) and resolve_compile("auto", cpu) is None
    assert resolve_compile("none", cuda) is None and resolve_compile("eager", cpu) == ("eager", None)
    assert resolve_compile("reduce-overhead", cuda) == ("inductor", "reduce-overhead")  # CUDA graphs
    assert resolve_compile("reduce-overhead", cpu) is None and resolve_compile("max-autotune", cpu) is None
    assert resolve_fused_adam(None, cuda) is True and resolve_fused_adam(None, cpu) is False
    assert resolve_fused_adam(False, cuda) is False


def test_benchmark_rows_parse_and_a_checkpointed_row_runs(capsys):
    from benchmarks.step import Row, main

    assert Row.parse("local-2048:2:bf16:compile:ckpt") == Row("local-2048", 2, "bf16", compile=True, ckpt=True)
    assert Row.parse("global-1024:1:bf16:graphs").label == "bf16:graphs"
    with pytest.raises(SystemExit, match="unknown flags"):
        Row.parse("tiny:1:fp32:turbo")
    main(["--row", "tiny:1:fp32", "--row", "tiny:1:bf16:ckpt", "--steps", "1", "--warmup", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "work per image, tiny step: " in out and "work per image, tiny step with checkpointing: " in out
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny ")]
    assert [r[2] for r in rows] == ["fp32", "bf16:ckpt"] and rows[0][-1] == "1.00"
    assert all(float(r[4]) > 0 for r in rows)  # TFLOP/s
