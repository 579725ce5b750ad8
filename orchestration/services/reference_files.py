"""NVIDIA's pix2pixHD checkpoints into a run (a stage-3 checkpoint stage 3 can fine-tune from) or the registry, and
a run's checkpoint or a registered version back out in the reference's files (model/reference.py has the rules).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from data import shards, storage
from data.layouts import label_set
from model import reference
from model.averaging import shipped
from model.networks import network_shapes
from model.step import TrainStep
from orchestration.judging.selection import final_judgement, resolve_selection
from orchestration.records.registry import load_generator, register_run, store_clusters, stored_clusters
from orchestration.run import checkpoint
from orchestration.run.config import Config, ConfigError, available_val_split, from_dict
from orchestration.run.run_state import RunState, run_root

IMPORTED = "imported_from"  # in run.json and the clusters' meta: the folder the files came from


@dataclass
class ReferenceFiles:
    cfg: Config  # the config, its model section as the reference's opt.txt says
    nets: dict[str, dict[str, torch.Tensor]]  # this project's names: G, and D and E when present
    clusters: tuple[torch.Tensor, torch.Tensor] | None
    folder: str


def read_reference(folder: str, cfg: Config, opt_file: str | None = None, epoch: str = "latest") -> ReferenceFiles:
    """The reference's files in `folder`, every tensor checked against the networks of `cfg` (with opt.txt's
    options when given); ConfigError / ReferenceError name the first problem."""
    base = Path(folder)
    if opt_file:
        values = reference.parse_opt(Path(opt_file).read_text(), opt_file)
        if values.get("netG", "local") != "local":
            raise ConfigError(
                f"{opt_file}: netG {values['netG']}: only the reference's full generator (netG local, G1 inside) maps "
                f"to this project's stage 3"
            )
        try:
            cfg.model = dataclasses.replace(cfg.model, **{k: v for k, v in values.items() if k != "netG"})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{opt_file}: {e}") from None
    opt = cfg.stage_model(3)
    want = network_shapes(opt)
    found = {}
    for net in reference.NETS:
        path = reference.network_file(base, net, epoch)
        if not path.exists():
            if net == "G" or (net == "E" and opt.instance_feat):
                raise ConfigError(f"{path} is missing: the reference saves it as {path.name}")
            continue
        state = reference.read_network(path)
        if net == "D":
            state = reference.discriminator_from_reference(state, opt)
        reference.check_fits(net, state, want[net], str(path))
        found[net] = state
    clusters = None
    if opt.instance_feat and (base / reference.CLUSTERS_NAME).exists():
        clusters = reference.read_clusters(base / reference.CLUSTERS_NAME, opt.label_nc, opt.feat_num)
    return ReferenceFiles(cfg, found, clusters, str(base))


def import_to_run(files: ReferenceFiles, storage_uri: str, run_id: str, data_uri: str | None, log=print) -> str:
    """A stage-3 checkpoint of run `run_id` (optimizers fresh; D fresh when the folder has none), recorded as the
    run's finished stage 3, the clusters stored beside it; returns the checkpoint's URI."""
    root = run_root(storage_uri, run_id, "--to-run")
    state = RunState(root)
    if state.data["stages"]:
        raise ConfigError(f"run '{run_id}' in {storage_uri} exists: import into a new run id")
    step = TrainStep(files.cfg.stage_model(3))
    for net, weights in files.nets.items():
        getattr(step, net).load_state_dict(weights)
    step.restart_averages()
    where = root.join("stage3", "checkpoint_imported")
    with tempfile.TemporaryDirectory() as tmp:
        d = checkpoint.save(tmp, step, stage=3, epoch=0, global_step=0, lr=0.0, config=files.cfg.to_dict())
        for name in (checkpoint.STATE, checkpoint.META):  # meta.json last: the checkpoint exists once it is there
            storage.write_bytes_atomic(where.join(name), (d / name).read_bytes())
    sha = checkpoint.stored_sha256(where.uri)
    if files.clusters is not None:
        store_clusters(root, *files.clusters, {"checkpoint": where.uri, IMPORTED: files.folder})
    state.update(run_id=run_id, data_uri=data_uri, config=files.cfg.to_dict(), **{IMPORTED: files.folder})
    state.record(3, checkpoint=where.uri, checkpoint_sha256=sha, epochs=0, global_step=0, **{IMPORTED: files.folder})
    log(
        f"import_reference: {', '.join(sorted(files.nets))} from {files.folder} -> {where.uri} (stage 3; optimizers "
        f"fresh{'' if 'D' in files.nets else ', D fresh: the folder has no net_D'}"
        f"{', the clusters of ' + reference.CLUSTERS_NAME if files.clusters is not None else ''})"
    )
    return where.uri


def register_imported(root_uri: str, run_id: str, data_uri: str, tracking_uri: str, log=print) -> dict:
    """Register the imported run's generator, judged as a trained run's is when the dataset has a segmenter."""
    root = run_root(root_uri, run_id)
    state = RunState(root)
    cfg = from_dict(state.data["config"])
    labels = label_set(shards.load_manifest(data_uri, cfg.data.train_split)["layout"])
    selection = resolve_selection(cfg, labels, tracking_uri, log)
    if selection.metric != "val_L1":
        split = available_val_split(cfg, data_uri, log=lambda m: None) or cfg.data.train_split
        final = state.done(3)["checkpoint"]
        state.update(judgement=final_judgement(selection, final, data_uri, split, root.join("evaluation").uri, log))
    return register_run(root, tracking_uri, log, data_uri=data_uri)


def export_reference(spec: str, out: str, tracking_uri: str | None, log=print) -> list[Path]:
    """A checkpoint URI (G, D, E; the clusters stored for it in its run) or a registered version (G, E, clusters:
    the registry holds no D) -> the reference's files in folder `out`, with opt.txt."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.startswith("models:/"):
        bundle = load_generator(spec, tracking_uri)
        opt, nets = bundle.opt, {"G": bundle.G.state_dict()}
        if bundle.E is not None:
            nets["E"] = bundle.E.state_dict()
        clusters = (bundle.clusters, bundle.cluster_counts) if bundle.opt.instance_feat else None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            state = checkpoint.fetch(spec, tmp)
        opt = from_dict(checkpoint.stored_config(state)).stage_model(state["stage"])
        nets = {net: shipped(state, net) if net != "D" else state["D"] for net in reference.NETS if net in state}
        nets["D"] = reference.discriminator_to_reference(nets["D"], opt)
        run = storage.resolve(spec.rstrip("/").rsplit("/", 2)[0])
        clusters = stored_clusters(run, spec) if opt.instance_feat else None
    written = []
    for net, weights in nets.items():
        path = reference.network_file(folder, net)
        torch.save({k: v.detach().clone() for k, v in weights.items()}, path)
        written.append(path)
    if clusters is not None:
        written.append(reference.write_clusters(folder / reference.CLUSTERS_NAME, *clusters))
    (folder / "opt.txt").write_text(reference.format_opt(opt))
    written.append(folder / "opt.txt")
    missing = [net for net in reference.NETS if net not in nets and (net != "E" or opt.instance_feat)]
    log(
        f"export: {', '.join(p.name for p in written)} in {folder}"
        + (
            f" ({' and '.join(missing)} not in {spec}: a registered version holds the generator only)"
            if missing
            else ""
        )
    )
    return written
