"""Styles from a photo (the reference's use_encoded_image): each instance takes the feature E computes for the same
instance id in a photo. A generator trained briefly here (no Ray) already renders a photo's objects in colours
closer to the photo's with those styles than with the seed's draw of the clusters."""

import dataclasses

import pytest
import torch

from data.pipeline import read_samples
from model.bundle import Pix2PixHDGenerator
from model.step import TrainStep
from model.styles import cluster, instance_features
from orchestration.run.config import load_config, pipeline_config
from tests.helpers import prepared_city


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("photo")
    prepared_city(tmp, count=16, height=32, width=64)  # small: the training below takes seconds
    cfg = load_config("configs/tiny.yaml", ["model.instance_feat=true", "model.lr=0.001"])  # quick to learn
    data = read_samples(
        str(tmp / "data"), "train", dataclasses.replace(pipeline_config(cfg, 3), instance_output="ids"), 16
    )
    step = TrainStep(cfg.stage_model(3), seed=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        pick = torch.randint(16, (4,), generator=g)
        step.step({k: v[pick] for k, v in data.items()})
    per_class = {}
    with torch.no_grad():
        for c, vector in instance_features(step.E.eval()(data["image"], data["inst"]), data["inst"]):
            per_class.setdefault(c, []).append(vector)
    bundle = Pix2PixHDGenerator(dict(vars(step.opt)), step.G.eval(), step.E.eval(), *cluster(per_class, 35, 3))
    return bundle, data


def test_a_photos_styles_bring_its_objects_colours_closer_than_the_seeds_draw(trained):
    bundle, data = trained
    x = torch.stack([data["label"].long(), data["inst"]], 1)
    photo_error, drawn_error, objects = 0.0, 0.0, 0
    for i in range(len(x)):
        maps, photo, inst = x[i : i + 1], data["image"][i : i + 1], data["inst"][i : i + 1]
        taken = bundle.photo_styles(photo, inst, maps)
        assert not taken.missing  # the photo of the same scene has every instance
        styled, drawn = bundle.render(maps, taken.styles, seed=0)[0], bundle.render(maps, None, seed=0)[0]
        for j in inst.unique().tolist():
            if j < 1000:  # things only: cars, people, ... (ids class * 1000 + k)
                continue
            mask = inst[0] == j
            colour = photo[0][:, mask].mean(1)
            photo_error += (styled[:, mask].mean(1) - colour).abs().mean().item()
            drawn_error += (drawn[:, mask].mean(1) - colour).abs().mean().item()
            objects += 1
    assert objects > 30
    assert photo_error < 0.95 * drawn_error, (photo_error / objects, drawn_error / objects)


def test_ids_missing_from_the_photo_are_named_and_mismatches_refused(trained):
    bundle, data = trained
    maps = torch.stack([data["label"].long(), data["inst"]], 1)[:1]
    other = data["inst"][1:2]  # another scene's instance map: its car ids differ
    taken = bundle.photo_styles(data["image"][1:2], other, maps)
    assert taken.missing == sorted(set(maps[0, 1].unique().tolist()) - set(other.unique().tolist()))
    assert "not in it: styled by the seed's draw" in taken.said()
    with pytest.raises(ValueError, match=r"the style photo is 32x64 \(height x width\) but its instance map is 16x32"):
        bundle.photo_styles(data["image"][:1], other[:, :16, :32], maps)
    wrong = maps.clone()
    car = next(j for j in wrong[0, 1].unique().tolist() if j >= 26000)
    wrong[0, 0][wrong[0, 1] == car] = 24  # the label map calls the car's pixels person
    with pytest.raises(ValueError, match=f"instance {car} is of class 26 by its id, but the label map marks"):
        bundle.photo_styles(data["image"][:1], data["inst"][:1], wrong)
