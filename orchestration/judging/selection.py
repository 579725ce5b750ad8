"""Which metric judges the generators of a run or sweep (the config's `eval:` section), resolved once in the job's
driver: the metric and its direction, and the networks that compute it (the segmenter, the feature network),
packed for the Train workers, with the identities that every score carries.

`auto`: seg_miou when a segmenter is configured (eval.segmenter) or registered for the dataset
(`segmenter-<dataset>`, by jobs.train_segmenter); else kid when eval.inception gives a feature network; else
val_L1, with one warning saying why it is a poor judge.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.labels import LabelSet
from evaluation.fid import FeatureNet, load_feature_net
from evaluation.modules import pack_module, unpack_module
from evaluation.quality import SELECTION, QualityJudge
from evaluation.segmenters import Segmenter
from evaluation.segscore import ClassMap
from orchestration.judging.evaluate import EvalPlan, evaluate
from orchestration.records.segmenter_registry import resolve_segmenter
from orchestration.run.config import Config, ConfigError

L1_WARNING = (
    "note: generators are judged by val_L1, which rewards blur (a generator that paints each region's average "
    "colour beats a sharp, plausible one): train a segmenter (python -m jobs.train_segmenter --config ...) or give "
    "eval.inception to judge by seg-score or KID"
)


@dataclass
class Selection:
    metric: str  # the reported metric: val_seg_miou, val_kid, val_fid or val_L1
    mode: str  # max or min
    segmenter: bytes | None = None
    class_map: ClassMap | None = None
    segmenter_id: str | None = None
    feature: bytes | None = None
    feature_kwargs: dict | None = None
    feature_id: str | None = None

    @property
    def judged_by(self) -> str:
        """What made the scores: versions compare only when this is the same."""
        return self.segmenter_id if self.metric == "val_seg_miou" else (self.feature_id or "")

    def judge(self, labels: LabelSet, device="cpu") -> QualityJudge | None:
        """The networks unpacked (in a worker) on `device`; None when only val_L1 is scored."""
        if self.segmenter is None and self.feature is None:
            return None
        return QualityJudge(
            labels,
            unpack_module(self.segmenter).to(device) if self.segmenter else None,
            self.class_map,
            unpack_module(self.feature).to(device) if self.feature else None,
            self.feature_kwargs,
        )

    def networks(self):
        """(Segmenter, FeatureNet) for jobs.evaluate's pass, unpacked here."""

        seg = Segmenter(unpack_module(self.segmenter), self.class_map, self.segmenter_id) if self.segmenter else None
        feature = None
        if self.feature:
            feature = FeatureNet(unpack_module(self.feature), self.feature_id, 0, self.feature_kwargs or {})
        return seg, feature

    def better(self, a: float, b: float) -> bool:
        """a at least as good as b."""
        return a >= b if self.mode == "max" else a <= b


def resolve_selection(cfg: Config, labels: LabelSet, tracking_uri: str | None, log=print) -> Selection:

    e = cfg.eval
    wanted = e.metric
    segmenter = None
    if wanted in ("auto", "seg_miou") or e.segmenter:
        segmenter = resolve_segmenter(e.segmenter, cfg, labels, tracking_uri, e.class_map, log)
    if wanted == "seg_miou" and segmenter is None:
        raise ConfigError(
            f"eval.metric=seg_miou but no segmenter: set eval.segmenter (a TorchScript file with eval.class_map, or "
            f"a models:/ URI), or register one for '{cfg.dataset}' with python -m jobs.train_segmenter"
        )
    feature = load_feature_net(e.inception) if e.inception else None
    if wanted in ("kid", "fid") and feature is None:
        raise ConfigError(f"eval.metric={wanted} needs a feature network: set eval.inception to its file")
    if wanted == "auto":
        wanted = "seg_miou" if segmenter else ("kid" if feature else "val_L1")
        if wanted == "val_L1":
            log(L1_WARNING)
    metric, mode = SELECTION[wanted]
    s = Selection(metric, mode)
    if segmenter is not None:
        s.segmenter, s.class_map, s.segmenter_id = (
            pack_module(segmenter.module),
            segmenter.class_map,
            segmenter.identity,
        )
    if feature is not None:
        s.feature, s.feature_kwargs, s.feature_id = pack_module(feature.module), feature.kwargs, feature.identity
    if metric == "val_L1":
        log(f"generators are judged by val_L1 (min) on {cfg.train.val_samples} held-out images each epoch")
    else:
        by = s.segmenter_id if metric == "val_seg_miou" else s.feature_id
        log(f"generators are judged by {metric} ({mode}) by {by}, every {e.every} epoch(s) on {e.images} images")
    return s


def objective(cfg: Config, selection: Selection) -> tuple[str, str]:
    """A sweep's metric and mode: sweep.metric / sweep.mode when set, else the selection's."""
    metric = selection.metric if cfg.sweep.metric == "auto" else cfg.sweep.metric
    if cfg.sweep.mode != "auto":
        return metric, cfg.sweep.mode
    modes = dict(SELECTION.values())
    return metric, modes.get(metric, selection.mode if metric == selection.metric else "min")


EVALUATE_KEYS = {"val_seg_miou": "seg_miou", "val_kid": "kid", "val_fid": "fid"}


def final_judgement(selection: Selection, checkpoint_uri: str, data_uri: str, split: str, out: str, log=print) -> dict:
    """The final generator judged on the whole `split` (a jobs.evaluate pass) by the selection metric; val_L1 runs
    are judged by the last epoch's val_L1 instead (the caller's). Stored in run.json for the registry."""

    plan = EvalPlan([checkpoint_uri], data_uri, split, out=out, networks=selection.networks())
    log(f"judging the final generator on the whole '{split}' split by {selection.metric}")
    result = evaluate(plan, log)
    (model,) = [name for name in result["results"] if name != "real photos"]
    value = result["results"][model][EVALUATE_KEYS[selection.metric]]
    return {
        "metric": selection.metric,
        "mode": selection.mode,
        "value": value,
        "judged_by": selection.judged_by,
        "checkpoint_sha256": result["sha256"][model],  # what was judged, and on what
        "data_sha256": result["data_sha256"],
        "split": split,
    }
