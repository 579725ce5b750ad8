import pytest
import torch

from model.networks import (
    Encoder,
    GlobalGenerator,
    LocalEnhancer,
    MultiscaleDiscriminator,
    build_generator,
    instance_edges,
    instance_mean,
    load_global_into_local,
    norm_layer,
)
from tests.conftest import tiny_options


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "make, count",
    [
        (lambda: GlobalGenerator(36, 3, ngf=64, n_downsampling=4, n_blocks=9), 182_546_755),
        (lambda: LocalEnhancer(36, 3, ngf=32, n_local_enhancers=1, n_blocks_global=9, n_blocks_local=3), 182_857_059),
        (lambda: MultiscaleDiscriminator(39, ndf=64, n_layers=3, num_D=2), 5_603_202),
        (lambda: MultiscaleDiscriminator(39, ndf=64, n_layers=3, num_D=3), 8_404_803),
        (lambda: Encoder(3, 3, nef=16, n_downsampling=4), 788_803),
    ],
    ids=["G1", "G2", "D2", "D3", "E"],
)
def test_parameter_counts_match_the_paper_networks(make, count):
    assert n_params(make()) == count


def test_full_resolution_discriminator_feature_shapes():
    d = MultiscaleDiscriminator(39, ndf=64, n_layers=3, num_D=2)
    with torch.no_grad():
        out = d(torch.zeros(1, 39, 256, 512))
    assert len(out) == 2
    assert [tuple(t.shape[1:]) for t in out[0]] == [
        (64, 129, 257),
        (128, 65, 129),
        (256, 33, 65),
        (512, 34, 66),
        (1, 35, 67),
    ]
    # the second scale sees the input pooled once
    assert tuple(out[1][0].shape[2:]) == (65, 129)


def test_generators_keep_the_input_size_and_range():
    g1 = GlobalGenerator(5, 3, ngf=4, n_downsampling=2, n_blocks=1)
    g2 = LocalEnhancer(5, 3, ngf=4, n_downsample_global=2, n_blocks_global=1, n_local_enhancers=2, n_blocks_local=1)
    x = torch.randn(2, 5, 32, 48)
    for g in (g1, g2):
        y = g(x)
        assert y.shape == (2, 3, 32, 48)
        assert y.abs().max() <= 1.0


def test_init_statistics():
    g = GlobalGenerator(36, 3, ngf=64, n_downsampling=4, n_blocks=1)
    w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.mean().item()) < 1e-3
    assert abs(w.std().item() - 0.02) < 1e-3
    # conv biases keep PyTorch's default, as the reference leaves them: uniform in +-1/sqrt(fan_in), not zeroed
    for m in (m for m in g.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)):
        fan_in = m.weight.shape[1] * m.weight[0, 0].numel()  # as torch computes it for both kinds
        assert m.bias.abs().max() <= 1 / fan_in**0.5 and m.bias.abs().max() > 0.1 / fan_in**0.5


def test_instance_edges_on_a_hand_made_map():
    inst = torch.tensor(
        [
            [1, 1, 1, 2],
            [1, 1, 1, 2],
            [3, 3, 1, 2],
            [3, 3, 1, 1],
        ]
    )
    expected = torch.tensor(
        [
            [0, 0, 1, 1],
            [1, 1, 1, 1],
            [1, 1, 1, 1],
            [0, 1, 1, 1],
        ],
        dtype=torch.float32,
    )
    edges = instance_edges(inst[None])
    assert edges.shape == (1, 1, 4, 4)
    assert torch.equal(edges[0, 0], expected)
    assert instance_edges(torch.full((1, 3, 3), 7)).sum() == 0


def test_instance_mean_equals_a_naive_per_instance_mean():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 4, 10, 12, generator=g)
    inst = torch.randint(0, 5, (3, 10, 12), generator=g) * 1000 + torch.randint(0, 2, (3, 10, 12), generator=g)
    inst[1] = 26007  # one sample that is a single instance
    out = instance_mean(feats, inst)
    naive = torch.empty_like(feats)
    for b in range(3):
        for i in inst[b].unique():
            mask = inst[b] == i
            for c in range(4):
                naive[b, c][mask] = feats[b, c][mask].mean()
    torch.testing.assert_close(out, naive)


def test_encoder_output_is_constant_within_instances():
    e = Encoder(3, 3, nef=4, n_downsampling=2)
    inst = torch.zeros(1, 16, 16, dtype=torch.long)
    inst[:, :, 8:] = 26001
    out = e(torch.randn(1, 3, 16, 16), inst)
    left, right = out[0, :, :, :8], out[0, :, :, 8:]
    assert left.flatten(1).std(1).max() < 1e-6 and right.flatten(1).std(1).max() < 1e-6
    assert not torch.allclose(left[:, 0, 0], right[:, 0, 0])


def test_stage1_generator_loads_into_the_local_enhancer_by_name():
    g1 = build_generator(tiny_options(netG="global", ngf=16))
    g2 = build_generator(tiny_options(netG="local", ngf=8, n_local_enhancers=1))
    report = load_global_into_local(g2, g1.state_dict())
    assert report["loaded"] and report["initialised"]
    assert all(n.startswith("model.") for n in report["loaded"])
    assert all(n.startswith("model1_") for n in report["initialised"])
    # G1's output head (pad, conv, tanh) has no place in G2
    assert len(report["skipped"]) == 2 and all(".weight" in s or ".bias" in s for s in report["skipped"])
    for name, p in g2.model.state_dict().items():
        torch.testing.assert_close(p, g1.model.state_dict()[name])


def test_stage1_generator_with_wrong_width_is_a_clear_error():
    g1 = build_generator(tiny_options(netG="global", ngf=8))  # should be 16 for a local ngf of 8
    g2 = build_generator(tiny_options(netG="local", ngf=8))
    with pytest.raises(ValueError, match=r"model\.1\.weight has shape .* expects"):
        load_global_into_local(g2, g1.state_dict())


def test_instance_norm_in_bf16_keeps_fp32_statistics():
    """Under autocast the norm gets bf16 activations. Its statistics over 64k values are accumulated in fp32: the
    output is the fp32 result up to bf16 rounding (statistics in bf16 would be off by whole units here)."""
    x = (torch.randn(1, 4, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 + 6).bfloat16()
    norm = norm_layer("instance", 4)
    ref = norm(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=0.01)
