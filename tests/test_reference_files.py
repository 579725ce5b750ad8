"""NVIDIA's pix2pixHD files in and out (jobs.import_reference, jobs.export --format reference). The reference's
folder is built here from its documented layout (no reference code needed): G and E state dicts as they are, D's
scale i layer j as `scale{i}_layer{j}` with scale num_D-1 on the full-resolution input, the clusters as the dict
encode_features.py saves with np.save, and opt.txt's `name: value` lines."""

import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.networks import downsample_input
from model.step import TrainStep
from orchestration.records.registry import build_bundle, stored_clusters
from orchestration.run import checkpoint
from orchestration.run.config import load_config
from orchestration.run.run_state import RunState, run_root
from tests.helpers import prepared_city
from tests.services import free_port, serving

TINY = ["model.instance_feat=true"]


def reference_d_names(state: dict, num_D: int) -> dict:
    """The documented rule, written out here: this project's scale k (k = 0 at full resolution) is the reference's
    scale num_D-1-k; its block j is the reference's layer j."""
    out = {}
    for name, t in state.items():
        k, j, rest = re.fullmatch(r"scales\.(\d+)\.layers\.(\d+)\.(.+)", name).groups()
        out[f"scale{num_D - 1 - int(k)}_layer{j}.{rest}"] = t
    return out


