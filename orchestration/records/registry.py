"""Register the final generator in the MLflow model registry and move the `champion` alias when it is no worse.

Registered model: `pix2pixhd-<dataset>`. Each version carries tags: run id, the checkpoint it was built from,
config hash, data manifest sha256 and the validation metric; tags are set when the version is created (one
call), so a version never exists without them. One checkpoint gives at most one version: registering it again
finds the version by its `checkpoint` tag. The alias `champion` moves only when the new version's val_L1 is <=
the current champion's.

`register_run` is what `jobs.train` calls after stage 3 and what `python -m jobs.register --run RUN_ID` retries:
everything it needs is in the run's run.json and its final checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import re
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data import storage
from data.pipeline import iter_local_batches
from evaluation.segscore import EvaluationError
from model.averaging import shipped
from model.bundle import Pix2PixHDGenerator
from model.networks import build_encoder, build_generator
from model.styles import cluster, instance_features
from orchestration.records.tracking import RUN_TAG, STAGE_TAG, configure_mlflow_client, ensure_experiment, filter_value
from orchestration.run import checkpoint
from orchestration.run.config import Config, ConfigError, from_dict, pipeline_config
from orchestration.run.run_state import RunState
from serving import pyfunc

ALIAS = "champion"
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")
CLUSTERS_FILE = "clusters/stage3.pt"  # in a run's storage: jobs.cluster_features --run writes it
DIGEST_TAG = "sha256."  # version tags sha256.weights.pt, sha256.options.json: the files it serves
METRIC = "val_L1"  # lower is better; what versions are judged by without a segmenter or feature network
JUDGED_METRIC, JUDGED_VALUE, JUDGED_BY = "judged.metric", "judged.value", "judged.by"
PROJECT = Path(__file__).resolve().parents[2]  # the checkout: model/ and serving/ travel with a version
FINAL_STAGE = 3


class RegistrationError(RuntimeError):
    """The trained generator was not registered; the message says why and how to retry."""


def model_name(cfg: Config) -> str:
    return f"pix2pixhd-{cfg.dataset}"


def manifest_sha256(data_uri: str, split: str) -> str:
    return hashlib.sha256(storage.read_bytes(storage.resolve(data_uri).join(split, "manifest.json"))).hexdigest()


def build_bundle(cfg: Config, state: dict, k: int, data_uri: str, log=print, clusters=None) -> Pix2PixHDGenerator:
    """The generator of a checkpoint's `state`; with instance features, `clusters` (centres, counts) from
    jobs.cluster_features, else E's features clustered here over the training split."""
    opt = cfg.stage_model(k)
    G = build_generator(opt)
    G.load_state_dict(shipped(state, "G"))
    if opt.instance_feat:
        E = build_encoder(opt)
        E.load_state_dict(shipped(state, "E"))
        if clusters is not None:
            log("registry: using the clusters jobs.cluster_features stored for this checkpoint")
        clusters, counts = clusters if clusters is not None else _clusters(cfg, k, E, data_uri, log)
        return Pix2PixHDGenerator(asdict(opt), G.eval(), E, clusters, counts)
    return Pix2PixHDGenerator(asdict(opt), G.eval())


