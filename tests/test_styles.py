"""Per-object styles: the reference's clustering rules (instances over 1/64 of the image, k-means++ with a fixed
seed, a random centre per instance at generation) and styles chosen per instance, with the errors they can meet."""

import re

import numpy as np
import pytest
import torch

from model.bundle import Pix2PixHDGenerator
from model.networks import build_encoder, build_generator
from model.styles import change_near, cluster, feature_map, instance_class, instance_features
from tests.conftest import tiny_options


def test_only_instances_larger_than_a_64th_of_the_image_are_clustered():
    inst = torch.full((1, 32, 32), 7)  # road: the rest of the image
    inst[0, :4, :4] = 26001  # a car of 16 px = 1/64 of 1024: not larger, left out
    inst[0, 10:15, 10:14] = 26002  # 20 px: kept
    features = torch.zeros(1, 3, 32, 32)
    for i, v in ((7, 0.1), (26001, 0.2), (26002, 0.3)):
        features[0][:, inst[0] == i] = v
    got = sorted((c, round(float(f[0]), 3)) for c, f in instance_features(features, inst))
    assert got == [(7, 0.1), (26, 0.3)]
    assert instance_class(26002) == 26 and instance_class(24) == 24


def test_kmeans_plus_plus_per_class_is_seeded_and_sorted_by_cluster_size():
    rng = np.random.default_rng(0)
    blobs = [np.full((n, 2), centre) + rng.normal(0, 0.01, (n, 2)) for n, centre in ((2, 5.0), (6, -1.0), (4, 2.0))]
    per_class = {26: np.concatenate(blobs), 7: np.zeros((1, 2))}
    centres, counts = cluster(per_class, label_nc=35, feat_num=2, k=3)
    again, _ = cluster(per_class, label_nc=35, feat_num=2, k=3)
    assert torch.equal(centres, again)
    assert counts[26] == 3 and counts[7] == 1 and counts.sum() == 4  # k = min(10, distinct instances)
    np.testing.assert_allclose(centres[26, :, 0].numpy(), [-1.0, 2.0, 5.0], atol=0.05)  # 6, 4, 2 members


def centres_and_counts():
    centres = torch.zeros(35, 10, 3)
    centres[26, :3] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    centres[7, 0] = torch.tensor([0.5, 0.5, 0.5])
    counts = torch.zeros(35, dtype=torch.long)
    counts[26], counts[7] = 3, 1
    return centres, counts


def street() -> torch.Tensor:
    inst = torch.full((1, 32, 64), 7)
    for j in range(6):  # six cars
        inst[0, 20:28, 2 + 10 * j : 9 + 10 * j] = 26000 + j
    return inst


def test_each_instance_draws_its_own_centre_and_the_same_seed_draws_the_same():
    centres, counts = centres_and_counts()
    inst = street()
    a, b = feature_map(inst, centres, counts, seed=3), feature_map(inst, centres, counts, seed=3)
    assert torch.equal(a, b)
    cars = {tuple(a[0, :, 24, 5 + 10 * j].tolist()) for j in range(6)}
    assert len(cars) > 1  # not one centre per class: the reference draws per instance
    assert any(not torch.equal(a, feature_map(inst, centres, counts, seed=s)) for s in range(4, 8))
    largest = feature_map(inst, centres, counts, mode="largest")
    assert {tuple(largest[0, :, 24, 5 + 10 * j].tolist()) for j in range(6)} == {(1.0, 0.0, 0.0)}
    road = largest[0, :, 0, 0].tolist()
    assert road == [0.5, 0.5, 0.5]


def test_a_style_per_instance_index_or_vector():
    centres, counts = centres_and_counts()
    inst = street()
    f = feature_map(inst, centres, counts, styles={26002: 2, 26003: [0.3, -0.2, 0.1]}, mode="largest")
    assert f[0, :, 24, 25].tolist() == [0.0, 0.0, 1.0]
    assert f[0, :, 24, 35].tolist() == pytest.approx([0.3, -0.2, 0.1])
    assert f[0, :, 24, 5].tolist() == [1.0, 0.0, 0.0]  # the others: by mode


@pytest.mark.parametrize(
    "styles, message",
    [
        ({26001: 3}, "style 3 for instance 26001: class 26 has 3 styles (0..2)"),
        ({26099: 0}, "a style is given for instance 26099, which is not in the instance map"),
        ({7: 0, 26001: 0, 24000: 0}, "instance 24000"),
        ({26001: [0.1, 0.2]}, "the feature vector for instance 26001 has 2 values; this generator's are 3"),
        ({26001: "red"}, "the style of instance 26001 is a str: give a cluster index or a feature vector"),
        ({26001: [0.1, float("nan"), 0.2]}, "the feature vector for instance 26001 holds nan: its values are numbers"),
        (
            {26001: [1e308, 0.0, 0.2]},
            "the feature vector for instance 26001 holds 1e+308: its values are numbers in -1..1",
        ),
        ({26001: [0.1, "0.2", 0.2]}, "the feature vector for instance 26001 holds a str"),
    ],
    ids=[
        "index-past-clusters",
        "unknown-instance",
        "class-without-clusters",
        "vector-length",
        "not-a-style",
        "nan",
        "huge",
        "string-value",
    ],
)
def test_a_style_that_does_not_fit_is_named(styles, message):
    centres, counts = centres_and_counts()
    inst = street()
    if 24000 in styles:
        inst[0, :6, :6] = 24000  # a person, a class nothing was clustered for
        message = "instance 24000 is of class 24, which has no style clusters"
    with pytest.raises(ValueError, match=re.escape(message)):
        feature_map(inst, centres, counts, styles=styles)


