"""What an evaluation shows a person: a side-by-side table (markdown: the job log, report.md, MLflow) and a
per-class IoU chart (PNG), from results that carry `name`, `seg` (a SegScoreResult or None) and `metrics(real)`."""

from __future__ import annotations

import math
from pathlib import Path

COLUMNS = (
    ("seg_miou", "seg mIoU", "{:.3f}"),
    ("seg_miou_ratio", "/ real", "{:.2f}"),
    ("seg_pixel_acc", "pixel acc", "{:.3f}"),
    ("seg_classes", "classes", "{:.0f}"),
    ("fid", "FID", "{:.2f}"),
    ("kid", "KID", "{:.4f}"),
    ("l1", "L1", "{:.4f}"),
    ("images", "images", "{:.0f}"),
)


def table(results: list, real) -> str:
    """One row per source (the real photos first); a column only when some row has it; '-' where not."""
    rows = [(r.name, r.metrics(None if r is real else real)) for r in results]
    shown = [c for c in COLUMNS if any(c[0] in m for _, m in rows)]
    lines = ["| source | " + " | ".join(c[1] for c in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name, m in rows:
        cells = []
        for key, _, fmt in shown:
            v = m.get(key)
            cell = "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)
            if key == "kid" and "kid_std" in m and cell != "-":
                cell += f" ± {m['kid_std']:.4f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_class_chart(results: dict, path: Path) -> Path:
    """Grouped bars: per-class IoU of each source, classes that occur (a NaN class is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = {name: r.seg.per_class for name, r in results.items() if r.seg is not None}
    classes = [c for c in next(iter(scored.values())) if any(not math.isnan(v[c]) for v in scored.values())]
    width = 0.8 / len(scored)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(classes) * max(1, len(scored) / 2)), 4.0))
    for i, (name, per_class) in enumerate(scored.items()):
        values = [0.0 if math.isnan(per_class[c]) else per_class[c] for c in classes]
        ax.bar([j + i * width for j in range(len(classes))], values, width, label=name)
    ax.set_xticks([j + width * (len(scored) - 1) / 2 for j in range(len(classes))])
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title("seg-score: per-class IoU")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
