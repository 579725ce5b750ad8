import copy

import pytest
import torch

from model.inference import generate
from model.losses import gan_loss
from model.schedule import ImagePool, lr_at
from model.step import LOSS_NAMES, TrainStep, resolve_precision
from tests.conftest import tiny_batch, tiny_options


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_one_step_updates_g_and_d_and_returns_named_losses(opt):
    s = TrainStep(opt)
    g0, d0 = snapshot(s.G), snapshot(s.D)
    losses = s.step(tiny_batch(opt))
    assert set(losses) == set(LOSS_NAMES)
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in losses.values())
    assert losses["G_VGG"] == 0  # no VGG weights given: the loss is off
    weights = {k for k in g0 if k.endswith("weight")}
    assert weights <= changed(g0, s.G)
    assert {k for k in d0 if k.endswith("weight")} <= changed(d0, s.D)


@pytest.mark.parametrize("gan_mode", ["lsgan", "vanilla", "hinge"])
def test_fifty_steps_reduce_reconstruction_l1(gan_mode):
    opt = tiny_options(gan_mode=gan_mode, lr=1e-3)
    batch = tiny_batch(opt, n=4)
    s = TrainStep(opt, seed=1)

    def l1():
        return (generate(s.G, opt, batch["label"], inst=batch["inst"]) - batch["image"]).abs().mean().item()

    before = l1()
    for _ in range(50):
        s.step(batch)
    after = l1()
    assert after < 0.6 * before, (before, after)


