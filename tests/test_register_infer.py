"""jobs.register (idempotent, retried, bounded when the server is down) and jobs.infer's checks before it writes
anything, against a real (sqlite) MLflow store and a finished run made without training."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from orchestration.run.config import load_config
from orchestration.run.run_state import RunState, run_root
from tests.helpers import untrained_checkpoint
from tests.services import finished_run, free_port

MODEL = "pix2pixhd-synthetic-city"


def cli(*args, timeout=300, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run whose stage 3 finished (an untrained generator with instance features), the dataset it names, and a
    sqlite registry."""
    tmp = tmp_path_factory.mktemp("finished")
    finished_run(tmp, "r1")
    finished_run(tmp, "half", stage=1)
    src, storage_uri = tmp / "src", str(tmp / "runs")
    return {"storage": storage_uri, "tracking": f"sqlite:///{tmp}/mlflow.db", "src": src, "tmp": tmp}


def register(finished, run_id="r1", tracking=None):
    tracking = tracking or finished["tracking"]
    return cli(*f"jobs.register --run {run_id} --storage {finished['storage']} --tracking-uri {tracking}".split())


def test_register_creates_one_version_per_checkpoint(finished):
    first = register(finished)
    assert first.returncode == 0, first.stderr[-3000:]
    again = register(finished)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds" in again.stdout and "not registered again" in again.stdout
    versions = MlflowClient(registry_uri=finished["tracking"]).search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1 and versions[0].tags["checkpoint"].endswith("r1/stage3/checkpoint_0")
    state = RunState(run_root(finished["storage"], "r1")).data
    assert state["registered"]["version"] == versions[0].version


def test_register_refuses_a_run_without_stage3_and_a_bad_run_id(finished):
    r = register(finished, "half")
    assert r.returncode == 2 and "has no finished stage 3: nothing to register" in r.stderr
    r = register(finished, "../r1")
    assert r.returncode == 2 and "'../r1' is not a valid name" in r.stderr


def test_register_with_the_server_down_fails_in_seconds_naming_the_cause_and_the_retry(finished):
    down = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = register(finished, tracking=down)
    took = time.monotonic() - t0
    assert r.returncode == 3, r.stderr[-3000:]
    assert took < 60, took  # two attempts 5 s apart, no MLflow backoff
    assert "failed 2 times" in r.stderr and "ConnectionError" in r.stderr and "Traceback" in r.stderr
    assert f"python -m jobs.register --run r1 --storage {finished['storage']} --tracking-uri {down}" in r.stderr


@pytest.fixture(scope="module")
def registered(finished):
    r = register(finished)
    assert r.returncode == 0, r.stderr[-3000:]
    return finished


def infer(registered, out, *extra, model=f"models:/{MODEL}@champion", tracking=None, labels=None):
    labels = labels or registered["src"] / "train_label"
    tracking = tracking or registered["tracking"]
    return cli(*f"jobs.infer --model {model} --labels {labels} --out {out} --tracking-uri {tracking}".split(), *extra)


def test_infer_renders_every_label_map_and_a_style_sheet_per_class(registered, tmp_path):
    r = infer(registered, tmp_path / "out", "--instances", str(registered["src"] / "train_inst"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("*_synthesized.png"))) == 4
    road = Image.open(tmp_path / "out" / "styles_007_road.png")  # one tile (128 wide) per road style, titled
    assert road.width > 2 * 128 and "style sheets (each class's styles on" in r.stdout


def test_infer_takes_the_styles_of_a_photo_and_says_which_instances_it_styled(registered, tmp_path):
    src = registered["src"]
    photo, inst = sorted((src / "train_img").glob("*.png"))[1], sorted((src / "train_inst").glob("*.png"))[1]
    both = ("--instances", str(src / "train_inst"), "--style-photo", str(photo))
    r = infer(registered, tmp_path / "out", *both, "--style-instances", str(inst))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "styled as in the photo" in r.stdout and "not in it: styled by the seed's draw" in r.stdout
    assert len(list((tmp_path / "out").glob("*_synthesized.png"))) == 4
    r = infer(registered, tmp_path / "alone", *both)
    assert r.returncode == 2 and "--style-photo and --style-instances go together" in r.stderr


