"""evaluation/: seg-score's confusion-matrix arithmetic and class maps, loading user networks from files, and the
FID/KID mechanics with a small feature network of the test's own."""

import math

import pytest
import torch
from torch import nn

from data.labels import CITY_ID, CITYSCAPES, FACES
from evaluation.fid import FeatureDistance, load_feature_net
from evaluation.modules import file_identity
from evaluation.segmenters import load_segmenter_file
from evaluation.segscore import BUILT_IN, ClassMap, EvaluationError, SegScore, load_class_map
from model.inference import to_uint8
from model.segmenter import SegmenterOptions, UNetSegmenter


def one_hot_logits(pred: torch.Tensor, channels: int) -> torch.Tensor:
    return nn.functional.one_hot(pred, channels).permute(0, 3, 1, 2).float()


def faces_map() -> ClassMap:
    return ClassMap(tuple(range(FACES.label_nc)), (), "identity")


def test_seg_score_counts_iou_and_pixel_accuracy_over_scored_pixels_only():
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[0, :, 2:] = 1  # left half class 0, right half class 1
    label[0, 3, :] = 5  # bottom row: a class scored nowhere here
    cmap = ClassMap((0, 1, 2), tuple(range(3, FACES.label_nc)), "test")
    pred = torch.zeros(1, 4, 4, dtype=torch.long)
    pred[0, :, 3] = 1  # one right column predicted 1, the other predicted 0
    score = SegScore(cmap, FACES)
    score.update(one_hot_logits(pred, 3), label)
    r = score.result()
    # scored pixels: rows 0-2 (12); class 0 truth 6, predicted 9 (6 right); class 1 truth 6, predicted 3 (3 right)
    assert r.pixels == 12
    assert r.pixel_accuracy == pytest.approx(9 / 12)
    assert r.per_class["background"] == pytest.approx(6 / 9) and r.per_class["skin"] == pytest.approx(3 / 6)
    assert math.isnan(r.per_class["nose"])  # neither present nor predicted: not in the mean
    assert r.miou == pytest.approx((6 / 9 + 3 / 6) / 2)
    assert r.classes == 2 and r.as_metrics()["seg_classes"] == 2  # what the mean stands on, reported with it


def test_seg_score_resizes_logits_to_the_label_and_is_perfect_on_the_truth():
    label = torch.randint(0, FACES.label_nc, (2, 16, 32))
    logits = one_hot_logits(label, FACES.label_nc)
    score = SegScore(faces_map(), FACES)
    score.update(nn.functional.interpolate(logits, scale_factor=2.0, mode="nearest"), label)
    assert score.result().miou == pytest.approx(1.0) and score.result().pixel_accuracy == pytest.approx(1.0)


def test_class_maps_must_cover_every_dataset_id(tmp_path):
    m = BUILT_IN["cityscapes-trainids"].check(CITYSCAPES)
    assert len(m.classes) == 19 and m.classes[0] == CITY_ID["road"] and m.classes[-1] == CITY_ID["bicycle"]
    bad = tmp_path / "map.yaml"
    bad.write_text("classes: [7, 8]\nignore: [0, 1, 2]\n")
    with pytest.raises(EvaluationError, match=r"misses cityscapes label ids 3 \(out of roi\).*'ignore'"):
        load_class_map(bad).check(CITYSCAPES)
    bad.write_text("classes: [7, 99]\n")
    with pytest.raises(EvaluationError, match=r"ids \[99\] are not cityscapes label ids"):
        load_class_map(bad).check(CITYSCAPES)
    bad.write_text("ignore: [1]\n")
    with pytest.raises(EvaluationError, match="expected 'classes:"):
        load_class_map(bad)
    with pytest.raises(EvaluationError, match="cannot be read"):
        load_class_map(tmp_path / "absent.yaml")


