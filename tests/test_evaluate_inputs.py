"""jobs.evaluate refuses bad input with one clear line and exit 2 before any compute (no Ray is started): a split
that does not exist, a model that does not exist, models of different label sets, a segmenter file that is not
TorchScript, a segmenter without its class map. (Evaluations that run: tests/test_cluster.py.)"""

import pytest
import torch

from jobs.evaluate import main
from orchestration.run.config import load_config
from tests.helpers import prepared_city, untrained_checkpoint


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    return prepared_city(tmp_path_factory.mktemp("city"), count=6, val_fraction=0.34, name="synthetic-city")


def untrained(path, *overrides: str) -> str:
    cfg = load_config("configs/tiny.yaml", list(overrides))
    return str(untrained_checkpoint(path, cfg, 1, epoch=0, lr=0.0))


def evaluate(capsys, *args: str) -> tuple[int, str]:
    code = main([*args, "--no-tracking"])
    return code, capsys.readouterr().err


def test_a_split_that_does_not_exist(city, tmp_path, capsys):
    code, err = evaluate(capsys, "--model", untrained(tmp_path / "g"), "--data", city, "--split", "test")
    assert code == 2 and f"{city} holds no prepared 'test' split" in err


def test_models_that_do_not_exist(city, tmp_path, capsys):
    code, err = evaluate(capsys, "--model", "no-such-run", "--data", city, "--storage", str(tmp_path / "runs"))
    assert code == 2 and "run 'no-such-run'" in err and "has no finished stage" in err
    code, err = evaluate(capsys, "--model", str(tmp_path / "nothing"), "--data", city)
    assert code == 2 and f"--model {tmp_path / 'nothing'}: no checkpoint there" in err
    code, err = evaluate(capsys, "--model", "models:/pix2pixhd-synthetic-city@champion", "--data", city)
    assert code == 2 and "a registry URI needs MLflow tracking" in err
    code, err = evaluate(capsys, "--model", "..", "--data", city)  # not a run id: no folder above the storage
    assert code == 2 and "'..' is not a valid name" in err


def test_two_models_of_different_label_sets_are_not_compared(city, tmp_path, capsys):
    city_model = untrained(tmp_path / "city")
    faces_model = untrained(tmp_path / "faces", "model.label_nc=19")
    code, err = evaluate(capsys, "--model", city_model, "--model", faces_model, "--data", city)
    assert code == 2
    assert "do not share" in err and "cityscapes, 35 labels" in err and f"{faces_model} (19 labels)" in err


def test_a_segmenter_must_be_torchscript_and_come_with_its_class_map(city, tmp_path, capsys):
    model = untrained(tmp_path / "g")
    state = tmp_path / "segmenter.pt"
    torch.save({"weight": torch.zeros(3)}, state)
    code, err = evaluate(capsys, "--model", model, "--data", city, "--segmenter", str(state), "--class-map", "x.yaml")
    assert code == 2 and "class map x.yaml: cannot be read" in err
    code, err = evaluate(
        capsys, "--model", model, "--data", city, "--segmenter", str(state), "--class-map", "cityscapes-trainids"
    )
    assert code == 2 and "is not a TorchScript file or a torch.export archive" in err
    code, err = evaluate(capsys, "--model", model, "--data", city, "--segmenter", str(state))
    assert code == 2 and "give its class map too (--class-map" in err


class TwoClasses(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], -x[:, :1]], 1)


def test_a_class_map_scoring_ids_the_split_never_has_is_refused_before_compute(city, tmp_path, capsys):
    """Classes with no pixels on either side drop out of the mean: a map of one present class and absent ones
    scored mIoU 1.0. Such a map is refused naming the absent ids, before any compute."""
    import ray

    from data.labels import CITYSCAPES
    from data.shards import load_manifest

    histogram = load_manifest(city, "val")["class_histogram"]
    present = next(i for i, n in enumerate(histogram) if n > 0)
    absent = next(i for i in range(CITYSCAPES.label_nc) if i >= len(histogram) or histogram[i] == 0)
    cmap = tmp_path / "map.yaml"
    ignore = [i for i in range(CITYSCAPES.label_nc) if i not in (present, absent)]
    cmap.write_text(f"classes: [{present}, {absent}]\nignore: {ignore}\n")
    segmenter = tmp_path / "two.pt"
    torch.jit.script(TwoClasses()).save(str(segmenter))
    args = ["--model", untrained(tmp_path / "g"), "--data", city, "--segmenter", str(segmenter)]
    code, err = evaluate(capsys, *args, "--class-map", str(cmap), "--out", str(tmp_path / "report"))
    assert code == 2, err
    assert f"scores ids that {city} 'val' never has: {absent} ({CITYSCAPES.names[absent]})" in err, err
    assert not ray.is_initialized() and not (tmp_path / "report").exists()
