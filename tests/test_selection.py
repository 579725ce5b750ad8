"""Which metric judges generators (the eval: section) and how the registry's champion alias follows it: only
versions judged by the same metric and the same network are compared."""

import pytest
import torch
from mlflow import MlflowClient

from data.labels import FACES
from evaluation.segscore import ClassMap
from model.segmenter import SegmenterOptions, UNetSegmenter
from orchestration.judging.selection import L1_WARNING, objective, resolve_selection
from orchestration.records.registry import ALIAS, _maybe_move_alias, judgement_tags
from orchestration.run.config import ConfigError, load_config


def faces_config(*overrides):
    return load_config("configs/tiny.yaml", ["dataset=faces", "model.label_nc=19", *overrides])


def scripted_segmenter(tmp_path):
    path = tmp_path / "seg.pt"
    torch.jit.script(UNetSegmenter(SegmenterOptions(num_classes=19, width=4, depth=2)).eval()).save(str(path))
    (tmp_path / "map.yaml").write_text(ClassMap(tuple(range(19)), (), "x").to_yaml())
    return str(path), str(tmp_path / "map.yaml")


def test_without_a_segmenter_or_features_generators_are_judged_by_l1_with_a_warning():
    said = []
    s = resolve_selection(faces_config(), FACES, tracking_uri=None, log=said.append)
    assert (s.metric, s.mode) == ("val_L1", "min") and s.judge(FACES) is None
    assert L1_WARNING in said


def test_a_configured_segmenter_makes_seg_miou_the_metric_and_the_sweeps_objective(tmp_path):
    seg, cmap = scripted_segmenter(tmp_path)
    cfg = faces_config(f"eval.segmenter={seg}", f"eval.class_map={cmap}")
    s = resolve_selection(cfg, FACES, tracking_uri=None, log=lambda m: None)
    assert (s.metric, s.mode) == ("val_seg_miou", "max") and s.judged_by.startswith("sha256:")
    assert objective(cfg, s) == ("val_seg_miou", "max")
    assert objective(faces_config(f"eval.segmenter={seg}", f"eval.class_map={cmap}", "sweep.metric=val_L1"), s) == (
        "val_L1",
        "min",
    )
    judge = s.judge(FACES)  # what a Train worker unpacks: scores a batch
    fake, label = torch.rand(2, 3, 32, 64) * 2 - 1, torch.randint(0, 19, (2, 32, 64))
    assert 0 <= judge.score(fake, fake, label)["val_seg_miou"] <= 1


def test_asking_for_a_metric_without_its_network_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.metric=seg_miou but no segmenter: set eval.segmenter"):
        resolve_selection(faces_config("eval.metric=seg_miou"), FACES, tracking_uri=None)
    with pytest.raises(ConfigError, match="eval.metric=kid needs a feature network: set eval.inception"):
        resolve_selection(faces_config("eval.metric=kid"), FACES, tracking_uri=None)


def test_the_champion_moves_only_among_versions_judged_alike(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.create_registered_model("g")

    def version(metric, value, by):
        judged = {"metric": metric, "value": value, "judged_by": by, "mode": "max" if "miou" in metric else "min"}
        return c.create_model_version("g", str(tmp_path), tags=judgement_tags(judged)).version, judged

    v1, j1 = version("val_seg_miou", 0.40, "seg-A")
    assert _maybe_move_alias(c, "g", v1, j1) == (True, "there was no champion")
    v2, j2 = version("val_seg_miou", 0.35, "seg-A")  # worse by the same segmenter: stays
    moved, reason = _maybe_move_alias(c, "g", v2, j2)
    assert not moved and "val_seg_miou 0.3500 is worse than champion v1's 0.4000" in reason
    v3, j3 = version("val_seg_miou", 0.90, "seg-B")  # another segmenter: not comparable, however high
    moved, reason = _maybe_move_alias(c, "g", v3, j3)
    assert not moved and "cannot compare" in reason and "seg-B" in reason and "seg-A" in reason
    assert "python -m jobs.evaluate --model models:/g/1 --model models:/g/3" in reason
    v4, j4 = version("val_seg_miou", 0.4499996, "seg-A")
    moved, reason = _maybe_move_alias(c, "g", v4, j4)
    assert moved and "val_seg_miou 0.4500 >= champion v1's 0.4000" in reason
    assert c.get_model_version_by_alias("g", ALIAS).version == v4
    # the same judgement again (a rerun of the same training) is no worse: the alias moves (a tag rounded to 6
    # digits read 0.450000, above the new 0.4499996, and kept the alias)
    v5, j5 = version("val_seg_miou", 0.4499996, "seg-A")
    moved, reason = _maybe_move_alias(c, "g", v5, j5)
    assert moved and "val_seg_miou 0.4500 >= champion v4's 0.4500" in reason