@torch.no_grad()
def _clusters(cfg: Config, k: int, E, data_uri: str, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """E's features of every instance larger than 1/64 of its image over the whole training split, clustered per
    class with k-means++ (model/styles.py, as the reference). Streams the split: memory holds the vectors only."""

    per_class: dict[int, list] = {}
    pcfg = dataclasses.replace(pipeline_config(cfg, k), instance_output="ids", batch_size=8)
    seen, t0 = 0, time.perf_counter()
    for b in iter_local_batches(data_uri, cfg.data.train_split, pcfg):  # model tensors: image (B, 3, H, W)
        for c, vector in instance_features(E.eval()(b["image"], b["inst"]), b["inst"]):
            per_class.setdefault(c, []).append(vector)
        seen += len(b["label"])
    kept = sum(len(v) for v in per_class.values())
    log(
        f"registry: {kept} instances (larger than 1/64 of the image) of {seen} training samples clustered per class "
        f"in {time.perf_counter() - t0:.0f}s"
    )
    return cluster(per_class, cfg.model.label_nc, cfg.model.feat_num)


def register_run(
    root: storage.Location, tracking_uri: str, log=print, data_uri: str | None = None, attempts: int = 2
) -> dict:
    """Register the final generator of the run stored at `root` ({storage}/{run_id}); idempotent. Raises
    ConfigError for a run with nothing to register, RegistrationError (with the full cause) when registering
    fails `attempts` times, 5 s apart."""
    state = RunState(root)
    run_id = state.data.get("run_id") or Path(root.path).name
    final = state.done(FINAL_STAGE)
    if final is None:
        raise ConfigError(f"run '{run_id}' in {root} has no finished stage {FINAL_STAGE}: nothing to register")
    data_uri = data_uri or state.data.get("data_uri")
    if not data_uri:
        raise ConfigError(f"{state.loc} does not record the dataset (an older run): pass --data URI")
    cfg = from_dict(state.data["config"]) if "config" in state.data else None
    retry = (
        f"python -m jobs.register --run {run_id} --storage {root.uri.rsplit('/', 1)[0]} --tracking-uri {tracking_uri}"
    )
    check_recorded_digests(state, final["checkpoint"], run_id)

    stored = stored_clusters(root, final["checkpoint"])
    for attempt in range(1, attempts + 1):
        try:
            result = register(
                run_id, cfg, final["checkpoint"], data_uri, judgement(state), tracking_uri, log, clusters=stored
            )
            break
        except Exception as e:  # noqa: BLE001 - reported in full below; the model is safe in storage
            cause = "".join(traceback.format_exception(e)).rstrip()
            if attempt == attempts:
                raise RegistrationError(
                    f"registering run '{run_id}' failed {attempts} times; the last error:\n{cause}\n"
                    f"The trained generator is safe at {final['checkpoint']}. Once the cause is fixed: {retry}"
                ) from e
            log(f"registry: attempt {attempt} failed ({type(e).__name__}: {e}); retrying in 5 s")
            time.sleep(5)
    state.update(registered={k: result[k] for k in ("name", "version", "checkpoint")})
    return result


def check_recorded_digests(state: RunState, final_checkpoint: str, run_id: str) -> None:
    """The final checkpoint is the one run.json recorded (and, when judged, the one its judgement scored): else its
    registered version would carry another model's name, run or score. Not retried: a ConfigError."""
    stored = checkpoint.stored_sha256(final_checkpoint)
    for what, entry in (("stage 3", state.done(FINAL_STAGE)), ("judgement", state.data.get("judgement"))):
        recorded = (entry or {}).get("checkpoint_sha256")
        if recorded and recorded != stored:
            raise ConfigError(
                f"run '{run_id}': {final_checkpoint} holds state.pt sha256 {(stored or '?')[:12]}..., but run.json's "
                f"{what} names {recorded[:12]}...: the checkpoint was replaced after training; not registered. "
                f"Restore it, or train the run again"
            )


def judgement(state: RunState) -> dict | None:
    """How the run's final generator was judged: run.json's judgement (a seg-score / KID / FID pass over the
    validation split), else the last epoch's val_L1."""
    if "judgement" in state.data:
        return state.data["judgement"]
    value = (state.done(FINAL_STAGE).get("metrics") or {}).get(METRIC)
    return None if value is None else {"metric": METRIC, "mode": "min", "value": value, "judged_by": ""}


def register(
    run_id: str,
    cfg: Config | None,
    final_checkpoint: str,
    data_uri: str,
    judged: dict | None,
    tracking_uri: str,
    log=print,
    clusters=None,
) -> dict:
    """Log the generator of `final_checkpoint` to the curriculum's parent run, create a tagged version (unless
    one exists for this checkpoint), maybe move the alias. `cfg`: the run's config (None: the checkpoint's)."""
    configure_mlflow_client()
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        state = None
        if cfg is None:
            state = checkpoint.fetch(final_checkpoint, tmp)
            cfg = from_dict(checkpoint.stored_config(state))
        name = model_name(cfg)
        existing = client.search_registered_models(f"name = {filter_value(name)}") and client.search_model_versions(
            f"name = {filter_value(name)} and tags.checkpoint = {filter_value(final_checkpoint)}"
        )
        if existing:
            version = min(existing, key=lambda v: int(v.version))
            _wait_ready(client, name, version.version)
            moved, reason = _maybe_move_alias(client, name, version.version, judged)
            log(
                f"registry: {name} version {version.version} already holds {final_checkpoint}: not registered "
                f"again; {_alias_line(client, name, version.version, moved, reason)}"
            )
            return _result(name, version.version, moved, final_checkpoint)
        state = state or checkpoint.fetch(final_checkpoint, tmp)

    k = FINAL_STAGE
    bundle = build_bundle(cfg, state, k, data_uri, log, clusters)
    exp = ensure_experiment(client, f"pix2pixhd-{cfg.dataset}", tracking_uri)
    parent = client.search_runs(
        [exp], f"tags.`{RUN_TAG}` = {filter_value(run_id)} and tags.`{STAGE_TAG}` = 'parent'", max_results=1
    )
    tags = {
        "run_id": run_id,
        "checkpoint": final_checkpoint,
        "config_hash": cfg.hash(),
        "data_uri": data_uri,
        "data_manifest_sha256": manifest_sha256(data_uri, cfg.data.train_split),
        "checkpoint_sha256": checkpoint.stored_sha256(final_checkpoint) or "unknown",
    }
    if judged is not None:
        tags |= judgement_tags(judged)
    version = _log_version(client, name, bundle, exp, parent[0].info.run_id if parent else None, run_id, tags)
    moved, reason = _maybe_move_alias(client, name, version, judged)
    shown = f"{judged['metric']} {judged['value']:.4f}" if judged else "not judged"
    log(f"registered {name} version {version} ({shown}); {_alias_line(client, name, version, moved, reason)}")
    return _result(name, version, moved, final_checkpoint)


def _log_version(
    client, name: str, bundle: Pix2PixHDGenerator, exp: str, run_id: str | None, run_name: str, tags, parent=None
):
    """Log `bundle` as a pyfunc of weights and options into MLflow run `run_id` (None: a new one named `run_name`,
    nested under run `parent` when given) and create a version of `name` with `tags` (set in the same call);
    returns the version once it is READY."""
    import mlflow

    m = bundle.opt.min_size
    example = np.zeros((1, 2, m, 2 * m), np.int64)
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)  # "Validating input example ...": routine
    run = mlflow.start_run(run_id=run_id, experiment_id=exp, run_name=run_name, parent_run_id=parent)
    with run, tempfile.TemporaryDirectory() as tmp:
        files = pyfunc.save(bundle, Path(tmp) / "generator")
        tags = {**tags, **{f"{DIGEST_TAG}{k}": v for k, v in pyfunc.file_digests(files).items()}}
        info = mlflow.pyfunc.log_model(
            name="generator",
            loader_module=pyfunc.__name__,
            data_path=str(files),
            code_paths=[str(PROJECT / "model"), str(PROJECT / "serving")],
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy"],
            signature=_signature(),
            input_example=example,
        )
        mlflow_run_id = mlflow.active_run().info.run_id
    if not client.search_registered_models(f"name = {filter_value(name)}"):
        client.create_registered_model(name, description="pix2pixHD generator: label ids + instance ids -> image")
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)  # "Waiting up to..."
    version = client.create_model_version(name, info.model_uri, run_id=mlflow_run_id, tags=tags, model_id=info.model_id)
    _wait_ready(client, name, version.version)
    return version.version


