"""Bad input to jobs.train is a clear error before any worker (or Ray itself) starts."""

from pathlib import Path

import pytest
import ray

from jobs.train import main
from tests.helpers import prepared_city, untrained_checkpoint


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return prepared_city(tmp_path_factory.mktemp("data"), count=8)  # one global batch of tiny.yaml


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
        (
            ["--config", "configs/tiny.yaml", "--set", "train.batch_size=8"],  # 8 samples: 4 per worker, batch 8
            r"stage 1: the train split of {data} has 8 sample\(s\), fewer than one global batch of 16 \(2 worker\(s\) x 8\)",
        ),
        (["--config", "{tmp}/two-stages.yaml"], r"two-stages.yaml: no stage3 section: each stage says how long"),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--set",
                "stage1.num_D=7",
                "--set",
                "stage2.num_D=7",
                "--set",
                "stage3.num_D=7",
            ],
            r"stage 1 on {data} \(128x64 images\): num_D=7 with n_layers_D=\d: at 32x64 \(height x width\) D's coarsest",
        ),
        (
            ["--config", "configs/tiny.yaml", "--set", "stage1.resize_or_crop=scale_width_and_crop"]
            + ["--set", "stage1.fine_size=128"],
            r"stage 1 on {data} \(128x64 images\): scale_width_and_crop: the loaded size 64x32 is smaller than fine_size 128",
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
        "fewer-samples-than-a-batch",
        "missing-stage-section",
        "num_D-too-large-for-the-image",
        "crop-larger-than-the-image",
    ],
)
def test_bad_input_fails_before_ray_starts(args, message, data_uri, tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    tiny = Path("configs/tiny.yaml").read_text()
    (tmp_path / "two-stages.yaml").write_text(tiny[: tiny.index("stage3:")])
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml", "two-stages.yaml"]  # nothing written


def test_a_damaged_handover_checkpoint_is_caught_in_the_driver_and_names_the_good_one(data_uri, tmp_path, capsys):
    from orchestration.run.config import load_config
    from orchestration.run.run_state import RunState, run_root
    from orchestration.training.curriculum import RunPlan, preflight

    cfg = load_config("configs/tiny.yaml")
    stage1 = tmp_path / "runs" / "r" / "stage1"
    older, newer = stage1 / "checkpoint_2026-11-26_10-00-01", stage1 / "checkpoint_2026-11-26_10-00-02"
    for epoch, where in ((2, older), (3, newer)):
        untrained_checkpoint(where, cfg, 1, epoch=epoch)
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


def test_a_run_id_resubmitted_with_another_config_is_refused_and_run_json_kept(data_uri, tmp_path, capsys):
    """A run is its config: another model width under a finished run's id is refused naming the keys,
    before Ray, and run.json stays byte for byte; keys of how it runs (workers' CPUs, logs) may change on resume."""
    from orchestration.run.config import load_config
    from orchestration.run.run_state import RunState, run_root
    from orchestration.training.curriculum import RunPlan, preflight

    runs = str(tmp_path / "runs")
    cfg = load_config("configs/tiny.yaml")
    RunState(run_root(runs, "r")).update(run_id="r", data_uri=data_uri, config=cfg.to_dict())
    before = (tmp_path / "runs" / "r" / "run.json").read_bytes()
    args = ["--config", "configs/tiny.yaml", "--data", data_uri, "--storage", runs, "--run-id", "r"]
    assert main([*args, "--set", f"model.ngf={cfg.model.ngf * 2}", "--set", "stage1.lr=0.001"]) == 2
    err = capsys.readouterr().err
    assert f"run r in {runs}/r was trained with another config: model.ngf, stage1.lr differ from its run.json" in err
    assert "--run-id NEW_ID (with --from-run r --stages K" in err
    assert (tmp_path / "runs" / "r" / "run.json").read_bytes() == before
    assert not ray.is_initialized()
    resumed = load_config("configs/tiny.yaml", ["train.cpus_per_worker=0.5", "train.ray_logs=info"])
    preflight(RunPlan(resumed, "r", [1, 2, 3], data_uri, runs), log=lambda m: None)  # operational keys: allowed


def test_a_second_job_on_a_run_being_written_is_refused_at_once_naming_the_holder(data_uri, tmp_path, capsys):
    """One writer per run: a job whose run's lease is held (fresh heartbeat) by another is refused before Ray,
    naming the holder and --take-over; a stale lease (a driver killed -9) is taken over; a released one is gone."""
    import json
    import time

    from orchestration.run import run_lease
    from orchestration.run.run_state import run_root

    runs = str(tmp_path / "runs")
    root = run_root(runs, "r")
    args = ["--config", "configs/tiny.yaml", "--data", data_uri, "--storage", runs, "--run-id", "r"]
    holder = run_lease.RunLease(root, "r").acquire()
    try:
        t0 = time.monotonic()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "run r is being written by " in err and "one job writes a run at a time" in err, err
        assert "rerun with --take-over" in err and time.monotonic() - t0 < 10
        assert not ray.is_initialized()
        second = run_lease.RunLease(root, "r")
        with pytest.raises(run_lease.RunLeaseHeld):
            second.acquire()
        taken = run_lease.RunLease(root, "r", take_over=True, log=print).acquire()  # the holder is "dead"
        assert "taking over the lease" in capsys.readouterr().out
        assert json.loads((tmp_path / "runs" / "r" / "lease.json").read_text())["token"] == taken.token
        taken.release()
    finally:
        holder.release()  # no longer the holder: leaves the file alone
    assert not (tmp_path / "runs" / "r" / "lease.json").exists()
    stale = {"owner": "gone pid 1", "job": None, "token": "x", "taken": 0, "heartbeat": time.time() - 1000}
    (tmp_path / "runs" / "r" / "lease.json").write_text(json.dumps(stale))
    with run_lease.RunLease(root, "r", log=print):  # heartbeat 1000 s old: taken over without --take-over
        assert "its heartbeat is 1000s old" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "r" / "lease.json").exists()


