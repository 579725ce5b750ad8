import numpy as np
import pytest
import torch

from data.transforms import Geometry, edges_of, load_geometry, random_crop_flip


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("none", (512, 1024)),
        ("scale_width", (256, 512)),
        ("resize_and_crop", (512, 512)),
        ("scale_width_and_crop", (256, 512)),
        ("crop", (512, 1024)),
    ],
)
def test_load_sizes_per_mode(mode, expected):
    g = Geometry(mode, load_size=512, fine_size=256, size_multiple=16)
    assert g.load_size_of(512, 1024) == expected


def test_non_crop_modes_round_to_the_generator_multiple():
    assert Geometry("none", size_multiple=32).load_size_of(1000, 2050) == (992, 2048)
    assert Geometry("scale_width", load_size=500, size_multiple=16).load_size_of(512, 1024) == (256, 496)


def test_bad_geometry_is_named():
    with pytest.raises(ValueError, match="resize_or_crop='zoom' is not one of"):
        Geometry("zoom")
    with pytest.raises(ValueError, match="fine_size=100 must be a multiple of 16"):
        Geometry("crop", fine_size=100)
    with pytest.raises(ValueError, match="smaller than fine_size 512"):
        Geometry("crop", fine_size=512).load_size_of(256, 1024)


def test_resize_is_nearest_for_ids_and_bicubic_for_images():
    label = np.zeros((64, 128), np.uint8)
    label[:, 64:] = 26
    inst = label.astype(np.int32) * 1000 + 3
    image = np.random.default_rng(0).integers(0, 255, (64, 128, 3), dtype=np.uint8)
    g = Geometry("scale_width", load_size=64, size_multiple=16)
    lab, ins, img = load_geometry(g, label, inst, image)
    assert lab.shape == (32, 64) and img.shape == (32, 64, 3) and ins.dtype == np.int32
    assert set(np.unique(lab)) == {0, 26} and set(np.unique(ins)) == {3, 26003}  # no blended ids
    assert len(np.unique(img)) > 2


def test_crop_and_flip_apply_the_same_geometry_and_are_reproducible():
    g = Geometry("crop", fine_size=16, size_multiple=16)
    h, w = 32, 48
    coords = torch.arange(h * w).reshape(1, h, w).repeat(4, 1, 1)
    batch = {"index": torch.arange(4), "label": coords.clone(), "image": coords.unsqueeze(1).repeat(1, 3, 1, 1).float()}
    a = random_crop_flip(g, batch, seed=1, epoch=0)
    assert a["label"].shape == (4, 16, 16) and a["image"].shape == (4, 3, 16, 16)
    assert torch.equal(a["image"][:, 0].long(), a["label"])  # label and image cropped and flipped together
    b = random_crop_flip(g, batch, seed=1, epoch=0)
    assert torch.equal(a["label"], b["label"])
    later = [random_crop_flip(g, batch, seed=1, epoch=e)["label"] for e in range(1, 4)]
    assert any(not torch.equal(a["label"], x) for x in later)  # a new draw each epoch
    flips = torch.cat([(x[:, 0, 1] < x[:, 0, 0]) for x in [a["label"], *later]])
    assert flips.any() and not flips.all()
    val = random_crop_flip(g, batch, seed=1, epoch=0, train=False)
    assert torch.equal(val["label"][0], coords[0, 8:24, 16:32])  # centre crop, no flip


def test_numpy_edges_match_the_model_definition():
    from model.networks import instance_edges

    inst = np.random.default_rng(0).integers(0, 3, (2, 9, 11)).astype(np.int32)
    assert np.array_equal(edges_of(inst), instance_edges(torch.from_numpy(inst))[:, 0].numpy().astype(np.uint8))


def test_collate_function_builds_model_batches_from_read_only_arrays():
    import warnings

    from data.pipeline import ModelBatches, to_model_batch
    from data.pipeline_config import PipelineConfig

    rng = np.random.default_rng(0)
    arrays = {
        "index": np.arange(2, dtype=np.int64),
        "label": rng.integers(0, 35, (2, 32, 64), dtype=np.uint8),
        "edges": rng.integers(0, 2, (2, 32, 64), dtype=np.uint8),
        "image": rng.integers(0, 256, (2, 32, 64, 3), dtype=np.uint8),
    }
    for a in arrays.values():
        a.flags.writeable = False  # as Ray Data hands out blocks
    cfg = PipelineConfig(geometry=Geometry("crop", fine_size=16, size_multiple=16), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable numpy arrays
        got = ModelBatches(cfg, epoch=2, train=True)(arrays)
    expected = to_model_batch({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, cfg, 2, train=True)
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k
    assert got["image"].dtype == torch.float32 and got["image"].shape == (2, 3, 16, 16)
    assert got["image"].min() >= -1 and got["image"].max() <= 1
