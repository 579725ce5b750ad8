"""The optimised step computes the same update as the straightforward reference step it is benchmarked against
(D on [fake, real] once, D frozen for G's pass, VGG on the real image without autograd, int8 L1 signs)."""

import pytest
import torch

from benchmarks.reference_step import ReferenceStep
from model.step import TrainStep
from tests.conftest import tiny_batch, tiny_options
from tests.helpers import write_fake_vgg19


@pytest.mark.parametrize(
    "netG,options",
    [
        ("global", {}),
        ("local", {}),
        # the pool hands D an earlier fake with ITS label map (the reference pools the pair)
        ("global", {"pool_size": 2}),
        # batch norm: D normalises the fake and the real batch apart (the reference's separate D calls)
        ("global", {"norm": "batch"}),
    ],
    ids=["global", "local", "image-pool", "batch-norm"],
)
def test_optimised_step_matches_the_reference_step(tmp_path, netG, options):
    write_fake_vgg19(tmp_path / "vgg.pth")
    opt = tiny_options(netG=netG, ngf=4 if netG == "local" else 8, vgg_weights=str(tmp_path / "vgg.pth"), **options)
    ours, ref = TrainStep(opt, seed=5), ReferenceStep(opt, seed=5)
    for k in range(5 if options.get("pool_size") else 3):
        batch = tiny_batch(opt, seed=k)
        a, b = ours.step(batch), ref.step(batch)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=f"step {k} {name}")
    assert b["G_VGG"] > 0 and b["G_GAN_Feat"] > 0
    # Weights, and what the networks compute (the biases of convs followed by instance norm have a zero
    # gradient in exact arithmetic, so Adam turns rounding noise into arbitrary steps there: they cancel out).
    for net in ("G", "D"):
        for (name, p), q in zip(getattr(ours, net).named_parameters(), getattr(ref, net).parameters(), strict=True):
            if name.endswith("weight"):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{net}.{name}")
    x = ours.prepare(tiny_batch(opt, seed=9))
    with torch.no_grad():
        torch.testing.assert_close(ours.G(x.label), ref.G(x.label), rtol=1e-4, atol=1e-5)
        d_in = torch.cat([x.label, x.image], 1)
        for fa, fb in zip(ours.D(d_in), ref.D(d_in), strict=True):
            torch.testing.assert_close(fa[-1], fb[-1], rtol=1e-4, atol=1e-5)


def test_a_differently_weighted_loss_is_caught():
    """The comparison above is sensitive: with feature matching weighted 5 instead of 10, the updates differ."""
    ours, ref = TrainStep(tiny_options(lambda_feat=5.0), seed=5), ReferenceStep(tiny_options(), seed=5)
    batch = tiny_batch(ref.opt)
    ours.step(batch), ref.step(batch)
    diffs = [(p - q).abs().max().item() for p, q in zip(ours.G.parameters(), ref.G.parameters(), strict=True)]
    assert max(diffs) > 1e-4