def register_clusters(client, name: str, version: str, bundle: Pix2PixHDGenerator, found: dict, tracking_uri, log):
    """A new version of `name`: version `version`'s weights with the clusters `found` (feature_clusters). Not
    judged (its styles differ from the judged version's): the alias stays; the log says how to move it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    source = client.get_model_version(name, version)
    styled = Pix2PixHDGenerator(bundle.options, bundle.G, bundle.E, found["clusters"], found["cluster_counts"])
    tags = {k: v for k, v in source.tags.items() if k in ("run_id", "checkpoint", "config_hash")}
    tags |= {
        "clusters_of": f"{name}/{version}",
        "data_uri": found["data"],
        "data_manifest_sha256": manifest_sha256(found["data"], found["split"]),
        "clusters_instances": str(found["instances"]),
    }
    exp = client.get_run(source.run_id).info.experiment_id
    # a run of its own under the version's run: that run (the training's) keeps its name and end time
    run_name = f"cluster_features {name}/{version}"
    new = _log_version(client, name, styled, exp, None, run_name, tags, parent=source.run_id)
    log(
        f"registered {name} version {new}: version {version}'s weights with {int(found['cluster_counts'].sum())} "
        f"styles from {found['instances']} instances of {found['data']} '{found['split']}'; the '{ALIAS}' alias "
        f"is unchanged (to serve it: MlflowClient().set_registered_model_alias('{name}', '{ALIAS}', '{new}'))"
    )
    return {"name": name, "version": new, "uri": f"models:/{name}/{new}", **found}


def _result(name: str, version: str, moved: bool, final_checkpoint: str) -> dict:
    return {
        "name": name,
        "version": version,
        "alias_moved": moved,
        "checkpoint": final_checkpoint,
        "uri": f"models:/{name}/{version}",
    }


def _alias_line(client, name: str, version: str, moved: bool, reason: str) -> str:
    champion = client.get_model_version_by_alias(name, ALIAS).version
    where = "moved to it" if moved else ("is on it" if champion == str(version) else f"kept on version {champion}")
    return f"alias '{ALIAS}' {where} ({reason})"


def _wait_ready(client, name: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get_model_version(name, version).status != "READY":
        if time.monotonic() > deadline:
            raise RuntimeError(f"model version {name}/{version} not READY after {timeout}s")
        time.sleep(0.5)


def judgement_tags(judged: dict) -> dict[str, str]:
    """A judgement as version tags; the value at full precision (repr), so that an equal judgement compares equal
    (rounded, a champion's value could read higher than the same value unrounded)."""
    value = repr(float(judged["value"]))
    tags = {JUDGED_METRIC: judged["metric"], JUDGED_VALUE: value, JUDGED_BY: judged["judged_by"]}
    tags |= {f"judged.{k}": judged[k] for k in ("split", "data_sha256") if judged.get(k)}  # judged on what
    return tags | ({METRIC: value} if judged["metric"] == METRIC else {})


def _judged(tags: dict) -> dict | None:
    """A version's judgement from its tags (versions registered before judgements: their val_L1)."""
    if JUDGED_METRIC in tags:
        return {
            "metric": tags[JUDGED_METRIC],
            "value": float(tags[JUDGED_VALUE]),
            "judged_by": tags.get(JUDGED_BY, ""),
            "mode": "max" if tags[JUDGED_METRIC] == "val_seg_miou" else "min",
        }
    if METRIC in tags:
        return {"metric": METRIC, "value": float(tags[METRIC]), "judged_by": "", "mode": "min"}
    return None


def _maybe_move_alias(client, name: str, version: str, judged: dict | None) -> tuple[bool, str]:
    """The alias moves to `version` when it is at least as good as the champion by the same metric, judged by the
    same network (segmenter / feature network); versions judged otherwise are not compared: the alias stays."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        champion = None
    if champion is None:
        client.set_registered_model_alias(name, ALIAS, version)
        return True, "there was no champion"
    if champion.version == str(version):
        return False, "it is the champion already"
    if judged is None:
        return False, "this version was not judged"
    theirs = _judged(champion.tags)
    metric, value = judged["metric"], judged["value"]
    if theirs is None or (theirs["metric"], theirs["judged_by"]) != (metric, judged["judged_by"]):
        how = f"{theirs['metric']} by {theirs['judged_by'] or 'itself'}" if theirs else "nothing"
        return False, (
            f"cannot compare: this version is judged by {metric} by {judged['judged_by'] or 'itself'}, champion "
            f"v{champion.version} by {how}; compare them with python -m jobs.evaluate --model models:/{name}/"
            f"{champion.version} --model models:/{name}/{version}"
        )
    better = value >= theirs["value"] if judged["mode"] == "max" else value <= theirs["value"]
    sign = (">=" if better else "<") if judged["mode"] == "max" else ("<=" if better else ">")
    if better:
        client.set_registered_model_alias(name, ALIAS, version)
        return True, f"{metric} {value:.4f} {sign} champion v{champion.version}'s {theirs['value']:.4f}"
    return False, f"{metric} {value:.4f} is worse than champion v{champion.version}'s {theirs['value']:.4f}"


class ModelNotFound(LookupError):
    """A model URI that names nothing, or a registry that cannot be reached; one line that says which."""


def _signature():
    """Images out, request params named. No input schema: MLflow's scoring server casts a JSON body to the schema's
    dtype before the model sees it (an int64 schema turns a map of 7.9 into 7), so the model's own check
    (serving.pyfunc.check_request: integer ids (batch, 2, H, W), sizes, label ids) is the one input check, over
    HTTP as in Python."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        params=ParamSchema(
            [
                ParamSpec("seed", "long", 0),
                ParamSpec("style_mode", "string", ""),
                ParamSpec("styles", "string", ""),
                ParamSpec("style_photo", "string", ""),
                ParamSpec("style_instances", "string", ""),
            ]
        ),
    )


