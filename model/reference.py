"""NVIDIA's pix2pixHD files, in and out: `{epoch}_net_G.pth` / `_net_D.pth` / `_net_E.pth` (state dicts saved with
torch.save), `features_clustered_010.npy` (its encode_features.py: a dict label -> (k, feat_num) centres, saved with
np.save) and `opt.txt` (every option as `name: value` between two banner lines).

The key rules, from the reference code:
- G and E: the reference's module names are this project's (`model.N...`, `model1_1.N...`): files load as they are.
- D: the reference names scale i's layer j `scale{i}_layer{j}.N...` (`layer{i}.N...`, its layers flattened, when
  trained with --no_ganFeat_loss) and applies scale num_D-1 to the full-resolution input, scale 0 to the coarsest;
  here `scales.k.layers.j.N...` with scale 0 at full resolution.
Pure PyTorch and NumPy: no Ray, no MLflow.
"""

from __future__ import annotations

import ast
import io
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from model.options import ModelOptions

NETS = ("G", "D", "E")
CLUSTERS_NAME = "features_clustered_010.npy"
# the reference's options this project shares, by the same names (the training schedule is the config's)
OPTIONS = (
    "label_nc",
    "input_nc",
    "output_nc",
    "no_instance",
    "instance_feat",
    "feat_num",
    "netG",
    "ngf",
    "n_downsample_global",
    "n_blocks_global",
    "n_local_enhancers",
    "n_blocks_local",
    "norm",
    "nef",
    "n_downsample_E",
    "num_D",
    "n_layers_D",
    "ndf",
    "lambda_feat",
    "no_ganFeat_loss",
)


class ReferenceError(ValueError):
    """A reference file that does not fit: names the file, the tensor and the option that probably differs."""


# ---- files ---------------------------------------------------------------------------------------------------


def network_file(folder: Path, net: str, epoch: str = "latest") -> Path:
    return Path(folder) / f"{epoch}_net_{net}.pth"


def read_network(path: Path) -> dict[str, torch.Tensor]:
    """A reference state dict (tensors only: never unpickled with code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        raise ReferenceError(f"{path} does not load as a state dict of tensors ({type(e).__name__})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReferenceError(f"{path} is not a state dict (name -> tensor) as the reference's save_network writes")
    return dict(state)


def parse_opt(text: str, where: str = "opt.txt") -> dict:
    """`name: value` lines of a reference opt.txt -> the options this project shares, as Python values."""
    found = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*:\s*(.*?)\s*", line)
        if not m or m.group(1) not in OPTIONS:
            continue
        name, raw = m.groups()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word: 'local', 'instance'
        found[name] = value
    if not found:
        raise ReferenceError(f"{where} has no `name: value` line of a pix2pixHD option (label_nc, ngf, netG, ...)")
    return found


def format_opt(opt: ModelOptions) -> str:
    """An opt.txt the reference prints, for the options this project shares."""
    lines = ["------------ Options -------------"]
    lines += [f"{name}: {getattr(opt, name)}" for name in sorted(OPTIONS)]
    return "\n".join([*lines, "-------------- End ----------------", ""])


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArraysOnly(pickle.Unpickler):
    """The pickle inside features_clustered_010.npy holds a dict of arrays; anything else (code) is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not an array")


