"""Per-object styles (pix2pixHD section 3.4): the encoder E gives each object instance a low-dimensional feature;
k-means per class over the training set gives a few styles per class (car colours, road textures); at generation
each instance gets one of its class's cluster centres as its feature.

As the reference implementation does it:
- an instance's class is its id // 1000 for ids >= 1000 (Cityscapes' thing instances), else the id itself;
- only instances larger than 1/64 of the image are clustered (`MIN_SHARE`); every instance of the split counts;
- k-means++ with a fixed seed (scikit-learn's KMeans, k = min(10, instances), 10 initialisations as the
  reference's scikit-learn did), per class;
- at generation, each instance draws a random centre of its class (`mode="random"`; the same seed gives the same
  image); classes without clusters get a zero feature.
Chosen here: centres are stored sorted by cluster size (style 0 is the most common one), so `mode="largest"` gives
every instance its class's most common style, and a style index means the same across calls. A user may give an
instance a style: a cluster index of its class, or an explicit feature vector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

MIN_SHARE = 1 / 64
CLUSTERS = 10


def instance_class(instance_id: int) -> int:
    return instance_id // 1000 if instance_id >= 1000 else instance_id


def instance_features(features: torch.Tensor, inst: torch.Tensor) -> Iterable[tuple[int, np.ndarray]]:
    """(class, feature vector) of every instance larger than MIN_SHARE of its image. `features`: E's output
    (B, F, H, W), constant within each instance; `inst`: (B, H, W) ids."""
    b, _, h, w = features.shape
    for i in range(b):
        ids, counts = inst[i].unique(return_counts=True)
        for instance_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
            if count <= MIN_SHARE * h * w:
                continue
            y, x = (inst[i] == instance_id).nonzero()[count // 2].tolist()  # the reference's middle pixel
            yield instance_class(instance_id), features[i, :, y, x].float().cpu().numpy()


def cluster(
    per_class: Mapping[int, np.ndarray], label_nc: int, feat_num: int, k: int = CLUSTERS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ per class -> (centres (label_nc, k, feat_num), counts (label_nc,)): class c has counts[c] centres,
    largest cluster first."""
    from sklearn.cluster import KMeans

    centres = torch.zeros(label_nc, k, feat_num)
    counts = torch.zeros(label_nc, dtype=torch.long)
    for c, vectors in per_class.items():
        vectors = np.asarray(vectors, np.float64).reshape(-1, feat_num)
        n = min(k, len(np.unique(vectors, axis=0)))
        if n == 0:
            continue
        km = KMeans(n_clusters=n, init="k-means++", n_init=10, random_state=seed).fit(vectors)
        order = np.argsort(-np.bincount(km.labels_, minlength=n), kind="stable")
        centres[c, :n] = torch.from_numpy(km.cluster_centers_[order]).float()
        counts[c] = n
    return centres, counts


def feature_map(
    inst: torch.Tensor,
    centres: torch.Tensor,
    counts: torch.Tensor,
    styles: Mapping[int, int | list[float]] | None = None,
    seed: int = 0,
    mode: str = "random",
) -> torch.Tensor:
    """(B, H, W) instance ids -> (B, feat_num, H, W): each instance's style. `styles` maps an instance id to a
    cluster index of its class or to a feature vector (applies to every image of the batch holding that id);
    the others get a random centre of their class (`mode="random"`, drawn in id order from `seed`) or the largest
    cluster's (`mode="largest"`). Raises ValueError naming a style that does not fit."""
    if mode not in ("random", "largest"):
        raise ValueError(f"style mode {mode!r}: expected 'random' or 'largest'")
    if inst.dtype.is_floating_point:
        raise ValueError(f"instance ids must be integers, got {inst.dtype}")
    styles = dict(styles or {})
    b, h, w = inst.shape
    label_nc, _, feat_num = centres.shape
    present = set(inst.unique().tolist())
    for instance_id, style in styles.items():
        _check_style(int(instance_id), style, present, counts, feat_num, label_nc)
    out = torch.zeros(b, feat_num, h, w, dtype=centres.dtype, device=centres.device)
    g = torch.Generator().manual_seed(int(seed))
    for i in range(b):
        for instance_id in inst[i].unique().tolist():
            c = instance_class(instance_id)
            style = styles.get(instance_id)
            if isinstance(style, (list, tuple)):
                vector = torch.tensor(style, dtype=centres.dtype, device=centres.device)
            elif c >= label_nc or counts[c] == 0:
                continue
            else:
                if style is None:
                    style = int(torch.randint(int(counts[c]), (), generator=g)) if mode == "random" else 0
                vector = centres[c, int(style)]
            out[i][:, inst[i] == instance_id] = vector[:, None]
    return out


def _check_style(instance_id: int, style, present: set[int], counts: torch.Tensor, feat_num: int, label_nc: int):
    c = instance_class(instance_id)
    if instance_id not in present:
        raise ValueError(f"a style is given for instance {instance_id}, which is not in the instance map")
    if isinstance(style, (list, tuple)):
        if len(style) != feat_num:
            raise ValueError(
                f"the feature vector for instance {instance_id} has {len(style)} values; this generator's are {feat_num}"
            )
        for v in style:
            number = not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
            if not number or not -1 <= v <= 1:
                shown = f"{v:.6g}" if number else f"a {type(v).__name__}"  # a number, never a client's text
                raise ValueError(
                    f"the feature vector for instance {instance_id} holds {shown}: its values are numbers in "
                    f"-1..1, the range of the encoder's tanh"
                )
        return
    if isinstance(style, bool) or not isinstance(style, (int, np.integer)):
        raise ValueError(
            f"the style of instance {instance_id} is a {type(style).__name__}: give a cluster index or a feature vector"
        )
    n = int(counts[c]) if c < label_nc else 0
    if n == 0:
        raise ValueError(f"instance {instance_id} is of class {c}, which has no style clusters (none was clustered)")
    if not 0 <= style < n:
        raise ValueError(f"style {style} for instance {instance_id}: class {c} has {n} styles (0..{n - 1})")


def change_near(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, dilate: int = 4) -> dict[str, float]:
    """How much of the change between images `a` and `b` (3, H, W) lies near `mask` (H, W, bool): `share` of the
    absolute pixel change inside the mask dilated by `dilate` px, that region's `area` (share of the image), and
    `density`: change per pixel inside over change per pixel outside."""
    change = (a.float() - b.float()).abs().sum(0)
    k = 2 * dilate + 1
    near = torch.nn.functional.max_pool2d(mask.float()[None, None], k, stride=1, padding=dilate)[0, 0] > 0
    total = float(change.sum())
    inside, outside = float(change[near].mean()), float(change[~near].mean()) if (~near).any() else 0.0
    return {
        "share": float(change[near].sum()) / total if total else 0.0,
        "area": float(near.float().mean()),
        "density": inside / outside if outside else float("inf"),
    }