@pytest.mark.parametrize(
    "model, tracking, message",
    [
        (f"models:/{MODEL}-missing@champion", None, f"models:/{MODEL}-missing@champion: not in the registry at"),
        (
            f"models:/{MODEL}@champion",
            "down",
            f"models:/{MODEL}@champion: cannot reach the registry at http://127.0.0.1:",
        ),
    ],
    ids=["missing-model", "server-down"],
)
def test_a_model_that_cannot_be_loaded_is_one_line_in_seconds(registered, tmp_path, model, tracking, message):
    tracking = f"http://127.0.0.1:{free_port()}" if tracking == "down" else tracking
    t0 = time.monotonic()
    r = infer(registered, tmp_path / "out", model=model, tracking=tracking)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 2 and message in r.stderr, r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bad_pairs_and_sizes_are_named_before_any_output_is_written(registered, tmp_path):
    src = registered["src"]
    maps = tmp_path / "labels"
    maps.mkdir()
    insts = tmp_path / "insts"
    insts.mkdir()
    for f in sorted((src / "train_label").iterdir()):
        (maps / f.name).write_bytes(f.read_bytes())
    for f in sorted((src / "train_inst").iterdir()):
        (insts / f.name).write_bytes(f.read_bytes())
    last_inst = sorted(insts.iterdir())[-1]
    Image.fromarray(np.zeros((32, 64), np.uint16)).save(last_inst)
    out = tmp_path / "out"
    r = infer(registered, out, "--instances", str(insts), labels=maps)
    assert r.returncode == 2
    assert f"{last_inst} is 64x32 but its label map" in r.stderr and "is 128x64" in r.stderr
    assert not list(out.glob("*.png"))

    last_label = sorted(maps.iterdir())[-1]
    Image.fromarray(np.zeros((60, 128), np.uint8)).save(last_label)
    r = infer(registered, out, labels=maps)
    assert r.returncode == 2 and f"{last_label} is 128x60; this generator needs multiples of 8" in r.stderr
    Image.fromarray(np.full((64, 128), 200, np.uint8)).save(last_label)
    r = infer(registered, out, labels=maps)
    assert r.returncode == 2 and f"{last_label} holds label id 200; this generator knows ids 0..34" in r.stderr
    assert not list(out.glob("*.png"))


