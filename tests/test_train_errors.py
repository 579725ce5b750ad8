"""Bad input to jobs.train is a clear error before any worker (or Ray itself) starts."""

import pytest
import ray

from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city
from jobs.train import main


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    src = write_city(tmp / "src", count=4, height=64, width=128, workers=1)
    prepare(PrepareOptions("flat", str(src), str(tmp / "data"), workers=1), log=lambda m: None)
    return str(tmp / "data")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/missing.yaml"], r"config file configs/missing.yaml does not exist"),
        (
            ["--config", "configs/tiny.yaml", "--set", "stage1.nitre=3"],
            r"unknown key 'stage1.nitre' \(did you mean 'niter'\?\)",
        ),
        (["--config", "configs/tiny.yaml", "--data", "{tmp}/empty"], r"no manifest at {tmp}/empty/train/manifest.json"),
        (
            ["--config", "configs/tiny.yaml", "--storage", "{data}/train/manifest.json/runs"],
            r"cannot write .*manifest.json/runs",
        ),
        (
            ["--config", "configs/tiny.yaml", "--stages", "2,3", "--run-id", "never-ran"],
            r"run 'never-ran' .* has no finished stage 1; pass --from-run",
        ),
        (["--config", "configs/tiny.yaml", "--stages", "3,1"], r"--stages \[3, 1\]: give increasing stage numbers"),
        (
            ["--config", "configs/tiny.yaml", "--set", "model.no_instance=false", "--set", "model.label_nc=20"],
            r"model.label_nc=20 but the dataset .* has label_nc 35",
        ),
    ],
    ids=[
        "missing-config",
        "unknown-key",
        "no-manifest",
        "storage-not-writable",
        "no-earlier-stage",
        "stage-order",
        "label_nc",
    ],
)
def test_bad_input_fails_before_ray_starts(args, message, data_uri, tmp_path, capsys):
    fill = {"tmp": str(tmp_path), "data": data_uri}
    args = [a.format(**fill) for a in args]
    if "--data" not in args:
        args += ["--data", data_uri]
    if "--storage" not in args:
        args += ["--storage", str(tmp_path / "runs")]
    assert main(args) == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message.format(**fill), err), err
    assert not ray.is_initialized()