def test_non_integer_maps_are_refused():
    centres, counts = centres_and_counts()
    with pytest.raises(ValueError, match="instance ids must be integers"):
        feature_map(street().float(), centres, counts)
    bundle = styled_bundle()
    with pytest.raises(ValueError, match="label and instance maps must be integer ids"):
        bundle(torch.zeros(1, 2, 32, 64))


def styled_bundle(**options) -> Pix2PixHDGenerator:
    opt = tiny_options(label_nc=35, instance_feat=True, feat_num=3, **options)
    torch.manual_seed(0)
    centres, counts = centres_and_counts()
    centres = centres * 2 - 0.5  # styles far apart
    return Pix2PixHDGenerator(dict(vars(opt)), build_generator(opt).eval(), build_encoder(opt).eval(), centres, counts)


def test_two_styles_for_one_car_change_that_car_most_and_the_seed_reproduces():
    """The generator's input changes only inside the car. With untrained weights and instance norm (whose
    statistics carry any local change to the whole image) 30% of the image change lies in the car's mask dilated
    by 4 px, which is 12% of the image: 3.2x the change per pixel outside it (measured 2026-11-26)."""
    bundle = styled_bundle()
    inst = street()
    x = torch.stack([torch.where(inst >= 1000, inst // 1000, inst), inst], 1)
    a = bundle.render(x, styles={26002: 0}, seed=1)
    b = bundle.render(x, styles={26002: 2}, seed=1)
    assert torch.equal(a, bundle.render(x, styles={26002: 0}, seed=1))
    near = change_near(a[0], b[0], inst[0] == 26002, dilate=4)
    assert near["share"] > 0 and near["density"] > 2.5
    same = bundle.render(x, styles={26002: 0}, seed=2)  # another seed redraws the other instances' styles
    assert not torch.equal(a, same)


def test_a_generator_with_instance_features_registers_its_clusters_and_serves_them_without_pickle(tmp_path, city6):
    """build_bundle clusters E's features over the whole training split (here 6 scenes); the files the registry
    stores (weights with weights_only, options) give back the same generator, clusters and counts included."""
    from model.step import TrainStep
    from orchestration.records.registry import build_bundle
    from orchestration.run.config import load_config
    from serving import pyfunc

    cfg = load_config("configs/tiny.yaml", ["model.instance_feat=true"])
    state = TrainStep(cfg.stage_model(3)).state_dict()
    lines = []
    bundle = build_bundle(cfg, state, 3, city6, log=lines.append)
    assert "of 6 training samples clustered per class" in lines[0]
    assert bundle.cluster_counts.sum() > 0 and bundle.cluster_counts.max() <= 10
    loaded = pyfunc.load(pyfunc.save(bundle, tmp_path / "files"))
    assert torch.equal(loaded.clusters, bundle.clusters) and torch.equal(loaded.cluster_counts, bundle.cluster_counts)
    x = torch.stack([torch.full((1, 64, 128), 7), torch.full((1, 64, 128), 7)], 1)
    x[:, 0, 40:56, 20:60], x[:, 1, 40:56, 20:60] = 26, 26001
    assert torch.equal(loaded.render(x, seed=4), bundle.render(x, seed=4))


def test_change_near_a_mask_is_measured_inside_its_dilation():
    a, b = torch.zeros(3, 10, 10), torch.zeros(3, 10, 10)
    b[:, 4, 4] = 1.0  # a change of 3 at one pixel inside the mask
    b[0, 0, 9] = 1.0  # a change of 1 far away
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[4, 4] = True
    got = change_near(a, b, mask, dilate=1)
    assert got["share"] == pytest.approx(0.75) and got["area"] == pytest.approx(0.09)
    assert got["density"] == pytest.approx((3 / 9) / (1 / 91))


def test_the_default_style_mode_is_the_models_option():
    """model.style_mode: how instances without a chosen style are styled unless a request says otherwise."""
    x = torch.stack([torch.where(street() >= 1000, street() // 1000, street()), street()], 1)
    random, largest = styled_bundle(), styled_bundle(style_mode="largest")
    assert random.style_mode == "random" and largest.style_mode == "largest"
    assert torch.equal(largest.render(x, seed=3), random.render(x, seed=3, mode="largest"))
    assert not torch.equal(largest.render(x, seed=3), random.render(x, seed=3))
    with pytest.raises(ValueError, match="option style_mode='first' is not one of random, largest"):
        tiny_options(style_mode="first")


def test_render_many_batches_requests_of_one_size_and_gives_what_render_gives():
    bundle = styled_bundle()
    inst = street()
    x = torch.stack([torch.where(inst >= 1000, inst // 1000, inst), inst], 1)
    small = x[..., :32, :32].contiguous()
    requests = [(x, {26002: 1}, 3, None), (small, None, 1, "largest"), (x, {26002: 2}, 3, None)]
    got = bundle.render_many(requests)
    for (inputs, styles, seed, mode), image in zip(requests, got, strict=True):
        torch.testing.assert_close(image, bundle.render(inputs, styles, seed, mode), atol=1e-5, rtol=0)
    assert got[1].shape[-2:] == (32, 32) and not torch.equal(got[0], got[2])