OPT_TXT = """------------ Options -------------
batchSize: 1
checkpoints_dir: ./checkpoints
dataroot: ./datasets/cityscapes/
feat_num: 3
gpu_ids: [0]
instance_feat: True
label_feat: False
label_nc: 35
n_blocks_global: 2
n_blocks_local: 1
n_downsample_E: 4
n_downsample_global: 2
n_layers_D: 2
n_local_enhancers: 1
name: label2city_tiny
ndf: 16
nef: 16
netG: local
ngf: {ngf}
no_instance: False
norm: instance
num_D: 2
-------------- End ----------------
"""


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """A reference checkpoints folder of trained-looking (seeded, not initial) networks and their clusters."""
    tmp = tmp_path_factory.mktemp("reference")
    prepared_city(tmp, count=4)
    cfg = load_config("configs/tiny.yaml", TINY)
    step = TrainStep(cfg.stage_model(3), seed=7)
    with torch.no_grad():
        for p in [*step.G.parameters(), *step.E.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp / "label2city_tiny"
    folder.mkdir()
    torch.save(step.G.state_dict(), folder / "latest_net_G.pth")
    torch.save(step.E.state_dict(), folder / "latest_net_E.pth")
    torch.save(reference_d_names(step.D.state_dict(), 2), folder / "latest_net_D.pth")
    g = np.random.default_rng(0)
    table = {7: g.normal(size=(3, 3)), 26: g.normal(size=(10, 3)), 24: g.normal(size=(1, 3))}  # road, car, person
    np.save(folder / "features_clustered_010.npy", table)
    (folder / "opt.txt").write_text(OPT_TXT.format(ngf=8))
    return {"tmp": tmp, "folder": folder, "step": step, "table": table}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def imported(reference_dir):
    tmp, folder = reference_dir["tmp"], reference_dir["folder"]
    args = f"--checkpoints {folder} --opt {folder / 'opt.txt'} --config configs/tiny.yaml --to-run ref1"
    r = cli("jobs.import_reference", *args.split(), "--storage", str(tmp / "runs"), "--data", str(tmp / "data"))
    assert r.returncode == 0, r.stderr[-3000:]
    return {**reference_dir, "log": r.stdout + r.stderr, "root": run_root(str(tmp / "runs"), "ref1")}


def test_import_writes_a_stage3_checkpoint_that_renders_as_the_original_and_exports_the_same_tensors(imported):
    folder, tmp = imported["folder"], imported["tmp"]
    assert "optimizers fresh" in imported["log"] and "--init-checkpoint" in imported["log"]
    state = RunState(imported["root"]).done(3)
    ckpt = checkpoint.fetch(state["checkpoint"], tmp / "fetched")
    cfg = load_config("configs/tiny.yaml", TINY)
    # rendered: the imported checkpoint's generator (the registry's bundle) = the original networks and clusters
    clusters = stored_clusters(imported["root"], state["checkpoint"])
    assert clusters is not None and clusters[1][7] == 3 and clusters[1][26] == 10 and clusters[1][24] == 1
    bundle = build_bundle(cfg, ckpt, 3, str(tmp / "data"), clusters=clusters)
    from model.bundle import Pix2PixHDGenerator

    original = Pix2PixHDGenerator(bundle.options, imported["step"].G.eval(), imported["step"].E, *clusters)
    label = torch.full((2, 64, 128), 7)
    label[:, 20:40, 30:70], label[:, 40:60, 80:100] = 26, 24
    inst = torch.where(label == 7, 7, label * 1000 + 1)
    x = torch.stack([label, inst], 1)
    assert torch.equal(bundle.render(x, {26001: 9}, seed=3), original.render(x, {26001: 9}, seed=3))
    # out again: the same bytes per tensor, under the reference's names
    out = tmp / "exported"
    r = cli("jobs.export", "--model", state["checkpoint"], "--format", "reference", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    for net in ("G", "D", "E"):
        before = torch.load(folder / f"latest_net_{net}.pth", weights_only=True)
        after = torch.load(out / f"latest_net_{net}.pth", weights_only=True)
        assert list(after) == list(before) or sorted(after) == sorted(before)
        for name, t in before.items():
            assert after[name].dtype == t.dtype and after[name].numpy().tobytes() == t.numpy().tobytes(), (net, name)
    table = np.load(out / "features_clustered_010.npy", allow_pickle=True).item()  # our own file, as the reference
    assert sorted(table) == sorted(imported["table"])
    for c, rows in imported["table"].items():
        assert np.array_equal(table[c].astype(np.float32), rows.astype(np.float32))
    assert "ngf: 8" in (out / "opt.txt").read_text() and "netG: local" in (out / "opt.txt").read_text()


def test_the_reference_discriminator_keeps_its_scales_meaning(imported):
    """The reference applies scale num_D-1 to the full-resolution input: the imported D's outputs are those of the
    reference's forward over its own named scales."""
    from model.networks import NLayerDiscriminator

    folder = imported["folder"]
    ref = torch.load(folder / "latest_net_D.pth", weights_only=True)
    step = TrainStep(load_config("configs/tiny.yaml", TINY).stage_model(3))
    ckpt = checkpoint.fetch(RunState(imported["root"]).done(3)["checkpoint"], imported["tmp"] / "d")
    step.D.load_state_dict(ckpt["D"])
    x = torch.randn(1, step.opt.discriminator_input_nc, 64, 128)
    nets = []
    for i in range(2):
        net = NLayerDiscriminator(step.opt.discriminator_input_nc, 16, 2)
        net.load_state_dict(
            {n.split("_", 1)[1].replace("layer", "layers.", 1): t for n, t in ref.items() if n.startswith(f"scale{i}_")}
        )
        nets.append(net)
    expected, down = [], x
    for i in range(2):  # the reference's MultiscaleDiscriminator.forward
        expected.append(nets[2 - 1 - i](down))
        down = downsample_input(down)
    got = step.D(x)
    for a, b in zip(got, expected, strict=True):
        for fa, fb in zip(a, b, strict=True):
            assert torch.equal(fa, fb)


def test_options_that_differ_are_named_with_the_first_tensor_that_does_not_fit(reference_dir, tmp_path):
    folder = reference_dir["folder"]
    wrong = tmp_path / "opt.txt"
    wrong.write_text(OPT_TXT.format(ngf=16))
    args = f"--checkpoints {folder} --opt {wrong} --config configs/tiny.yaml --to-run bad --storage {tmp_path}"
    r = cli("jobs.import_reference", *args.split())
    assert r.returncode == 2, r.stderr
    assert (
        f"{folder}/latest_net_G.pth has model.1.weight of shape (16, 39, 7, 7); this project's G expects (32,"
        in r.stderr
    )
    assert "probably ngf" in r.stderr
    assert not (tmp_path / "bad").exists()  # nothing written


def test_a_cluster_file_that_would_run_code_is_refused_unopened(reference_dir, tmp_path):
    from model.reference import ReferenceError, read_clusters

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "features_clustered_010.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(Boom(), f)
    with pytest.raises(ReferenceError, match="is not a cluster file of encode_features.py .*builtins.print"):
        read_clusters(path, 35, 3)
    # the real thing reads back as written, centres in file order
    centres, counts = read_clusters(reference_dir["folder"] / "features_clustered_010.npy", 35, 3)
    assert counts.tolist() == [3 if c == 7 else 10 if c == 26 else 1 if c == 24 else 0 for c in range(35)]
    assert torch.equal(centres[26, :10], torch.from_numpy(reference_dir["table"][26]).float())


def test_a_version_registered_from_reference_files_renders_through_mlflow_models_serve(reference_dir, tmp_path):
    """--register: a version of the imported networks and clusters; `mlflow models serve` answers a map with the
    image the original networks render for it."""
    import json
    import os
    import urllib.request

    from model.bundle import Pix2PixHDGenerator

    folder, data = reference_dir["folder"], reference_dir["tmp"] / "data"
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    args = f"--checkpoints {folder} --opt {folder / 'opt.txt'} --config configs/tiny.yaml --register"
    args += f" --storage {tmp_path / 'runs'} --data {data} --tracking-uri {tracking}"
    r = cli("jobs.import_reference", *args.split())
    assert r.returncode == 0, r.stderr[-3000:]
    uri = re.search(r"(models:/pix2pixhd-synthetic-city/\d+)", r.stdout).group(1)
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    label = torch.full((1, 64, 128), 7)
    label[:, 20:40, 30:70] = 26
    maps = torch.stack([label, torch.where(label == 7, 7, 26001)], 1)
    with serving(cmd, env, tmp_path / "serve.log", f"http://127.0.0.1:{port}/ping", 180):
        body = {"inputs": maps.tolist(), "params": {"styles": '{"26001": 4}', "seed": 2}}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as answer:
            served = torch.tensor(json.loads(answer.read())["predictions"])
    step = reference_dir["step"]
    table = reference_dir["table"]
    centres, counts = torch.zeros(35, 10, 3), torch.zeros(35, dtype=torch.long)
    for c, rows in table.items():
        centres[c, : len(rows)], counts[c] = torch.from_numpy(rows).float(), len(rows)
    original = Pix2PixHDGenerator(dict(vars(step.opt)), step.G.eval(), step.E, centres, counts).render(
        maps, {26001: 4}, seed=2
    )
    assert (served - original).abs().max() < 1e-5


def test_a_discriminator_trained_without_feature_matching_maps_its_flat_layers():
    """--no_ganFeat_loss: the reference keeps each scale as one flat Sequential, `layer{i}.{n}`; its output is the
    last of this project's blocks run in order."""
    from model.reference import discriminator_from_reference, discriminator_to_reference

    opt = load_config("configs/tiny.yaml", ["model.no_ganFeat_loss=true"]).stage_model(3)
    step = TrainStep(opt, seed=3)
    flat = discriminator_to_reference(step.D.state_dict(), opt)
    assert all(re.fullmatch(r"layer[01]\.\d+\.(weight|bias)", n) for n in flat), sorted(flat)[:4]
    assert discriminator_from_reference(flat, opt).keys() == step.D.state_dict().keys()
    x = torch.randn(1, opt.discriminator_input_nc, 64, 128)
    full = step.D.scales[0]  # full resolution: the reference's scale num_D-1
    sequential = torch.nn.Sequential(*[m for block in full.layers for m in block])
    sequential.load_state_dict(
        {n.split(".", 1)[1]: t for n, t in flat.items() if n.startswith(f"layer{opt.num_D - 1}.")}
    )
    assert torch.equal(sequential(x), full(x)[-1])
