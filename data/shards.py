"""Validated Parquet shards plus a JSON manifest, in any storage `data.storage` resolves.

Why Parquet (one row per sample; PNG/JPEG bytes in binary columns) rather than WebDataset tar: Ray Data's
`read_parquet` takes a pyarrow filesystem directly (S3, local), projects columns (a validation pass can skip the
images), splits reads across tasks per file, and keeps per-sample metadata (index, size) typed next to the bytes.
The samples are already compressed (`data.encoding`: png, or raw arrays in zstd), so Parquet compression is off.

Layout under a destination URI:
    {dest}/{split}/shard-00000.parquet ...    shards of about `shard_mb` MB, samples in stem order
    {dest}/{split}/manifest.json              written last and atomically: it is what publishes the split
    {dest}/{split}/_progress/shard-*.json     per-shard records that let a re-run skip finished shards
    {dest}/skipped-{split}.json               with --skip-bad: what was skipped and why

Prepared data is a function of the source bytes. A shard's record holds the sha256 of every source file of its
samples, so a re-run rewrites exactly the shards whose sources changed (the split is unpublished meanwhile), and
the manifest's statistics are always those of its shards. A `val` split carved out with --val-fraction records
the split it came from and is removed by a re-run without --val-fraction. Each row carries the crc32 of its
stored bytes: a sample altered after writing is named (shard and sample) when it is read, whatever the `verify`
level (`ShardContentError`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
import zlib
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

FORMAT = "pix2pixhd-shards/2"  # /2 added the per-sample crc32; /1 shards are still read, without that check
READABLE_FORMATS = ("pix2pixhd-shards/1", FORMAT)
SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("stem", pa.string()),
        ("label", pa.binary()),
        ("inst", pa.binary()),  # null when the dataset has no instance maps
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("crc32", pa.int64()),  # of label, inst and image bytes, in that order
    ]
)
ROW_GROUP_SIZE = 8
CARVED_SPLIT = "val"  # the split --val-fraction carves out of the prepared one


class ManifestError(ValueError):
    """A manifest or shard that cannot be trusted; the message names the file."""


class ShardContentError(ManifestError):
    """A stored sample whose bytes are not what prepare_data wrote (or cannot be decoded); names the shard and the
    sample. Reading it again gives the same bytes: not a fault to retry."""


def sample_crc32(label: bytes | None, inst: bytes | None, image: bytes | None) -> int:
    crc = 0
    for part in (label, inst, image):
        if part is not None:
            crc = zlib.crc32(part, crc)
    return crc


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


def source_sha256(files: SampleFiles) -> str:
    """sha256 over the bytes of every file of one sample (image, label, instances, part masks), in a fixed order."""
    h = hashlib.sha256()
    paths = [files.image, files.label, files.inst, *(files.masks[k] for k in sorted(files.masks))]
    for path in paths:
        if path is not None:
            h.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def _inspect(layout: str, files: SampleFiles, label_nc: int, scheme: str, encoding: str):
    """Load + validate one sample. Returns ("ok", stem, h, w, histogram, nbytes, source sha256) or
    ("bad", path, problem)."""
    try:
        sample = load(layout, files)
        stats = check(sample, label_nc, scheme)
        nbytes = sum(len(b) for b in encodings.encode_sample(sample, encoding).values() if b is not None)
        return ("ok", stats.stem, stats.height, stats.width, stats.histogram, nbytes, source_sha256(files))
    except BadSample as e:
        return ("bad", e.path, e.problem)


def _row(layout: str, files: SampleFiles, index: int, encoding: str) -> dict:
    s = load(layout, files)
    stored = encodings.encode_sample(s, encoding)
    return {
        "index": index,
        "stem": s.stem,
        **stored,
        "height": s.image_size[0],
        "width": s.image_size[1],
        "crc32": sample_crc32(stored["label"], stored["inst"], stored["image"]),
    }


def _exit_with_parent(parent: int) -> None:
    """Pool worker initializer: end this process when the one that started it is gone (killed with -9, say),
    instead of waiting forever for work that will never come."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _map(workers: int, fn, *iterables):
    if workers <= 1:
        return list(map(fn, *iterables))
    with ProcessPoolExecutor(workers, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
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
    samples, dest, carved = _checked_inputs(opts)
    name = opts.name or os.path.basename(os.path.abspath(opts.source))
    good, bad = _validated(opts, samples, label_nc, log)
    splits: dict[str, list] = {opts.split: [], CARVED_SPLIT: []} if opts.val_fraction > 0 else {opts.split: []}
    for s, r in good:
        to_val = opts.val_fraction > 0 and val_fraction_of(s.stem) < opts.val_fraction
        splits[CARVED_SPLIT if to_val else opts.split].append((s, r))
    for split, items in splits.items():
        if not items:
            raise ValueError(
                f"--val-fraction {opts.val_fraction} leaves split '{split}' empty; change it. Nothing was written."
            )
    manifests = {}
    for split, items in splits.items():
        carved_from = opts.split if split == CARVED_SPLIT and opts.val_fraction > 0 else None
        manifests[split] = _write_split(opts, dest.join(split), split, name, label_nc, items, carved_from, log)
    if opts.val_fraction == 0 and carved is not None and carved.get("carved_from") == opts.split:
        _remove_split(dest.join(CARVED_SPLIT))
        log(
            f"[{CARVED_SPLIT}] removed: it was carved out of '{opts.split}' by an earlier --val-fraction, and this "
            f"run has none (its samples are in '{opts.split}' now)"
        )
    report = dest.join(f"skipped-{opts.split}.json")
    if bad:
        rows = [{"file": r[1], "problem": r[2]} for _, r in bad]
        storage.write_bytes_atomic(report, json.dumps(rows, indent=1).encode())
        log(f"skipped {len(bad)} bad samples; report: {report}")
    elif storage.exists(report):
        storage.delete(report)  # an earlier run's report no longer describes this data
    return manifests


def _checked_inputs(opts: PrepareOptions) -> tuple[list, Location, dict | None]:
    """The options, the source's samples and the destination checked before anything is read or written:
    (samples, destination, the destination's carved validation split's manifest if any)."""
    encodings.check(opts.encoding)
    if not 0.0 <= opts.val_fraction < 1.0:
        raise ValueError(f"--val-fraction {opts.val_fraction} must be in [0, 1)")
    if opts.val_fraction > 0 and opts.split == CARVED_SPLIT:
        raise ValueError(
            f"--val-fraction carves a '{CARVED_SPLIT}' split out of --split; it cannot carve it out of itself"
        )
    samples = discover(opts.layout, opts.source, opts.split)
    if not samples:
        raise ValueError(f"no samples found for split '{opts.split}' in {opts.source} ({opts.layout} layout)")
    dest = storage.resolve(opts.dest)
    storage.check_writable(dest)
    carved = _published(dest, CARVED_SPLIT)
    if opts.val_fraction > 0 and carved is not None and carved.get("carved_from") != opts.split:
        raise ValueError(
            f"{dest.join(CARVED_SPLIT, 'manifest.json')} holds a '{CARVED_SPLIT}' split prepared on its own (from "
            f"{carved.get('source')}); --val-fraction would replace it. Use another --dest, or drop --val-fraction"
        )
    return samples, dest, carved


def _validated(opts: PrepareOptions, samples: list, label_nc: int, log) -> tuple[list, list]:
    """Every sample inspected in `opts.workers` processes: (good, bad) as (sample, result) pairs. A bad sample
    stops everything (BadSample, nothing written) unless --skip-bad."""
    t0 = time.perf_counter()
    log(f"validating {len(samples)} samples from {opts.source} ({opts.layout} layout, {opts.workers} processes)")
    n = len(samples)
    results = _map(
        opts.workers,
        _inspect,
        [opts.layout] * n,
        samples,
        [label_nc] * n,
        [opts.instance_scheme] * n,
        [opts.encoding] * n,
    )
    bad = [(s, r) for s, r in zip(samples, results, strict=True) if r[0] == "bad"]
    if bad and not opts.skip_bad:
        path, problem = bad[0][1][1], bad[0][1][2]
        more = f" ({len(bad) - 1} more bad samples; --skip-bad skips them and writes a report)" if len(bad) > 1 else ""
        raise BadSample(path, f"{problem}{more}. Nothing was written.")
    good = [(s, r) for s, r in zip(samples, results, strict=True) if r[0] == "ok"]
    if not good:
        raise ValueError(f"every sample in {opts.source} is bad; see the first: {bad[0][1][1]}: {bad[0][1][2]}")
    log(f"validated in {time.perf_counter() - t0:.1f}s: {len(good)} good, {len(bad)} skipped")
    return good, bad


def _published(dest: Location, split: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(dest.join(split, "manifest.json")))
    except (FileNotFoundError, ValueError):
        return None


def _remove_split(out: Location) -> None:
    """Unpublish a split (its manifest first), then delete its shards and records."""
    storage.delete(out.join("manifest.json"))
    storage.delete_tree(out)


def _write_split(
    opts, out: Location, split: str, name: str, label_nc: int, items: list, carved_from: str | None, log
) -> dict:
    files = [s for s, _ in items]
    stats = [r for _, r in items]
    plan = _plan([r[5] for r in stats], int(opts.shard_mb * 2**20))
    wanted = []  # (shard name, members, the record a finished shard must have)
    for k, members in enumerate(plan):
        record = {
            "stems": [files[i].stem for i in members],
            "sources": [stats[i][6] for i in members],
            "encoding": opts.encoding,
            "first_index": members[0],
        }
        wanted.append((f"shard-{k:05d}.parquet", members, record))
    finished = {n: _finished_shard(out.join(n), _record_of(out, n), r) for n, _, r in wanted}
    stale = [n for n, entry in finished.items() if entry is None]
    if stale and storage.exists(out.join("manifest.json")):
        storage.delete(out.join("manifest.json"))
        log(f"[{split}] unpublished while {len(stale)} of {len(wanted)} shards are (re)written")
    shard_entries = []
    for shard_name, members, record in wanted:
        entry = finished[shard_name]
        if entry is not None:
            log(f"[{split}] {shard_name}: already written from the same source bytes and verified, skipped")
        else:
            entry = _write_shard(opts, out, shard_name, [files[i] for i in members], members, record, split, log)
        shard_entries.append(entry)

    heights = [r[2] for r in stats]
    widths = [r[3] for r in stats]
    uniform = len(set(zip(heights, widths, strict=True))) == 1
    manifest = {
        "format": FORMAT,
        "dataset": name,
        "layout": opts.layout,
        "split": split,
        "carved_from": carved_from,
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
    _remove_unlisted_shards(out, {n for n, _, _ in wanted})
    return manifest


def _write_shard(opts, out: Location, shard_name: str, files: list, members: list, record: dict, split: str, log):
    """One shard's rows decoded in `opts.workers` processes, written with its record; returns its manifest entry."""
    t0 = time.perf_counter()
    n = len(members)
    rows = _map(opts.workers, _row, [opts.layout] * n, files, members, [opts.encoding] * n)
    data = _parquet_bytes(rows)
    entry = {
        "name": shard_name,
        "count": n,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "first_index": members[0],
    }
    storage.write_bytes_atomic(out.join(shard_name), data)
    storage.write_bytes_atomic(_record_of(out, shard_name), json.dumps({**entry, **record}).encode())
    log(f"[{split}] {shard_name}: {n} samples, {len(data) / 2**20:.1f} MB in {time.perf_counter() - t0:.1f}s")
    return entry


def _record_of(out: Location, shard_name: str) -> Location:
    return out.join("_progress", shard_name.replace(".parquet", ".json"))


def _remove_unlisted_shards(out: Location, listed: set[str]) -> None:
    """Shards of an earlier, larger run that the new manifest does not list (and their records)."""
    for loc in storage.list_files(out):
        name = loc.uri.rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith(".parquet") and name not in listed:
            storage.delete(loc)
            storage.delete(_record_of(out, name))


def _finished_shard(shard: Location, record: Location, wanted: dict) -> dict | None:
    """The shard's manifest entry when an earlier run wrote exactly these samples from the same source bytes, in
    this encoding and at these indices, and the shard's bytes still verify."""
    if not storage.exists(record) or not storage.exists(shard):
        return None
    try:
        rec = json.loads(storage.read_bytes(record))
    except (ValueError, FileNotFoundError):
        return None
    if (
        any(rec.get(key) != value for key, value in wanted.items())
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

    @property
    def has_crc32(self) -> bool:
        return self.data["format"] != "pix2pixhd-shards/1"

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
    if data.get("format") not in READABLE_FORMATS:
        raise ManifestError(f"{loc}: format {data.get('format')!r}, expected {FORMAT!r}; re-run prepare_data")
    return Manifest(data, root.join(split))


def content_sha256(uri: str, split: str = "train") -> str:
    """A digest of what a split holds (its shards' names, sizes and sha256), unlike the manifest's own bytes the
    same when the same samples are prepared again: what a model trained on the split can be matched by."""
    shards = load_manifest(uri, split)["shards"]
    listed = sorted((s["name"], s["count"], s["bytes"], s["sha256"]) for s in shards)
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


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