def read_clusters(path: Path, label_nc: int, feat_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """features_clustered_010.npy -> (centres (label_nc, k, feat_num), counts (label_nc,)), rows in file order.
    Its pickle is read with an unpickler that builds arrays only (np.load(allow_pickle=True) would run any code)."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            _, _, dtype = read_header(f)
            obj = _ArraysOnly(f, encoding="latin1").load() if dtype.hasobject else None
        except (ValueError, pickle.UnpicklingError, EOFError) as e:
            raise ReferenceError(f"{path} is not a cluster file of encode_features.py ({e})") from None
    table = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(table, dict):
        raise ReferenceError(f"{path} holds no dict label -> centres (encode_features.py's format)")
    k = max([len(v) for v in table.values()] or [0])
    centres, counts = torch.zeros(label_nc, k, feat_num), torch.zeros(label_nc, dtype=torch.long)
    for label, rows in table.items():
        rows = np.asarray(rows, np.float32).reshape(len(rows), -1)
        if not 0 <= int(label) < label_nc or rows.shape[1] != feat_num:
            raise ReferenceError(
                f"{path}: label {label} with {rows.shape[1]}-wide centres does not fit label_nc={label_nc}, "
                f"feat_num={feat_num}"
            )
        centres[int(label), : len(rows)] = torch.from_numpy(rows)
        counts[int(label)] = len(rows)
    return centres, counts


def write_clusters(path: Path, centres: torch.Tensor, counts: torch.Tensor) -> Path:
    """(centres, counts) -> the dict encode_features.py saves (classes without centres left out)."""
    table = {c: centres[c, : int(n)].numpy().astype(np.float64) for c, n in enumerate(counts.tolist()) if n}
    buf = io.BytesIO()
    np.save(buf, np.array(table, dtype=object), allow_pickle=True)
    Path(path).write_bytes(buf.getvalue())
    return Path(path)


# ---- D's names ------------------------------------------------------------------------------------------------


def _block_lengths(n_layers: int) -> list[int]:
    return [2] + [3] * n_layers + [1]  # C-LReLU, (C-norm-LReLU) x (n_layers - 1), C-norm-LReLU stride 1, C


def discriminator_from_reference(state: Mapping[str, torch.Tensor], opt: ModelOptions) -> dict[str, torch.Tensor]:
    """Reference multiscale D names -> this project's. Names that follow neither of its layouts are kept as they
    are (the check against this project's D then names them)."""
    lengths = _block_lengths(opt.n_layers_D)
    out = {}
    for name, t in state.items():
        m = re.fullmatch(r"scale(\d+)_layer(\d+)\.(\d+)\.(.+)", name)
        flat = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", name)
        if m:
            i, j, inner, rest = m.groups()
        elif flat:
            i, index, rest = flat.groups()
            j, inner = _unflatten(int(index), lengths)
        else:
            out[name] = t
            continue
        out[f"scales.{opt.num_D - 1 - int(i)}.layers.{j}.{inner}.{rest}"] = t
    return out


def discriminator_to_reference(state: Mapping[str, torch.Tensor], opt: ModelOptions) -> dict[str, torch.Tensor]:
    """This project's D names -> the reference's (`scale{i}_layer{j}`, or flattened `layer{i}` without the
    feature-matching loss, as the reference builds it then)."""
    lengths = _block_lengths(opt.n_layers_D)
    out = {}
    for name, t in state.items():
        k, j, inner, rest = re.fullmatch(r"scales\.(\d+)\.layers\.(\d+)\.(\d+)\.(.+)", name).groups()
        i = opt.num_D - 1 - int(k)
        if opt.no_ganFeat_loss:
            out[f"layer{i}.{sum(lengths[: int(j)]) + int(inner)}.{rest}"] = t
        else:
            out[f"scale{i}_layer{j}.{inner}.{rest}"] = t
    return out


def _unflatten(index: int, lengths: list[int]) -> tuple[int, int]:
    for j, n in enumerate(lengths):
        if index < n:
            return j, index
        index -= n
    return len(lengths), index  # past the last block: a D with more layers (the check names it)


# ---- the check ------------------------------------------------------------------------------------------------


def check_fits(net: str, have: Mapping[str, torch.Tensor], want: Mapping[str, list[int]], where: str) -> None:
    """Every tensor of this project's `want` (name -> shape, `networks.network_shapes`) is in `have` with its shape,
    and nothing more; else a ReferenceError naming the first that does not fit and the options that probably
    differ."""
    for name in [*want, *(n for n in have if n not in want)]:  # in the network's order
        a = tuple(have[name].shape) if name in have else None
        b = tuple(want[name]) if name in want else None
        if a is not None and a == b:
            continue
        if a is None:
            what = f"has no {name} (this project's {net} has it, {b})"
        elif b is None:
            what = f"has {name} {a}, which this project's {net} does not have"
        else:
            what = f"has {name} of shape {a}; this project's {net} expects {b}"
        raise ReferenceError(
            f"{where} {what}: the options differ, probably {_probable(net, name, a, b)}. Pass the run's opt.txt "
            f"(--opt) or set the model keys as it was trained"
        )


def _probable(net: str, name: str, a: tuple | None, b: tuple | None) -> str:
    if a is None or b is None:
        counts = {"G": "n_blocks_global / n_blocks_local / n_downsample_global / n_local_enhancers"}
        return {**counts, "D": "num_D / n_layers_D", "E": "n_downsample_E"}[net]
    if len(a) == 4 and a[0] == b[0] and a[1] != b[1] and _first_conv(net, name):
        return {
            "G": "label_nc / no_instance / instance_feat and feat_num (G's input channels)",
            "D": "label_nc / no_instance / output_nc (D's input channels)",
            "E": "output_nc",
        }[net]
    return {"G": "ngf", "D": "ndf", "E": "nef or feat_num"}[net]


def _first_conv(net: str, name: str) -> bool:
    return bool(re.fullmatch(r"(model|model1_1)\.1\.weight|scales\.\d+\.layers\.0\.0\.weight", name))
