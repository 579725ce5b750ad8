"""Networks the user gives as files (a segmenter, a feature network for FID/KID): loaded without their Python
code (TorchScript, or a torch.export archive), named by the sha256 of the file so that every score says which
network made it, and probed once on a small batch so a wrong file fails before any compute."""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import torch

from evaluation.segscore import EvaluationError

EXPORT_HOWTO = (
    "export it with torch.jit.script(net.eval()).save(PATH) (or torch.jit.trace(net.eval(), example).save(PATH), "
    "or torch.export.save(torch.export.export(net.eval(), (example,)), PATH))"
)


def file_identity(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def load_module(path: str | Path, what: str) -> torch.nn.Module:
    """A TorchScript file or a torch.export archive (.pt2), on the CPU and in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{what} {path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    try:
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            module = torch.export.load(str(path)).module()
        elif any(n.endswith("/constants.pkl") for n in names):
            module = torch.jit.load(str(path), map_location="cpu")
        else:
            raise EvaluationError(
                f"{what} {path} is not a TorchScript file or a torch.export archive (a state dict or a pickled model "
                f"cannot be loaded without its code): {EXPORT_HOWTO}"
            )
    except EvaluationError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged archive
        first = str(e).strip().splitlines()[0][:200]
        raise EvaluationError(f"{what} {path} cannot be loaded ({type(e).__name__}: {first}): {EXPORT_HOWTO}") from None
    if hasattr(module, "eval"):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # torch.export modules refuse eval()
            module.eval()
    return module


def probe(module, example: torch.Tensor, what: str, **kwargs) -> torch.Tensor:
    """Run `module` once on `example`; its failure is the file's fault, said so."""
    try:
        with torch.no_grad():
            out = module(example, **kwargs)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EvaluationError(
            f"{what} fails on a batch of shape {tuple(example.shape)} {example.dtype}: {first}"
        ) from None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise EvaluationError(f"{what} returns {type(out).__name__}, not a tensor")
    return out


def pack_module(module) -> bytes:
    """A network as bytes for another process (a Ray actor or Train worker): TorchScript as its own archive (it does
    not pickle), anything else pickled."""
    if isinstance(module, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        return b"J" + buf.getvalue()
    return b"P" + pickle.dumps(module)


def unpack_module(blob: bytes):
    if blob[:1] == b"J":
        return torch.jit.load(io.BytesIO(blob[1:]), map_location="cpu")
    return pickle.loads(blob[1:])
