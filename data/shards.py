"""Validated Parquet shards plus a JSON manifest, in any storage `data.storage` resolves.

Why Parquet (one row per sample; PNG/JPEG bytes in binary columns) rather than WebDataset tar: Ray Data's
`read_parquet` takes a pyarrow filesystem directly (S3, local), projects columns (a validation pass can skip the
images), splits reads across tasks per file, and keeps per-sample metadata (index, size) typed next to the bytes.
The samples are already compressed (`data.encoding`: png, or raw arrays in zstd), so Parquet compression is off.

Layout under a destination URI:
    {dest}/{split}/shard-00000.parquet ...    shards of about `shard_mb` MB, samples in stem order
    {dest}/{split}/manifest.json              written last and atomically: it is what publishes the split
    {dest}/{split}/_progress/shard-*.json     per-shard records that let a re-run skip finished shards
    {dest}/{split}/skipped.json               with --skip-bad: what was skipped and why
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import encoding as encodings
from data import storage
from data.layouts import BadSample, SampleFiles, discover, label_set, load
from data.storage import Location
from data.validate import check

FORMAT = "pix2pixhd-shards/1"
SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("stem", pa.string()),
        ("label", pa.binary()),
        ("inst", pa.binary()),  # null when the dataset has no instance maps
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
ROW_GROUP_SIZE = 8


class ManifestError(ValueError):
    """A manifest or shard that cannot be trusted; the message names the file."""


@dataclass
class PrepareOptions:
    layout: str
    source: str
    dest: str
    split: str = "train"
    val_fraction: float = 0.0
    name: str | None = None
    label_nc: int | None = None  # default: the layout's label set (35 Cityscapes, 19 CelebAMask-HQ)
    shard_mb: float = 256.0
    skip_bad: bool = False
    instance_scheme: str = "cityscapes"
    encoding: str = "png"  # data.encoding: png (compact) or zstd (raw arrays, fast to decode)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)


# ---- per-sample work (runs in worker processes) --------------------------------------------------------


def _inspect(layout: str, files: SampleFiles, label_nc: int, scheme: str, encoding: str):
    """Load + validate one sample. Returns ("ok", stem, h, w, histogram, nbytes) or ("bad", path, problem)."""
    try:
        sample = load(layout, files)
        stats = check(sample, label_nc, scheme)
        nbytes = sum(len(b) for b in encodings.encode_sample(sample, encoding).values() if b is not None)
        return ("ok", stats.stem, stats.height, stats.width, stats.histogram, nbytes)
    except BadSample as e:
        return ("bad", e.path, e.problem)


def _row(layout: str, files: SampleFiles, index: int, encoding: str) -> dict:
    s = load(layout, files)
    return {"index": index, "stem": s.stem, **encodings.encode_sample(s, encoding), "height": s.image_size[0],
            "width": s.image_size[1]}  # fmt: skip


def _map(workers: int, fn, *iterables):
    if workers <= 1:
        return list(map(fn, *iterables))
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, *iterables, chunksize=4))


# ---- preparing -------------------------------------------------------------------------------------------


def val_fraction_of(stem: str) -> float:
    """A stable number in [0, 1) per stem: the train/val assignment survives re-runs and added samples."""
    return int(hashlib.sha1(stem.encode()).hexdigest()[:8], 16) / 2**32


def _plan(sizes: list[int], shard_bytes: int) -> list[list[int]]:
    shards, current, total = [], [], 0
    for i, n in enumerate(sizes):
        if current and total + n > shard_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        shards.append(current)
    return shards


def _parquet_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_SIZE, compression="none")
    return buf.getvalue()


def prepare(opts: PrepareOptions, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Validate every sample, then write shards and manifests. Returns {split: manifest}."""
    labels = label_set(opts.layout)
    label_nc = opts.label_nc or labels.label_nc
    encodings.check(opts.encoding)
    if not 0.0 <= opts.val_fraction < 1.0:
        raise ValueError(f"--val-fraction {opts.val_fraction} must be in [0, 1)")
    samples = discover(opts.layout, opts.source, opts.split)
    if not samples:
        raise ValueError(f"no samples found for split '{opts.split}' in {opts.source} ({opts.layout} layout)")
    dest = storage.resolve(opts.dest)
    storage.check_writable(dest)
    name = opts.name or os.path.basename(os.path.abspath(opts.source))

    t0 = time.perf_counter()
    log(f"validating {len(samples)} samples from {opts.source} ({opts.layout} layout, {opts.workers} processes)")
    results = _map(
        opts.workers, _inspect, [opts.layout] * len(samples), samples, [label_nc] * len(samples),
        [opts.instance_scheme] * len(samples), [opts.encoding] * len(samples),
    )  # fmt: skip
    bad = [(s, r) for s, r in zip(samples, results, strict=True) if r[0] == "bad"]
    if bad and not opts.skip_bad:
        path, problem = bad[0][1][1], bad[0][1][2]
        more = f" ({len(bad) - 1} more bad samples; --skip-bad skips them and writes a report)" if len(bad) > 1 else ""
        raise BadSample(path, f"{problem}{more}. Nothing was written.")
    good = [(s, r) for s, r in zip(samples, results, strict=True) if r[0] == "ok"]
    if not good:
        raise ValueError(f"every sample in {opts.source} is bad; see the first: {bad[0][1][1]}: {bad[0][1][2]}")
    log(f"validated in {time.perf_counter() - t0:.1f}s: {len(good)} good, {len(bad)} skipped")

    splits: dict[str, list] = {opts.split: [], "val": []} if opts.val_fraction > 0 else {opts.split: []}
    for s, r in good:
        to_val = opts.val_fraction > 0 and val_fraction_of(s.stem) < opts.val_fraction
        splits["val" if to_val else opts.split].append((s, r))
    manifests = {}
    for split, items in splits.items():
        if not items:
            raise ValueError(f"--val-fraction {opts.val_fraction} leaves split '{split}' empty; change it")
        manifests[split] = _write_split(opts, dest.join(split), split, name, label_nc, items, log)
    if bad:
        report = [{"file": r[1], "problem": r[2]} for _, r in bad]
        storage.write_bytes_atomic(dest.join(f"skipped-{opts.split}.json"), json.dumps(report, indent=1).encode())
        log(f"skipped {len(bad)} bad samples; report: {dest.join(f'skipped-{opts.split}.json')}")
    return manifests