def test_a_segmenter_file_must_be_torchscript_with_the_class_maps_channels(tmp_path):
    net = UNetSegmenter(SegmenterOptions(num_classes=FACES.label_nc, width=4, depth=2)).eval()
    state = tmp_path / "state.pt"
    torch.save(net.state_dict(), state)
    with pytest.raises(EvaluationError, match=r"state\.pt is not a TorchScript file.*state dict.*torch\.jit\.script"):
        load_segmenter_file(str(state), faces_map(), FACES)
    scripted = tmp_path / "seg.pt"
    torch.jit.script(net).save(str(scripted))
    seg = load_segmenter_file(str(scripted), faces_map(), FACES)
    assert seg.identity.startswith("sha256:") and len(seg.identity) == 7 + 64
    assert seg.logits(torch.rand(1, 3, 20, 36)).shape == (1, FACES.label_nc, 20, 36)  # any size
    with pytest.raises(EvaluationError, match=r"returns 19 channels but class map short maps 3"):
        load_segmenter_file(str(scripted), ClassMap((0, 1, 2), tuple(range(3, 19)), "short"), FACES)
    exported = tmp_path / "seg.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 64, 128),)), str(exported))
    assert load_segmenter_file(str(exported), faces_map(), FACES).logits(torch.rand(2, 3, 64, 128)).shape[1] == 19


class TinyFeatures(nn.Module):
    """A feature network of the test's own: uint8 images -> an 8-d vector each (random convs, mean-pooled)."""

    def __init__(self, pooled: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
        self.pooled = pooled

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = self.conv(images.float() / 127.5 - 1)
        return x.mean((2, 3)) if self.pooled else x


def test_fid_and_kid_are_near_zero_for_identical_sets_and_grow_with_a_shift(tmp_path):
    path = tmp_path / "features.pt"
    torch.jit.script(TinyFeatures()).save(str(path))
    net = load_feature_net(str(path))
    assert net.dim == 8 and net.kwargs == {"return_features": True}
    torch.manual_seed(1)
    photos = torch.rand(64, 3, 32, 32) * 2 - 1
    same, shifted = FeatureDistance(), FeatureDistance()
    for d, fake in ((same, photos), (shifted, (photos + 0.5).clamp(-1, 1))):
        d.update(net.features(to_uint8(photos)), real=True)
        d.update(net.features(to_uint8(fake)), real=False)
    assert same.fid() == pytest.approx(0.0, abs=1e-3)
    assert shifted.fid() > 100 * max(same.fid(), 1e-6)
    assert abs(same.kid()[0]) < 1e-3 and shifted.kid()[0] > 10 * abs(same.kid()[0])


def test_a_feature_network_must_give_one_vector_per_image(tmp_path):
    path = tmp_path / "maps.pt"
    torch.jit.script(TinyFeatures(pooled=False)).save(str(path))
    with pytest.raises(EvaluationError, match=r"maps\.pt returns shape \(2, 8, 15, 31\).*one feature vector per image"):
        load_feature_net(str(path))


def test_the_fid_inception_network_has_the_papers_parameter_count():
    """torchvision's ImageNet Inception-v3 has 27,161,264 parameters; the FID graph has no auxiliary classifier
    (-3,326,696) and 1008 classes instead of 1000 (+8 x 2049)."""
    from model.inception import FIDInceptionV3

    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == 27_161_264 - 3_326_696 + 8 * 2049


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_the_pt_inception_state_dict_loads_without_unpickling_code(tmp_path, legacy):
    """pt_inception-2015-12-05 is a state dict (no code): it loads with weights_only into model/inception.py's network,
    older files without BatchNorm's num_batches_tracked included; the features are the network's pool features."""
    from model.inception import FIDInceptionV3

    torch.manual_seed(0)
    reference = FIDInceptionV3().eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    net = load_feature_net(str(path))
    assert net.dim == 2048 and net.kwargs == {"return_features": True}
    assert net.identity == file_identity(path)
    images = torch.randint(0, 256, (2, 3, 64, 128), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(net.features(images), reference(images), atol=1e-5)


def test_a_state_dict_that_is_not_the_fid_inception_is_named(tmp_path):
    from model.inception import FIDInceptionV3

    state = FIDInceptionV3().state_dict()
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(
        EvaluationError,
        match=r"other\.pth is a state dict, not the FID Inception-v3 state dict: missing "
        r"Mixed_7c\.branch_pool\.conv\.weight \(1\); wrong shape fc\.weight \(1\)",
    ):
        load_feature_net(str(path))
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # objects, not tensors: refused unread
    with pytest.raises(EvaluationError, match=r"pickled\.pth is not a TorchScript file or a torch\.export archive"):
        load_feature_net(str(tmp_path / "pickled.pth"))