def test_d_update_is_the_d_loss_on_the_detached_fake_and_the_real(opt):
    """D's gradient equals that of 1/2 (D_fake + D_real) computed by hand from the same starting weights."""
    batch = tiny_batch(opt)
    s = TrainStep(opt)
    ref = TrainStep(opt)  # same seed: the same initial G and D
    s.step(batch)
    x = ref.prepare(batch)
    with torch.no_grad():
        fake = ref.G(x.label)
    out = ref.D(torch.cat([torch.cat([x.label, fake], 1), torch.cat([x.label, x.image], 1)]))
    n = fake.shape[0]
    fake_part = [[f[:n] for f in o] for o in out]
    real_part = [[f[n:] for f in o] for o in out]
    (0.5 * (gan_loss(fake_part, False, "lsgan") + gan_loss(real_part, True, "lsgan"))).backward()
    for p, q in zip(s.D.parameters(), ref.D.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("keep", [False, True], ids=["reference-new-adam", "keep-adam"])
def test_local_then_all_trains_only_the_enhancer_then_adam_starts_afresh_as_the_reference(keep):
    """niter_fix_global trains the enhancer alone; at its end the reference builds a new Adam (every moment and
    step count starts again); `keep_adam_after_fix_global` keeps the enhancer's instead."""
    opt = tiny_options(netG="local", ngf=4, keep_adam_after_fix_global=keep)
    s = TrainStep(opt)
    batch = tiny_batch(opt)
    s.set_trainable("local")
    g0 = snapshot(s.G)
    s.step(batch)
    s.step(batch)
    moved = changed(g0, s.G)
    assert moved and all(not k.startswith("model.") for k in moved)
    assert any(k.startswith("model1_") for k in moved)
    enh = s.G.enhancer_parameters()
    steps_before = [s.opt_G.state[p]["step"].item() for p in enh]
    exp_avg_before = s.opt_G.state[enh[0]]["exp_avg"].clone()
    assert all(p not in s.opt_G.state for p in s.G.global_parameters())

    s.set_trainable("all")
    g1 = snapshot(s.G)
    s.step(batch)
    assert any(k.startswith("model.") for k in changed(g1, s.G))
    expected = [v + 1 for v in steps_before] if keep else [1] * len(enh)
    assert [s.opt_G.state[p]["step"].item() for p in enh] == expected
    assert not torch.equal(s.opt_G.state[enh[0]]["exp_avg"], exp_avg_before)
    assert all(s.opt_G.state[p]["step"].item() == 1 for p in s.G.global_parameters())


def test_with_two_enhancers_the_fixed_phase_trains_only_the_outermost_one():
    """The reference's niter_fix_global trains the parameters named model{n_local_enhancers}_*: with two
    enhancers, the inner one stays fixed with G1."""
    opt = tiny_options(netG="local", ngf=4, n_local_enhancers=2, n_downsample_global=1)
    s = TrainStep(opt)
    batch = tiny_batch(opt)
    s.set_trainable("local")
    g0 = snapshot(s.G)
    s.step(batch)
    moved = changed(g0, s.G)
    assert moved and all(k.startswith("model2_") for k in moved), sorted(moved)
    s.set_trainable("all")
    g1 = snapshot(s.G)
    s.step(batch)
    assert {k.split(".")[0] for k in changed(g1, s.G)} >= {"model", "model1_1", "model1_2", "model2_1", "model2_2"}


def test_local_trainable_needs_a_local_enhancer(opt):
    with pytest.raises(ValueError, match="netG is 'global'"):
        TrainStep(opt).set_trainable("local")


def test_instance_features_train_the_encoder():
    opt = tiny_options(instance_feat=True)
    s = TrainStep(opt)
    e0 = snapshot(s.E)
    s.step(tiny_batch(opt))
    assert changed(e0, s.E)
    assert s.G.model[1].in_channels == opt.label_nc + 1 + opt.feat_num


def test_vgg_loss_enters_the_step(tmp_path):
    from tests.helpers import write_fake_vgg19

    write_fake_vgg19(tmp_path / "vgg.pth")
    opt = tiny_options(vgg_weights=str(tmp_path / "vgg.pth"))
    losses = TrainStep(opt).step(tiny_batch(opt))
    assert losses["G_VGG"] > 0


def test_l1_term_is_lambda_times_the_mean_absolute_error_and_trains_g():
    batch = tiny_batch(tiny_options())
    off, on = TrainStep(tiny_options(), seed=3), TrainStep(tiny_options(lambda_l1=5.0), seed=3)
    with torch.no_grad():
        fake = on.G(on.generator_input(on.prepare(batch)))
    expected = 5.0 * (fake - batch["image"]).abs().mean()
    a, b = off.step(batch), on.step(batch)
    assert a["G_L1"] == 0  # off by default, as in pix2pixHD
    torch.testing.assert_close(b["G_L1"], expected)
    torch.testing.assert_close(b["G_GAN"], a["G_GAN"])  # same start: only the new term differs
    assert changed(off.G.state_dict(), on.G)  # and it reached G's update


def test_state_dict_round_trip_continues_identically(opt):
    batch = tiny_batch(opt)
    a = TrainStep(opt)
    a.step(batch)
    b = TrainStep(tiny_options(), seed=5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    la, lb = a.step(batch), b.step(batch)
    for k in LOSS_NAMES:
        torch.testing.assert_close(la[k], lb[k])


def test_lr_schedule_constant_then_linear_to_zero():
    assert [lr_at(e, 1.0, 2, 4) for e in range(7)] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_at(10, 1.0, 2, 0) == 1.0
    s = TrainStep(tiny_options(niter=1, niter_decay=2))
    assert s.set_epoch(2) == pytest.approx(1e-4)
    assert all(g["lr"] == pytest.approx(1e-4) for g in s.opt_D.param_groups + s.opt_G.param_groups)


def test_image_pool_mixes_old_fakes_and_is_a_no_op_at_zero():
    x = torch.arange(4.0).reshape(4, 1, 1, 1)
    assert ImagePool(0).query(x) is x
    pool = ImagePool(2, seed=0)
    assert torch.equal(pool.query(x[:2]), x[:2])  # fills
    seen = torch.cat([pool.query(x[2:]) for _ in range(20)]).flatten().tolist()
    assert {0.0, 1.0} & set(seen) and {2.0, 3.0} & set(seen)


def test_precision_selection():
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) is None
    with pytest.raises(ValueError, match="precision='fp16' is not one of"):
        resolve_precision("fp16", torch.device("cpu"))


def test_bf16_autocast_and_channels_last_step_on_cpu(opt):
    s = TrainStep(opt, precision="bf16", channels_last=True)
    losses = s.step(tiny_batch(opt))
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(v.dtype == torch.float32 for v in losses.values())  # losses in fp32
    assert s.G.model[1].weight.is_contiguous(memory_format=torch.channels_last)


def test_generate_restores_training_mode_and_checks_features():
    opt = tiny_options(instance_feat=True)
    s = TrainStep(opt)
    b = tiny_batch(opt)
    with pytest.raises(ValueError, match="pass the instance feature map"):
        generate(s.G, opt, b["label"], inst=b["inst"])
    out = generate(s.G, opt, b["label"], inst=b["inst"], features=torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 3, 32, 32) and not out.requires_grad and s.G.training
