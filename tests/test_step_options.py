"""Performance levers keep results identical and their CPU/GPU selection is explicit."""

import re

import pytest
import torch

from model.networks import build_generator
from model.step import TrainStep, compile_kwargs, resolve_compile, resolve_fused_adam
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


def test_compiled_step_trains_like_eager_without_graph_breaks_or_recompiles(tmp_path):
    """`aot_eager` runs what inductor is given (Dynamo's graphs, AOTAutograd's forward/backward split, the
    checkpointed regions, the int8-sign L1) without generating code. A graph break, or a recompilation every
    step, would cost on a GPU what no CPU timing shows."""
    from torch._dynamo.utils import counters

    write_fake_vgg19(tmp_path / "vgg.pth")
    vgg = str(tmp_path / "vgg.pth")
    torch._dynamo.reset()
    counters.clear()
    a = params_after_steps(3, vgg_weights=vgg, activation_checkpointing=True)
    b = params_after_steps(2, vgg_weights=vgg, activation_checkpointing=True, compile="aot_eager")
    graphs = counters["stats"]["unique_graphs"]
    b.step(tiny_batch(b.opt))
    assert b.compiled == ("aot_eager", None)
    assert b.vgg_loss.vgg._compiled_call_impl is not None and a.vgg_loss.vgg._compiled_call_impl is None
    assert not counters["graph_break"], dict(counters["graph_break"])
    # G, D on [fake, real], D frozen on fake, VGG on fake, VGG on real without autograd: one graph each.
    assert b.E is None and graphs == 5 and counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert list(a.G.state_dict()) == list(b.G.state_dict())  # compiled in place: no _orig_mod prefix
    for (name, p), q in zip(a.G.named_parameters(), b.G.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), q in zip(a.D.named_parameters(), b.D.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    b.set_trainable("local")  # stage 2 freezes G1: G is captured once more, then stays
    for _ in range(2):
        b.step(tiny_batch(b.opt))
    assert counters["stats"]["unique_graphs"] == graphs + 1 and not counters["graph_break"]


def test_inductor_fuses_instance_norm_activation_residual_and_padding():
    """The fused norm + ReLU + reflection-pad lever is torch.compile's: after each convolution of G's forward,
    one generated kernel computes the instance-norm statistics, normalises, applies ReLU, adds the residual
    and writes the next convolution's reflection-padded input. Checked on inductor's CPU backend (its fusion
    decisions are made by the same scheduler as on a GPU, where a large reduction may be split in two)."""
    from torch._inductor.utils import run_and_get_code

    opt = tiny_options(netG="global", no_instance=True)
    G = build_generator(opt)
    compiled = torch.compile(G, backend="inductor", dynamic=False)
    x = torch.randn(1, opt.label_nc, 32, 64)

    def train_once():
        compiled(x).mean().backward()

    _, (forward, _backward) = run_and_get_code(train_once)
    kernels = re.findall(r"^\s+(cpp_fused_\w+)\(", forward, re.M)
    norms = sum(isinstance(m, torch.nn.InstanceNorm2d) for m in G.modules())
    pads_after_norm = sum(isinstance(m, torch.nn.ReflectionPad2d) for m in G.modules()) - 1  # not the input's
    assert kernels[0] == "cpp_fused_reflection_pad2d_0" and "tanh" in kernels[-1], kernels
    assert len(kernels) == norms + 2, kernels  # input pad, one kernel per norm, tanh
    fused = [k for k in kernels[1:-1] if "_native_batch_norm_legit" in k and ("relu" in k or "add" in k)]
    assert len(fused) == norms, kernels  # (the residual blocks' second norms: norm + add)
    assert sum("reflection_pad2d" in k for k in kernels[1:-1]) == pads_after_norm, kernels


def test_gpu_levers_are_chosen_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cuda) == ("inductor", None) and resolve_compile("auto", cpu) is None
    assert resolve_compile("none", cuda) is None and resolve_compile("eager", cpu) == ("eager", None)
    assert resolve_compile("reduce-overhead", cuda) == ("inductor", "reduce-overhead")  # CUDA graphs
    assert resolve_compile("reduce-overhead", cpu) is None and resolve_compile("max-autotune", cpu) is None
    assert resolve_fused_adam(None, cuda) is True and resolve_fused_adam(None, cpu) is False
    # with checkpointing, inductor keeps activations in their layout (a mode travels as its options)
    assert compile_kwargs(("inductor", "reduce-overhead"), True) == dict(
        backend="inductor", options={"triton.cudagraphs": True, "layout_optimization": False}, dynamic=False
    )
    assert compile_kwargs(("inductor", None), False) == dict(backend="inductor", mode=None, dynamic=False)
    assert compile_kwargs(("aot_eager", None), True) == dict(backend="aot_eager", mode=None, dynamic=False)
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
