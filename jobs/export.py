"""Export a generator: ONNX for deployment (the route to TensorRT), or NVIDIA's pix2pixHD files.

python -m jobs.export --model models:/pix2pixhd-cityscapes@champion --format onnx --out generator.onnx
    [--height 512 --width 1024] [--tracking-uri URI]
python -m jobs.export --model CHECKPOINT_URI|models:/NAME@ALIAS --format reference --out DIR

--format reference writes latest_net_G.pth, latest_net_D.pth (from a checkpoint: the registry holds no D),
latest_net_E.pth and features_clustered_010.npy (with instance features) and opt.txt, as the reference code names
and reads them (its test.py: --checkpoints_dir, --name, --which_epoch latest). A checkpoint's generator is its
average when it trained with model.ema_beta.

The graph's inputs: `maps` (B, 2, H, W) int64, and `features` (B, feat_num, H, W) for a generator with instance
features (serving/onnx_export.py); batch, height and width are dynamic. After writing, onnxruntime runs the file
on a map of the traced size and of twice it, and the job fails unless it matches PyTorch within 1e-4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from jobs import cli
from model.styles import feature_map
from orchestration.records.registry import load_generator
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run.stopping import finish
from orchestration.services.reference_files import export_reference

TOLERANCE = 1e-4


def check_onnx(bundle, path: Path, height: int, width: int) -> float:
    """Largest absolute difference between onnxruntime and PyTorch over two sizes; raises ValueError above
    TOLERANCE."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for h, w in ((height, width), (2 * height, 2 * width)):
        label = torch.randint(0, bundle.opt.label_nc, (2, h // 8, w // 8), generator=g)
        label = label.repeat_interleave(8, 1).repeat_interleave(8, 2)
        maps = torch.stack([label, label * 1000 + 1], 1)
        feeds = {"maps": maps.numpy()}
        if bundle.opt.instance_feat:
            feeds["features"] = feature_map(maps[:, 1], bundle.clusters, bundle.cluster_counts).numpy()
        with torch.no_grad():
            expected = bundle.render(maps).numpy()
        worst = max(worst, float(np.abs(session.run(None, feeds)[0] - expected).max()))
    if worst > TOLERANCE:
        raise ValueError(f"{path}: onnxruntime differs from PyTorch by {worst:.2e} (> {TOLERANCE:g})")
    return worst


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("export", __doc__)
    p.add_argument("--model", required=True, help="e.g. models:/pix2pixhd-cityscapes@champion")
    p.add_argument("--format", choices=["onnx", "reference"], default="onnx")
    p.add_argument("--out", required=True, help="the file to write (reference: the folder)")
    p.add_argument("--height", type=int, help="traced height (default: 2 x the generator's size multiple)")
    p.add_argument("--width", type=int, help="traced width (default: 4 x the generator's size multiple)")
    cli.add_tracking(p)
    a = p.parse_args(argv)
    if a.format == "reference":

        def reference_files() -> None:
            tracking_uri = (
                resolve_tracking_uri(a.tracking_uri, ray_job=False) if a.model.startswith("models:/") else None
            )
            export_reference(a.model, a.out, tracking_uri)

        return cli.run("export", reference_files, also=(ValueError,))
    try:
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError:
        print("export: error: ONNX export needs onnx and onnxscript: pip install -e '.[onnx]'", file=sys.stderr)
        return 2
    from serving.onnx_export import export_onnx

    def body() -> None:
        bundle = load_generator(a.model, resolve_tracking_uri(a.tracking_uri, ray_job=False))
        opt = bundle.opt
        height, width = a.height or opt.min_size, a.width or 2 * opt.min_size
        if opt.fit_size(height, width):
            raise ValueError(
                f"--height {height} --width {width}: this generator needs multiples of {opt.size_multiple}, at least "
                f"{opt.min_size}"
            )
        path = export_onnx(bundle, Path(a.out), height, width)
        worst = check_onnx(bundle, path, height, width)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB); onnxruntime matches PyTorch within {worst:.1e}")

    return cli.run("export", body, also=(ValueError,))


if __name__ == "__main__":
    finish(main())
