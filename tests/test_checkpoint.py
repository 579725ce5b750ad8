import json

import pytest
import torch

from model.step import TrainStep
from orchestration.run import checkpoint
from orchestration.run.checkpoint import CheckpointError
from tests.conftest import tiny_batch, tiny_options


def test_round_trip_restores_training_exactly(tmp_path, opt):
    batch = tiny_batch(opt)
    a = TrainStep(opt)
    a.step(batch)
    checkpoint.save(tmp_path, a, stage=1, epoch=3, global_step=12, lr=1e-4, config={"name": "x"})
    state = checkpoint.load(tmp_path)
    assert (state["epoch"], state["global_step"], state["stage"]) == (3, 12, 1)
    assert state["config"] == {"name": "x"}
    expected_noise = torch.rand(3)
    b = TrainStep(tiny_options(), seed=9)
    checkpoint.restore(b, state)
    assert torch.equal(torch.rand(3), expected_noise)  # RNG restored to where it was saved
    torch.manual_seed(0)
    la = a.step(batch)
    torch.manual_seed(0)
    lb = b.step(batch)
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_partial_checkpoints_are_refused(tmp_path, opt):
    checkpoint.save(tmp_path, TrainStep(opt), stage=1, epoch=1, global_step=1, lr=1e-4, config={})
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(data[: len(data) // 2])  # upload cut short
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        checkpoint.load(tmp_path)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="has no meta.json: a partly written checkpoint"):
        checkpoint.load(tmp_path)


class NotATensor:
    pass


def test_errors_name_the_stored_checkpoint_not_a_temporary_copy_and_give_no_unsafe_advice(tmp_path, opt):
    """A worker reads a copy in a temporary folder: its errors name the checkpoint in storage. A state.pt holding
    objects other than tensors (its sha256 in meta.json, as a checkpoint of another program would be) is refused
    without PyTorch's advice to load it with weights_only=False."""
    import hashlib

    from orchestration.training.worker import _load_checkpoint_uri

    stored = tmp_path / "runs" / "r" / "stage1" / "checkpoint_0"
    checkpoint.save(stored, TrainStep(opt), stage=1, epoch=1, global_step=1, lr=1e-4, config={})
    torch.save({"G": NotATensor()}, stored / "state.pt")
    meta = json.loads((stored / "meta.json").read_text())
    meta["sha256"] = hashlib.sha256((stored / "state.pt").read_bytes()).hexdigest()
    (stored / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        _load_checkpoint_uri(str(stored))
    message = str(e.value)
    assert message.startswith(f"{stored}/state.pt does not load as tensors (it holds objects other than tensors)")
    assert "p2p-checkpoint-" not in message and "weights_only=False, which would run code" in message
    assert "Re-running" not in message and "trust the source" not in message
    (stored / "state.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=rf"^{stored}/state.pt does not match the sha256 in meta.json"):
        _load_checkpoint_uri(str(stored))


def test_stage2_starts_from_stage1(opt):
    s1 = TrainStep(tiny_options(netG="global", ngf=8, num_D=1))
    s1.step(tiny_batch(s1.opt))
    s2 = TrainStep(tiny_options(netG="local", ngf=4, num_D=2))
    report = checkpoint.init_from_previous_stage(s2, s1.state_dict(), 2)
    assert "D scales 0..0 new" in report
    for name, t in s2.G.model.state_dict().items():
        assert torch.equal(t, s1.G.model.state_dict()[name])
    # stage 1's only D scale (half resolution) is stage 2's second scale
    for name, t in s1.D.scales[0].state_dict().items():
        assert torch.equal(s2.D.scales[1].state_dict()[name], t)
    assert not s2.opt_G.state  # fresh optimizers


def test_a_full_disk_leaves_no_half_written_checkpoint_and_says_so_in_one_line(tmp_path, opt, monkeypatch):
    import errno

    def save_half(obj, f):
        f.write(b"\x80\x02partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", save_half)
    where = tmp_path / "checkpoint_0"
    with pytest.raises(CheckpointError, match=rf"^cannot write checkpoint {where}: No space left on device$"):
        checkpoint.save(where, TrainStep(opt), stage=1, epoch=1, global_step=1, lr=1e-4, config={})
    assert list(where.iterdir()) == []  # no truncated state.pt, no meta.json, no .tmp


def test_on_a_real_full_disk_nothing_half_written_stays_and_the_error_is_not_a_fault(small_disk, opt):
    """WEAK (c) on a real file system out of space: an image write (what the workers' epoch images go through) and a
    checkpoint leave no .tmp, truncated state.pt or meta.json; the image's error is StorageRefused (not retried by
    Train's failure policy) naming the path."""
    from data import storage
    from orchestration.cluster.failures import INPUT_ERRORS

    (small_disk / "filler").write_bytes(b"x" * (360 << 10))
    image = storage.resolve(small_disk / "images" / "epoch_0001.png")
    with pytest.raises(storage.StorageRefused, match=rf"cannot write {image.uri}: .*No space left on device") as e:
        storage.write_bytes_atomic(image, b"\x89PNG" + bytes(200 << 10))
    assert isinstance(e.value, INPUT_ERRORS)
    where = small_disk / "checkpoint_0"
    with pytest.raises(CheckpointError, match=rf"^cannot write checkpoint {where}: No space left on device$"):
        checkpoint.save(where, TrainStep(opt), stage=1, epoch=1, global_step=1, lr=1e-4, config={})
    assert sorted(p.name for p in small_disk.rglob("*")) == ["checkpoint_0", "filler", "images"]


def test_the_config_is_stored_as_run_json_holds_it_and_old_checkpoints_still_read(tmp_path, opt):
    """One form: a checkpoint's config is the dict run.json holds (it was a JSON string); both read back alike."""
    import json

    config = {"name": "x", "train": {"num_workers": [1, 2]}}
    checkpoint.save(tmp_path / "new", TrainStep(opt), stage=1, epoch=1, global_step=1, lr=1e-4, config=config)
    state = checkpoint.load(tmp_path / "new")
    assert state["config"] == config and checkpoint.stored_config(state) == config
    assert checkpoint.stored_config({"config": json.dumps(config, sort_keys=True)}) == config  # before 2026-12-07


def test_resume_keeps_the_generator_average_and_stages_hand_it_on(tmp_path):
    """model.ema_beta: the average (and its update count) is checkpointed; a resumed step averages on exactly as
    the uninterrupted one; the average, not the raw weights, is what is validated and what stage 2 starts from."""
    opt = tiny_options(ema_beta=0.99, instance_feat=True)
    batch = tiny_batch(opt)
    a = TrainStep(opt)
    for _ in range(3):
        a.step(batch)
    assert a.G_avg.updates == 3 and a.G_eval is a.G_avg.module
    assert any(not torch.equal(p, q) for p, q in zip(a.G.parameters(), a.G_eval.parameters(), strict=True))
    checkpoint.save(tmp_path, a, stage=3, epoch=1, global_step=3, lr=1e-4, config={})
    b = TrainStep(opt, seed=5)
    checkpoint.restore(b, checkpoint.load(tmp_path))
    assert b.G_avg.updates == 3 and b.E_avg.updates == 3
    torch.manual_seed(0)
    a.step(batch)
    torch.manual_seed(0)
    b.step(batch)
    for x, y in ((a.G_eval, b.G_eval), (a.E_eval, b.E_eval)):
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values(), strict=True))
    # a checkpoint without an average (ema turned on later) starts one from its weights, said by the stage report
    plain = TrainStep(tiny_options(instance_feat=True))
    c = TrainStep(opt)
    assert "average starts here" in checkpoint.init_from_previous_stage(c, plain.state_dict(), 3)
    assert all(torch.equal(p, q) for p, q in zip(c.G.parameters(), c.G_eval.parameters(), strict=True))
    # stage 1 -> 2: G1 from stage 1's average
    s1 = TrainStep(tiny_options(netG="global", ngf=8, num_D=1, ema_beta=0.99))
    for _ in range(2):
        s1.step(tiny_batch(s1.opt))
    s2 = TrainStep(tiny_options(netG="local", ngf=4, num_D=2, ema_beta=0.99))
    assert "(stage 1's averages)" in checkpoint.init_from_previous_stage(s2, s1.state_dict(), 2)
    for name, t in s2.G.model.state_dict().items():
        assert torch.equal(t, s1.G_eval.model.state_dict()[name]) and torch.equal(s2.G_eval.model.state_dict()[name], t)
