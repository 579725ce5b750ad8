from pathlib import Path

import pytest

from orchestration.run.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.stage_model(1).netG == "global" and cfg.stage_model(2).netG == "local"
    # G1 of stage 1 is the enhancer's global part: ngf * 2^n_local_enhancers
    assert cfg.stage_model(1).ngf == cfg.model.ngf * 2**cfg.model.n_local_enhancers


def test_paper_recipe_is_the_papers():
    cfg = load_config("configs/cityscapes_1024p.yaml")
    assert (cfg.stage_model(1).ngf, cfg.stage_model(1).num_D, cfg.stage_model(2).num_D) == (64, 2, 3)
    assert cfg.stage_geometry(1).load_size_of(1024, 2048) == (512, 1024)
    assert cfg.stage_geometry(2).load_size_of(1024, 2048) == (1024, 2048)
    assert cfg.stage2.niter_fix_global == 10 and cfg.model.label_nc == 35


def test_overrides_and_their_errors(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["stage2.niter=5", "train.use_gpu=true", "model.gan_mode=hinge"])
    assert cfg.stage2.niter == 5 and cfg.train.use_gpu and cfg.stage_model(3).gan_mode == "hinge"
    with pytest.raises(ConfigError, match=r"tiny.yaml: unknown key 'stage2.nitre' \(did you mean 'niter'\?\)"):
        load_config("configs/tiny.yaml", ["stage2.nitre=5"])
    with pytest.raises(ConfigError, match=r"stage2.niter: expected an integer, got 'five'"):
        load_config("configs/tiny.yaml", ["stage2.niter=five"])
    with pytest.raises(ConfigError, match=r"tiny.yaml: model.gan_mode: 'wgan' is not one of lsgan, vanilla, hinge"):
        load_config("configs/tiny.yaml", ["model.gan_mode=wgan"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("configs/tiny.yaml", ["stage2.niter"])


def test_unknown_key_in_the_file_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  ngf: 16\n  n_blocks_globl: 3\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown key 'model.n_blocks_globl' \(did you mean 'n_blocks_global'\?\)"
    ):
        load_config(p)


def test_missing_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config file .* cannot be read"):
        load_config(tmp_path)  # a folder
    (tmp_path / "x.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "x.yaml")


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="niter_fix_global=9 exceeds stage 2's 2 epochs"):
        load_config("configs/tiny.yaml", ["stage2.niter_fix_global=9"])
    with pytest.raises(ConfigError, match="stage3.num_D must equal stage2.num_D"):
        load_config("configs/tiny.yaml", ["stage3.num_D=3"])
    with pytest.raises(ConfigError, match=r"stage1.niter_fix_global: only stage 2"):
        load_config("configs/tiny.yaml", ["stage1.niter_fix_global=1"])


def test_a_config_in_object_storage_loads_like_a_file(bucket):
    import boto3

    name = bucket.removeprefix("s3://")
    boto3.client("s3").put_object(Bucket=name, Key="sweeps/best.yaml", Body=Path("configs/tiny.yaml").read_bytes())
    cfg = load_config(f"{bucket}/sweeps/best.yaml", ["stage2.niter=5"])
    assert cfg == load_config("configs/tiny.yaml", ["stage2.niter=5"])
    with pytest.raises(ConfigError, match=rf"config file {bucket}/sweeps/missing.yaml does not exist"):
        load_config(f"{bucket}/sweeps/missing.yaml")


def test_empty_and_non_mapping_files_are_refused(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(tmp_path / "empty.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_plans_hold_absolute_data_uris(tmp_path, monkeypatch):
    """Train workers run in their staging folder: a relative dataset path (make demo's outputs/demo/data) named
    nothing there and the segmenter's validation failed; plans make local URIs absolute, S3 ones stay."""
    from orchestration.training.curriculum import RunPlan
    from orchestration.training.segmenter_training import SegmenterPlan

    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"))
    assert RunPlan(cfg, "r", [1], "outputs/data", "runs").data_uri == str(tmp_path / "outputs" / "data")
    assert SegmenterPlan(cfg, "outputs/data", "runs", None).data_uri == str(tmp_path / "outputs" / "data")
    assert SegmenterPlan(cfg, "s3://bucket/data", "runs", None).data_uri == "s3://bucket/data"


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    text = Path("configs/tiny.yaml").read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "\nstage1:\n  niter: 9\n")
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("stage1:"))
    with pytest.raises(
        ConfigError, match=rf"twice.yaml is not valid YAML: key 'stage1' is given twice \(line {first} "
    ):
        load_config(twice)
    inner = tmp_path / "inner.yaml"
    inner.write_text(text.replace("stage1:", "stage1:\n  lr: 0.1\n  lr: 0.2", 1))
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice"):
        load_config(inner)
    # keys a YAML merge (`<<: *anchor`) brings in may be overridden: that is not a duplicate
    merged = tmp_path / "merged.yaml"
    merged.write_text(text.replace("stage1:", "stage1: &s1", 1).replace("stage3:", "stage3:\n  <<: *s1", 1))
    cfg = load_config(merged)
    assert cfg.stage3.load_size == cfg.stage1.load_size  # merged from stage1
    assert (cfg.stage3.niter, cfg.stage3.num_D) != (cfg.stage1.niter, cfg.stage1.num_D)  # stage3's own
