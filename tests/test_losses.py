import pytest
import torch

from model.losses import VGGLoss, feature_matching_loss, gan_loss, l1_distance
from model.options import ModelOptions
from model.vgg import VGG19Features
from tests.helpers import write_fake_vgg19


def preds(*last_values, feat=0.0):
    """Discriminator outputs: per scale, one 2x2 feature map and a 1x1x2x2 logit map of a constant."""
    return [[torch.full((1, 1, 2, 2), feat), torch.full((1, 1, 2, 2), v)] for v in last_values]


def test_lsgan_is_mse_to_one_and_zero_summed_over_scales():
    p = preds(0.5, 2.0)
    assert gan_loss(p, True, "lsgan").item() == pytest.approx(0.25 + 1.0)
    assert gan_loss(p, False, "lsgan").item() == pytest.approx(0.25 + 4.0)


def test_vanilla_is_bce_with_logits():
    p = preds(0.0, 1.0)
    sp = torch.nn.functional.softplus
    assert gan_loss(p, True, "vanilla").item() == pytest.approx(
        sp(torch.tensor(0.0)).item() + sp(torch.tensor(-1.0)).item()
    )
    assert gan_loss(p, False, "vanilla").item() == pytest.approx(
        sp(torch.tensor(0.0)).item() + sp(torch.tensor(1.0)).item()
    )


def test_hinge():
    p = preds(0.5, -2.0)
    assert gan_loss(p, True, "hinge").item() == pytest.approx(0.5 + 3.0)
    assert gan_loss(p, False, "hinge").item() == pytest.approx(1.5 + 0.0)
    assert gan_loss(p, True, "hinge", for_discriminator=False).item() == pytest.approx(-0.5 + 2.0)
    with pytest.raises(ValueError, match="unknown|not one of"):
        gan_loss(p, True, "wgan")


def test_feature_matching_weights_and_skips_the_logits():
    fake = [[torch.full((1, 2, 2, 2), 1.0), torch.full((1, 2, 2, 2), 3.0), torch.full((1, 1, 1, 1), 100.0)]] * 2
    real = [[torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 1, 1)]] * 2
    # num_D 2, n_layers_D 3: weight (1/2) * (4/4) * lambda 10 = 5 per term; terms per D: L1 1 and 3 -> 4
    assert feature_matching_loss(fake, real, n_layers_D=3, lambda_feat=10.0).item() == pytest.approx(2 * 5 * 4)


def test_feature_matching_does_not_backprop_into_real_features():
    real_feat = torch.zeros(1, 1, 2, 2, requires_grad=True)
    fake_feat = torch.ones(1, 1, 2, 2, requires_grad=True)
    loss = feature_matching_loss([[fake_feat, torch.zeros(1)]], [[real_feat, torch.zeros(1)]], 3, 1.0)
    loss.backward()
    assert real_feat.grad is None and fake_feat.grad is not None


def test_vgg_loads_torchvision_format_and_weights_the_five_slices(tmp_path):
    path = tmp_path / "vgg19.pth"
    state = write_fake_vgg19(path)
    vgg = VGG19Features.from_file(path)
    torch.testing.assert_close(vgg.features[0].weight, state["features.0.weight"])
    assert all(not p.requires_grad for p in vgg.parameters())
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    fx, fy = vgg(x), vgg(y)
    assert [f.shape[1] for f in fx] == [64, 128, 256, 512, 512]
    assert [f.shape[-1] for f in fx] == [32, 16, 8, 4, 2]
    expected = sum(w * (a - b).abs().mean() for w, a, b in zip([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1], fx, fy, strict=True))
    assert VGGLoss(vgg, lambda_vgg=10.0)(x, y).item() == pytest.approx(10 * expected.item(), rel=1e-5)


def test_vgg_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg_weights: .*missing.pth does not exist"):
        VGG19Features.from_file(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not a torchvision vgg19 state dict: it lacks features.0.bias"):
        VGG19Features.from_file(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth is not a readable torch state dict"):
        VGG19Features.from_file(tmp_path / "junk.pth")


def test_asking_for_vgg_without_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="use_vgg=true needs vgg_weights"):
        ModelOptions(use_vgg=True)
    assert not ModelOptions().vgg_enabled
    assert ModelOptions(vgg_weights="/x.pth").vgg_enabled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l1_distance_is_l1_loss_in_fp32_with_its_gradient(dtype):
    g = torch.Generator().manual_seed(0)
    a0, b = torch.randn(2, 3, 8, 8, generator=g).to(dtype), torch.randn(2, 3, 8, 8, generator=g).to(dtype)
    a0[0, 0, 0, :2] = b[0, 0, 0, :2]  # equal elements: zero gradient, as in F.l1_loss
    a, ref_a = a0.clone().requires_grad_(), a0.float().requires_grad_()
    loss = l1_distance(a, b.requires_grad_())
    ref = torch.nn.functional.l1_loss(ref_a, b.detach().float())
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=1e-6)
    (3 * loss).backward()
    (3 * ref).backward()
    assert a.grad.dtype == dtype and b.grad is None  # b is a target
    torch.testing.assert_close(a.grad.float(), ref_a.grad, rtol=2**-8, atol=0)
    assert a.grad[0, 0, 0, :2].eq(0).all()


def test_vgg_loss_backpropagates_into_the_fake_image_only_and_checkpointing_gives_the_same(tmp_path):
    write_fake_vgg19(tmp_path / "vgg.pth")
    vgg = VGG19Features.from_file(tmp_path / "vgg.pth")
    fake0, real = torch.rand(1, 3, 32, 32) * 2 - 1, (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_()
    grads = []
    for checkpoint in (False, True):
        vgg.checkpoint = checkpoint
        fake = fake0.clone().requires_grad_()
        VGGLoss(vgg, 10.0)(fake, real).backward()
        grads.append(fake.grad)
    assert real.grad is None
    torch.testing.assert_close(grads[0], grads[1])