def test_an_output_path_that_cannot_be_written_is_named_before_the_model_loads(registered, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    missing = f"models:/{MODEL}-missing@champion"  # the model error would come first if the output were checked later
    r = infer(registered, a_file, model=missing)
    assert r.returncode == 2 and f"--out {a_file} is a file" in r.stderr
    r = infer(registered, a_file / "below", model=missing)
    assert r.returncode == 2 and f"--out {a_file / 'below'}: cannot write there" in r.stderr


NO_PICKLE = """
import pickle, sys
import cloudpickle, mlflow, numpy as np, torch

def refuse(*args, **kwargs):
    raise RuntimeError("unpickling is forbidden here")

class Refused:
    def __init__(self, *args, **kwargs):
        refuse()

pickle.load = pickle.loads = cloudpickle.load = cloudpickle.loads = refuse
pickle.Unpickler = Refused
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
print(model.predict(np.zeros((1, 2, 64, 128), np.int64)).shape)
"""


def test_the_registered_model_loads_with_unpickling_forbidden(registered):
    """A version is weights (tensors, read with weights_only) and options (JSON): nothing is unpickled."""
    r = subprocess.run(
        [sys.executable, "-c", NO_PICKLE, registered["tracking"], f"models:/{MODEL}@champion"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "(1, 3, 64, 128)"


@pytest.fixture(scope="module")
def served(registered):
    """`mlflow models serve` of the champion on 127.0.0.1 (this environment: --env-manager local)."""
    import os
    import urllib.request

    port = free_port()
    bin_dir = os.path.dirname(sys.executable)  # mlflow runs `uvicorn` from PATH: this environment's
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["tracking"], "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"mlflow models serve did not come up:\n{proc.stdout.read()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def post(url: str, body: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_mlflow_serves_the_champion_at_any_multiple_size_as_jobs_infer_renders_it(served, registered, tmp_path):
    """The version's signature leaves batch, height and width open (it used to pin them to a 16x16 example): a
    64x128 map with a style for its road and a seed is answered with the image jobs.infer writes for them."""
    from data.layouts import stem_of

    src = registered["src"]
    label_file, inst_file = (sorted((src / d).glob("*.png"))[0] for d in ("train_label", "train_inst"))
    stem = stem_of(label_file)
    assert stem_of(inst_file) == stem
    label = np.asarray(Image.open(label_file)).astype(np.int64)
    inst = np.asarray(Image.open(inst_file)).astype(np.int64)
    params = {"styles": '{"7": 1}', "seed": 3}
    status, body = post(served, {"inputs": np.stack([label, inst])[None].tolist(), "params": params})
    assert status == 200, body
    served_image = np.asarray(body["predictions"], np.float32)
    assert served_image.shape == (1, 3, 64, 128)
    r = infer(
        registered, tmp_path / "out", "--instances", str(src / "train_inst"), "--styles", '{"7": 1}', "--seed", "3"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rendered = np.asarray(Image.open(tmp_path / "out" / f"{stem}_synthesized.png")).astype(np.float32)
    as_png = np.clip(np.round((served_image[0].transpose(1, 2, 0) + 1) * 127.5), 0, 255)
    assert np.abs(as_png - rendered).max() <= 1
    # another size, a batch of two
    status, body = post(served, {"inputs": np.full((2, 2, 32, 64), 7, np.int64).tolist()})
    assert status == 200 and np.asarray(body["predictions"]).shape == (2, 3, 32, 64)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (np.zeros((1, 2, 30, 64), np.int64), "the maps are 30x64 (height x width); this generator needs multiples of"),
        (np.zeros((1, 2, 8, 16), np.int64), "needs multiples of 8, at least 16 (e.g. 16x16)"),  # G's residual pads
        (np.full((1, 2, 32, 64), 99, np.int64), "label ids [99] are outside 0..34"),
        (np.zeros((1, 3, 32, 64), np.int64), "inputs have shape (1, 3, 32, 64); expected (batch, 2, height, width)"),
        (np.full((1, 2, 32, 64), 7.9), "inputs are float64; label and instance maps are integer ids"),  # not 7
        (np.full((1, 2, 32, 64), 7.0), "inputs are float64"),  # JSON 7.0 is a float: ids are integers
    ],
    ids=["size", "too-small", "label-id", "channels", "float-map", "integral-float-map"],
)
def test_a_bad_request_is_a_400_that_names_the_problem(served, inputs, message):
    status, body = post(served, {"inputs": inputs.tolist()})
    assert status == 400 and message in body["message"], body


def test_styles_and_seed_are_request_params(served):
    """The road (instance 7) draws one of its class's styles from the seed; a style named explicitly is the same
    whatever the seed; a style past the class's clusters is refused by name."""
    maps = np.full((1, 2, 32, 64), 7, np.int64).tolist()

    def image(params):
        status, body = post(served, {"inputs": maps, "params": params})
        assert status == 200, body
        return np.asarray(body["predictions"])

    by_seed = [image({"seed": s}) for s in range(6)]
    assert any(not np.array_equal(by_seed[0], other) for other in by_seed[1:])  # 6 draws, >= 2 road styles
    assert np.array_equal(image({"seed": 1, "styles": '{"7": 0}'}), image({"seed": 2, "styles": '{"7": 0}'}))
    assert np.array_equal(image({"style_mode": "largest", "seed": 1}), image({"styles": '{"7": 0}'}))
    status, body = post(served, {"inputs": maps, "params": {"styles": '{"7": 10}'}})
    assert status == 400 and "style 10 for instance 7: class 7 has" in body["message"], body
    status, body = post(served, {"inputs": maps, "params": {"styles": "red"}})
    assert status == 400 and "it is a JSON object of instance id" in body["message"], body


def test_a_photos_styles_are_request_params(served, registered):
    """style_photo / style_instances (base64 files): the served image is the registered model's render with the
    styles E encodes from that photo; a photo without its instance map is a 400 naming the pair."""
    import base64

    from data.layouts import list_maps
    from orchestration.records.registry import load_generator
    from serving.maps import decode_ids, decode_photo

    src = registered["src"]
    name = sorted(list_maps(str(src / "train_label")))[0]
    files = {
        d: Path(list_maps(str(src / d))[name].path).read_bytes() for d in ("train_label", "train_inst", "train_img")
    }
    maps = torch.from_numpy(np.stack([decode_ids(files[d], d) for d in ("train_label", "train_inst")])[None])
    params = {
        k: base64.b64encode(files[d]).decode()
        for k, d in (("style_photo", "train_img"), ("style_instances", "train_inst"))
    }
    status, body = post(served, {"inputs": maps.tolist(), "params": params})
    assert status == 200, body
    bundle = load_generator(f"models:/{MODEL}@champion", registered["tracking"])
    photo = torch.from_numpy(decode_photo(files["train_img"], "photo"))[None]
    expected = bundle.render(maps, bundle.photo_styles(photo, maps[:, 1], maps).styles, seed=0)
    assert np.abs(np.asarray(body["predictions"]) - expected.numpy()).max() < 1e-5
    assert not np.allclose(np.asarray(body["predictions"]), bundle.render(maps, None, seed=0).numpy())
    status, body = post(served, {"inputs": maps.tolist(), "params": {"style_photo": params["style_photo"]}})
    assert status == 400 and "style_photo and style_instances go together" in body["message"], body


def test_a_version_registered_as_a_pickle_is_refused_not_unpickled(registered, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(registered["tracking"])
    mlflow.set_registry_uri(registered["tracking"])
    exp = mlflow.create_experiment("pickles", artifact_location=(tmp_path / "artifacts").as_uri())  # not ./mlruns
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="generator", serialization_format="pickle")
    mlflow.register_model(info.model_uri, "pickled-generator")
    r = infer(registered, tmp_path / "out", model="models:/pickled-generator/1")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "models:/pickled-generator/1: registered as a pickle (loading it would run code stored with it)" in r.stderr
    assert "python -m jobs.register" in r.stderr


def test_jobs_export_writes_an_onnx_graph_that_onnxruntime_runs_like_pytorch(registered, tmp_path):
    """The champion (with instance features: `features` is a second input) as ONNX with dynamic batch, height and
    width; onnxruntime at the traced size and at twice it matches PyTorch within 1e-4 (the job checks it)."""
    import onnxruntime as ort

    out = tmp_path / "generator.onnx"
    r = cli(
        *f"jobs.export --model models:/{MODEL}@champion --out {out}".split(), "--tracking-uri", registered["tracking"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "onnxruntime matches PyTorch within" in r.stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert set(inputs) == {"maps", "features"} and inputs["maps"][1] == 2
    assert all(isinstance(d, str) for d in (inputs["maps"][0], inputs["maps"][2], inputs["maps"][3]))  # dynamic
    maps = np.full((3, 2, 64, 128), 7, np.int64)
    (images,) = session.run(None, {"maps": maps, "features": np.zeros((3, 3, 64, 128), np.float32)})
    assert images.shape == (3, 3, 64, 128)


def test_cluster_features_runs_on_ray_over_the_whole_split_and_registration_stores_its_clusters(registered):
    """jobs.cluster_features: E over every training sample in Ray Data actors, the 1/64 rule, k-means++ per class,
    peak memory reported; jobs.register then puts exactly those clusters into the version's weights."""
    import mlflow

    cfg = load_config("configs/tiny.yaml", ["model.instance_feat=true"])
    state = RunState(run_root(registered["storage"], "styled"))
    state.update(run_id="styled", data_uri=str(registered["tmp"] / "data"), config=cfg.to_dict())
    ckpt = untrained_checkpoint(registered["tmp"] / "runs" / "styled" / "stage3" / "checkpoint_0", cfg, 3, seed=7)
    state.record(3, checkpoint=str(ckpt), epochs=1, global_step=1, metrics={"val_L1": 0.9})
    env_run = cli(*f"jobs.cluster_features --run styled --storage {registered['storage']}".split(), timeout=600)
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    out = env_run.stdout
    assert "instances larger than 1/64 of their image in 4 samples, clustered into" in out, out[-2000:]
    assert "peak memory: driver" in out and "encoder actor" in out
    stored = torch.load(registered["tmp"] / "runs" / "styled" / "clusters" / "stage3.pt", weights_only=True)
    assert stored["meta"]["checkpoint"] == str(ckpt) and stored["cluster_counts"].sum() > 0
    r = register(registered, run_id="styled")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "using the clusters jobs.cluster_features stored for this checkpoint" in r.stdout + r.stderr
    c = MlflowClient(tracking_uri=registered["tracking"], registry_uri=registered["tracking"])
    (version,) = [v for v in c.search_model_versions(f"name = '{MODEL}'") if v.tags.get("run_id") == "styled"]
    mlflow.set_tracking_uri(registered["tracking"])
    mlflow.set_registry_uri(registered["tracking"])
    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version.version}")._model_impl.bundle
    assert torch.equal(loaded.clusters, stored["clusters"])
    assert torch.equal(loaded.cluster_counts, stored["cluster_counts"])
    champion = c.get_model_version_by_alias(MODEL, "champion").version

    # a registered version: clustered again over the data it records, registered as a new version, alias kept
    again = cli(
        *f"jobs.cluster_features --model models:/{MODEL}/{version.version}".split(),
        "--tracking-uri",
        registered["tracking"],
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    new = c.get_model_version(MODEL, again.stdout.strip().rsplit("/", 1)[1])
    assert new.tags["clusters_of"] == f"{MODEL}/{version.version}" and new.tags["checkpoint"] == str(ckpt)
    assert "alias is unchanged" in again.stdout + again.stderr
    assert c.get_model_version_by_alias(MODEL, "champion").version == champion
    reclustered = mlflow.pyfunc.load_model(f"models:/{MODEL}/{new.version}")._model_impl.bundle
    assert torch.equal(reclustered.clusters, stored["clusters"])  # the same E over the same split: the same styles
    missing = cli(
        "jobs.cluster_features", "--model", "models:/no-such-model/1", "--tracking-uri", registered["tracking"]
    )
    assert missing.returncode == 2 and "cluster_features: error: models:/no-such-model/1" in missing.stderr


def test_a_swapped_weights_file_is_refused_by_every_loader(registered, tmp_path):
    """The version records the sha256 of each file it serves (its tags, and sha256.json beside the files):
    weights.pt swapped for other weights of the same network is refused by name by jobs.infer (registry loads)
    and by the module `mlflow models serve` runs, instead of rendering without a word."""
    import hashlib
    import shutil

    from model.networks import build_generator
    from orchestration.records.registry import DIGEST_TAG, load_generator
    from serving import pyfunc

    client = MlflowClient(tracking_uri=registered["tracking"], registry_uri=registered["tracking"])
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert {DIGEST_TAG + "weights.pt", DIGEST_TAG + "options.json"} <= set(version.tags)
    digest = version.tags[DIGEST_TAG + "weights.pt"]
    (weights,) = (  # the file in the artifact store: the one the tag names
        p for p in Path(registered["tmp"]).rglob(pyfunc.WEIGHTS) if hashlib.sha256(p.read_bytes()).hexdigest() == digest
    )
    original = tmp_path / "original.pt"
    shutil.copy(weights, original)
    bundle = load_generator(f"models:/{MODEL}@champion", registered["tracking"])
    state = torch.load(weights, weights_only=True)
    state["G"] = build_generator(bundle.opt).state_dict()  # the same network, other (fresh) weights
    torch.save(state, weights)
    try:
        r = infer(registered, tmp_path / "out")
        assert r.returncode == 2, r.stderr[-2000:]
        assert "weights.pt (sha256 " in r.stderr and "is not the file registered" in r.stderr, r.stderr[-2000:]
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))
        with pytest.raises(pyfunc.ArtifactMismatch, match="sha256.json beside it"):
            pyfunc._load_pyfunc(str(weights.parent))
    finally:
        shutil.copy(original, weights)
    assert infer(registered, tmp_path / "again").returncode == 0