def pinned_version(client, uri: str) -> tuple[str, str]:
    """models:/name/latest or models:/name@alias as (name, the version it is now): a score names a fixed network."""
    m = MODEL_URI.match(uri)
    if m is None:
        raise EvaluationError(f"{uri}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
    name, version, alias = m["name"], m["version"], m["alias"]
    if alias:
        version = client.get_model_version_by_alias(name, alias).version
    elif version == "latest":
        versions = client.search_model_versions(f"name = {filter_value(name)}")
        if not versions:
            raise EvaluationError(f"{uri}: the registry has no version of {name}")
        version = str(max(int(v.version) for v in versions))
    return name, str(version)


def resolve_version(spec: str, tracking_uri: str):
    """The ModelVersion that models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS names now; a URI of
    another form, one that names nothing, or a registry that does not answer is a one-line ModelNotFound."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        return client.get_model_version(*pinned_version(client, spec))
    except MlflowException as e:
        raise ModelNotFound(
            f"{spec}: not in the registry at {tracking_uri} ({e.message.splitlines()[0][:200]})"
        ) from None
    except ValueError as e:  # a malformed URI (EvaluationError)
        raise ModelNotFound(str(e)) from None


def load_generator(model_uri: str, tracking_uri: str | None = None) -> Pix2PixHDGenerator:
    configure_mlflow_client()
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    where = tracking_uri or mlflow.get_tracking_uri()
    expected = None
    try:
        if model_uri.startswith("models:/"):  # the version's recorded digests; the files of that very version
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=where, registry_uri=where)
            try:
                pinned = pinned_version(client, model_uri)
            except ValueError as e:  # a malformed URI, a name without versions
                raise ModelNotFound(f"{model_uri}: not in the registry at {where} ({e})") from None
            version = client.get_model_version(*pinned)
            model_uri = f"models:/{version.name}/{version.version}"
            expected = {k.removeprefix(DIGEST_TAG): v for k, v in version.tags.items() if k.startswith(DIGEST_TAG)}
        with tempfile.TemporaryDirectory(prefix="p2p-model-") as tmp:
            folder = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
            return _load_files(folder, model_uri, expected)
    except MlflowException as e:
        text = str(e.message if hasattr(e, "message") else e).strip()
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise ModelNotFound(f"{model_uri}: not in the registry at {where} ({text.splitlines()[0][:300]})") from None
        if "API request to" in text and "failed with exception" in text:  # MLflow's wording for a transport error
            why = "timed out" if "timeout" in text.lower() else "connection refused or host unknown"
            raise ModelNotFound(f"{model_uri}: cannot reach the registry at {where} ({why})") from None
        raise ModelNotFound(
            f"{model_uri}: the registry at {where} cannot be used ({text.splitlines()[0][:300]})"
        ) from None
    except OSError as e:  # connection errors raised outside MLflow's REST client
        raise ModelNotFound(f"{model_uri}: cannot reach the registry at {where} ({type(e).__name__})") from None


def _load_files(folder: Path, model_uri: str, expected: dict[str, str] | None = None) -> Pix2PixHDGenerator:
    """A downloaded version's generator from its weights and options; a version registered as a pickle (before
    the pyfunc without pickle) is refused rather than unpickled."""
    from mlflow.models import Model

    flavor = Model.load(str(folder / "MLmodel")).flavors.get("python_function", {})
    if flavor.get("loader_module") != pyfunc.__name__:
        raise ModelNotFound(
            f"{model_uri}: registered as a pickle (loading it would run code stored with it); register its checkpoint "
            f"again to get a version of weights and options: python -m jobs.register --run RUN_ID --storage ..."
        )
    return pyfunc.load(folder / flavor["data"], expected)


def store_clusters(
    root: storage.Location, clusters: torch.Tensor, counts: torch.Tensor, meta: dict
) -> storage.Location:
    """Write a run's clusters file (`meta["checkpoint"]`: the checkpoint they belong to), atomically."""
    buf = io.BytesIO()
    torch.save({"clusters": clusters, "cluster_counts": counts, "meta": meta}, buf)
    out = root.join(*CLUSTERS_FILE.split("/"))
    storage.write_bytes_atomic(out, buf.getvalue())
    return out


def stored_clusters(root: storage.Location, checkpoint_uri: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The clusters jobs.cluster_features stored for this checkpoint, or None."""
    loc = root.join(*CLUSTERS_FILE.split("/"))
    if not storage.exists(loc):
        return None
    data = torch.load(io.BytesIO(storage.read_bytes(loc)), map_location="cpu", weights_only=True)
    if data["meta"]["checkpoint"] != checkpoint_uri:
        return None
    return data["clusters"], data["cluster_counts"]