def test_a_starting_checkpoint_of_other_networks_is_refused_in_the_driver_from_its_meta(data_uri, tmp_path, capsys):
    """WEAK (a): a --from-run whose stage 1 trained other networks (model.ngf), or an --init-checkpoint of stage 2
    with another n_blocks_local, is refused before Ray from meta.json's shapes (no tensor loaded), naming a tensor and
    the model keys: not found by each worker in turn, three tries and a size-mismatch traceback."""
    import time

    from orchestration.run import checkpoint
    from orchestration.run.config import load_config
    from orchestration.run.run_state import RunState, run_root

    runs = str(tmp_path / "runs")
    tiny = load_config("configs/tiny.yaml")
    wide = load_config("configs/tiny.yaml", [f"model.ngf={tiny.model.ngf * 2}"])
    one = untrained_checkpoint(tmp_path / "runs" / "wide" / "stage1" / "checkpoint_0", wide, 1)
    RunState(run_root(runs, "wide")).record(1, checkpoint=str(one), epochs=1, global_step=1)
    deep = load_config("configs/tiny.yaml", [f"model.n_blocks_local={tiny.model.n_blocks_local + 1}"])
    two = untrained_checkpoint(tmp_path / "two", deep, 2)
    args = ["--config", "configs/tiny.yaml", "--data", data_uri, "--storage", runs]
    t0 = time.monotonic()
    assert main([*args, "--run-id", "b", "--from-run", "wide", "--stages", "2,3"]) == 2
    err = capsys.readouterr().err
    assert f"{one} holds networks of another shape than this config's stage 2 loads: G." in err, err
    assert f"It was trained with model.ngf={tiny.model.ngf * 2} (this config: {tiny.model.ngf})" in err
    assert main([*args, "--run-id", "c", "--stages", "3", "--init-checkpoint", str(two)]) == 2
    err = capsys.readouterr().err
    assert f"{two} holds networks of another shape than this config's stage 3 loads: G." in err, err
    assert f"model.n_blocks_local={tiny.model.n_blocks_local + 1} (this config: {tiny.model.n_blocks_local})" in err
    assert time.monotonic() - t0 < 40
    assert not ray.is_initialized()
    same = untrained_checkpoint(tmp_path / "same", tiny, 1)
    meta = checkpoint.verify(str(same))
    assert checkpoint.architecture_differences(meta, 2, tiny.stage_model(1), tiny.stage_model(2)) == []
    more_d = load_config(
        "configs/tiny.yaml", ["stage2.num_D=3", "stage3.num_D=3"]
    )  # a new coarsest scale: D loads by name
    assert checkpoint.architecture_differences(meta, 2, more_d.stage_model(1), more_d.stage_model(2)) == []


def test_a_checkpoint_replaced_after_its_stage_is_neither_trained_from_nor_registered(data_uri, tmp_path, capsys):
    """Item 4: run.json names each stage's checkpoint by its sha256. A checkpoint folder swapped for another valid
    one (its own meta.json agrees with it) is refused by the next stage and by registration, before Ray or MLflow."""
    import shutil

    from orchestration.records.registry import register_run
    from orchestration.run import checkpoint
    from orchestration.run.config import ConfigError, load_config
    from orchestration.run.run_state import RunState, run_root

    cfg = load_config("configs/tiny.yaml")
    runs = tmp_path / "runs"
    root = run_root(str(runs), "r")

    one = untrained_checkpoint(runs / "r" / "stage1" / "checkpoint_0", cfg, 1, seed=0)
    RunState(root).record(1, checkpoint=str(one), checkpoint_sha256=checkpoint.stored_sha256(str(one)), epochs=1)
    other = untrained_checkpoint(tmp_path / "other", cfg, 1, seed=1)
    shutil.rmtree(one)
    shutil.copytree(other, one)  # verifies on its own: not what run.json recorded
    args = ["--config", "configs/tiny.yaml", "--data", data_uri, "--storage", str(runs), "--run-id", "r"]
    assert main([*args, "--stages", "2,3"]) == 2
    err = capsys.readouterr().err
    assert f"{one} is not the checkpoint its run recorded: its state.pt has sha256 " in err, err
    assert "(replaced since stage 1 finished)" in err
    assert not ray.is_initialized()

    three = untrained_checkpoint(runs / "r" / "stage3" / "checkpoint_0", cfg, 3, seed=2)
    RunState(root).record(3, checkpoint=str(three), checkpoint_sha256="0" * 64, epochs=1)
    RunState(root).update(data_uri=data_uri, config=cfg.to_dict())
    with pytest.raises(ConfigError, match=r"run.json's stage 3 names 000000000000...: the checkpoint was replaced"):
        register_run(root, "http://127.0.0.1:9/never-asked")
