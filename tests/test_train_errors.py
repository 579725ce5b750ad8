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
        (
            ["--config", "configs/tiny.yaml", "--set", "stage1.batch_size=-1"],
            r"tiny.yaml: stage1.batch_size=-1 must be >= 1",
        ),
        (
            ["--config", "configs/tiny.yaml", "--cpus-per-worker", "-1"],
            r"tiny.yaml: train.cpus_per_worker=-1.0 must be > 0",
        ),
        (["--config", "configs/tiny.yaml", "--set", "model.lr=-0.1"], r"tiny.yaml: model: option lr=-0.1 must be > 0"),
        (["--config", "configs/tiny.yaml", "--set", "stage3.lr=0"], r"tiny.yaml: stage3.lr=0.0 must be > 0"),
        (["--config", "configs/tiny.yaml", "--set", "train.num_workers=0"], r"train.num_workers=0 must be >= 1"),
        (
            ["--config", "configs/tiny.yaml", "--set", "train.gpus_per_worker=0"],
            r"train.gpus_per_worker=0.0 must be > 0",
        ),
        (["--config", "configs/tiny.yaml", "--set", "stage2.niter=-2"], r"stage2.niter=-2 must be >= 0"),
        (["--config", "configs/tiny.yaml", "--set", "sweep.trial_cpus=0"], r"sweep.trial_cpus=0.0 must be > 0"),
        (
            ["--config", "configs/tiny.yaml", "--set", "data.verify=sha265"],
            r"tiny.yaml: data.verify: 'sha265' is not one of sha256, size, none",
        ),
        (
            ["--config", "configs/tiny.yaml", "--set", "train.compile=inductr"],
            r"train.compile='inductr' is not auto, none, a torch.compile mode .* or a backend \(.*inductor",
        ),
        (["--config", "{tmp}/empty.yaml"], r"config file {tmp}/empty.yaml is empty"),
        (["--config", "configs/tiny.yaml", "--run-id", "../victim"], r"--run-id '../victim' is not a valid name"),
        (["--config", "configs/tiny.yaml", "--run-id", "{tmp}/abs"], r"--run-id '{tmp}/abs' is not a valid name"),
        (["--config", "configs/tiny.yaml", "--run-id", "../../etc"], r"--run-id '../../etc' is not a valid name"),
        (["--config", "configs/tiny.yaml", "--run-id", "/etc"], r"--run-id '/etc' is not a valid name"),
        (
            ["--config", "configs/tiny.yaml", "--run-id", "bob's run"],
            r"--run-id \"bob's run\" is not a valid name.*bob-s-run",
        ),
        (
            ["--config", "configs/tiny.yaml", "--stages", "2,3", "--from-run", "../x"],
            r"--from-run '../x' is not a valid name",
        ),
        (["--config", "configs/tiny.yaml", "--set", "dataset=a/b"], r"dataset 'a/b' is not a valid name"),
    ],
    ids=[
        "missing-config",
        "unknown-key",
        "no-manifest",
        "storage-not-writable",
        "no-earlier-stage",
        "stage-order",
        "label_nc",
        "negative-batch",
        "negative-cpus",
        "negative-lr",
        "zero-stage-lr",
        "zero-workers",
        "zero-gpus",
        "negative-niter",
        "zero-trial-cpus",
        "verify-typo",
        "compile-typo",
        "empty-yaml",
        "run-id-parent",
        "run-id-absolute",
        "run-id-etc",
        "run-id-root",
        "run-id-quote",
        "from-run-parent",
        "dataset-name",
    ],
)
def test_bad_input_fails_before_ray_starts(args, message, data_uri, tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]  # nothing written, not even a folder


def test_a_damaged_handover_checkpoint_is_caught_in_the_driver_and_names_the_good_one(data_uri, tmp_path, capsys):
    from model.step import TrainStep
    from orchestration import checkpoint
    from orchestration.config import load_config
    from orchestration.curriculum import RunPlan, preflight
    from orchestration.run_state import RunState, run_root

    cfg = load_config("configs/tiny.yaml")
    stage1 = tmp_path / "runs" / "r" / "stage1"
    older, newer = stage1 / "checkpoint_2026-11-26_10-00-01", stage1 / "checkpoint_2026-11-26_10-00-02"
    for epoch, where in ((2, older), (3, newer)):
        checkpoint.save(
            where, TrainStep(cfg.stage_model(1)), stage=1, epoch=epoch, global_step=epoch, lr=1e-4, config=cfg.to_dict()
        )
    RunState(run_root(str(tmp_path / "runs"), "r")).record(1, checkpoint=str(newer), epochs=3, global_step=3)
    state = newer / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))  # same size, one flipped bit

    args = [
        "--config",
        "configs/tiny.yaml",
        "--data",
        data_uri,
        "--storage",
        str(tmp_path / "runs"),
        "--run-id",
        "r",
        "--stages",
        "2,3",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"train: error: {newer}/state.pt does not match the sha256 in meta.json" in err
    assert (
        f"an older checkpoint of that stage verifies: {older} (epoch 2); start from it with --init-checkpoint {older}"
        in err
    )
    assert not ray.is_initialized()

    plan = RunPlan(cfg, "r", [2, 3], data_uri, str(tmp_path / "runs"), init_checkpoint=str(older))
    assert preflight(plan, log=lambda m: None)[2] == {2: str(older)}
    with pytest.raises(Exception, match="is a stage 1 checkpoint; stage 3 starts from a stage 2 one"):
        preflight(RunPlan(cfg, "r", [3], data_uri, str(tmp_path / "runs"), init_checkpoint=str(older)), log=print)