def _write_split(opts, out: Location, split: str, name: str, label_nc: int, items: list, log) -> dict:
    files = [s for s, _ in items]
    stats = [r for _, r in items]
    plan = _plan([r[5] for r in stats], int(opts.shard_mb * 2**20))
    shard_entries = []
    for k, members in enumerate(plan):
        shard_name = f"shard-{k:05d}.parquet"
        shard, record = out.join(shard_name), out.join("_progress", f"shard-{k:05d}.json")
        stems = [files[i].stem for i in members]
        entry = _finished_shard(shard, record, stems, opts.encoding)
        if entry is not None:
            log(f"[{split}] {shard_name}: already written and verified, skipped")
        else:
            t0 = time.perf_counter()
            rows = _map(opts.workers, _row, [opts.layout] * len(members), [files[i] for i in members], members,
                        [opts.encoding] * len(members))  # fmt: skip
            data = _parquet_bytes(rows)
            entry = {"name": shard_name, "count": len(members), "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "first_index": members[0]}  # fmt: skip
            storage.write_bytes_atomic(shard, data)
            storage.write_bytes_atomic(
                record, json.dumps({**entry, "stems": stems, "encoding": opts.encoding}).encode()
            )
            took = time.perf_counter() - t0
            log(f"[{split}] {shard_name}: {len(members)} samples, {len(data) / 2**20:.1f} MB in {took:.1f}s")
        shard_entries.append(entry)

    heights = [r[2] for r in stats]
    widths = [r[3] for r in stats]
    uniform = len(set(zip(heights, widths, strict=True))) == 1
    manifest = {
        "format": FORMAT,
        "dataset": name,
        "layout": opts.layout,
        "split": split,
        "label_nc": label_nc,
        "encoding": opts.encoding,
        "has_instances": any(s.inst is not None for s in files),
        "resolution": {"height": heights[0], "width": widths[0]}
        if uniform
        else {"min": [min(heights), min(widths)], "max": [max(heights), max(widths)]},
        "sample_count": len(files),
        "class_histogram": np.sum([r[4] for r in stats], axis=0).astype(int).tolist(),
        "shards": shard_entries,
        "source": os.path.abspath(opts.source),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_bytes_atomic(out.join("manifest.json"), json.dumps(manifest, indent=1).encode())
    log(f"[{split}] manifest: {out.join('manifest.json')} ({len(files)} samples in {len(shard_entries)} shards)")
    return manifest


def _finished_shard(shard: Location, record: Location, stems: list[str], encoding: str) -> dict | None:
    """The shard's entry when an earlier run wrote exactly these samples, in this encoding, and the bytes still
    verify."""
    if not storage.exists(record) or not storage.exists(shard):
        return None
    try:
        rec = json.loads(storage.read_bytes(record))
    except (ValueError, FileNotFoundError):
        return None
    if (
        rec.get("stems") != stems
        or rec.get("encoding", "png") != encoding
        or storage.size(shard) != rec.get("bytes")
        or storage.sha256(shard) != rec.get("sha256")
    ):
        return None
    return {k: rec[k] for k in ("name", "count", "bytes", "sha256", "first_index")}


# ---- reading ---------------------------------------------------------------------------------------------


@dataclass
class Manifest:
    data: dict
    root: Location  # {dest}/{split}

    @property
    def shard_locations(self) -> list[Location]:
        return [self.root.join(s["name"]) for s in self.data["shards"]]

    @property
    def encoding(self) -> str:
        return self.data.get("encoding", "png")  # manifests written before encodings existed are png

    def __getitem__(self, key: str):
        return self.data[key]


def load_manifest(uri: str, split: str = "train") -> Manifest:
    root = storage.resolve(uri)
    storage.check_reachable(root)
    loc = root.join(split, "manifest.json")
    try:
        data = json.loads(storage.read_bytes(loc))
    except FileNotFoundError:
        raise ManifestError(
            f"no manifest at {loc}: {uri} holds no prepared '{split}' split. Run "
            f"`python -m jobs.prepare_data --layout ... --source ... --dest {uri}` first"
        ) from None
    except ValueError as e:
        raise ManifestError(f"{loc} is not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ManifestError(f"{loc}: format {data.get('format')!r}, expected {FORMAT!r}")
    return Manifest(data, root.join(split))


def verify(manifest: Manifest, mode: str = "sha256", workers: int = 8) -> None:
    """Every shard the manifest lists exists with its size ('size') and, by default, its sha256 too."""
    from concurrent.futures import ThreadPoolExecutor

    def one(entry_loc):
        entry, loc = entry_loc
        n = storage.size(loc)
        if n is None:
            raise ManifestError(f"{loc} is listed in the manifest but missing")
        if n != entry["bytes"]:
            raise ManifestError(
                f"{loc} is {n} bytes, the manifest says {entry['bytes']}: truncated or replaced; re-run prepare_data"
            )
        if mode == "sha256" and storage.sha256(loc) != entry["sha256"]:
            raise ManifestError(f"{loc}: sha256 does not match the manifest: the shard is corrupt; re-run prepare_data")

    pairs = list(zip(manifest.data["shards"], manifest.shard_locations, strict=True))
    with ThreadPoolExecutor(max(1, min(workers, len(pairs)))) as pool:
        list(pool.map(one, pairs))
