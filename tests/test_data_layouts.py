"""Layouts, validation and shard writing on local disk: every bad input is a clear error naming the file."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data.layouts import BadSample, LayoutError, discover, load
from data.shards import ManifestError, PrepareOptions, load_manifest, prepare, verify
from data.synthetic.write import write_city, write_faces
from jobs.prepare_data import main as prepare_main


@pytest.fixture
def city(tmp_path):
    return write_city(tmp_path / "city", count=6, height=32, width=64, workers=1)


def run(source, dest, layout="flat", **kw):
    return prepare(
        PrepareOptions(layout=layout, source=str(source), dest=str(dest), workers=1, **kw), log=lambda m: None
    )


def test_flat_files_pair_by_stem_not_by_sorted_order(tmp_path):
    # image names sort differently from label names; pairing must still follow the stem
    root = tmp_path / "ds"
    for d in ("train_label", "train_inst", "train_img"):
        (root / d).mkdir(parents=True)
    for stem, cls in (("b", 7), ("a", 11)):
        Image.fromarray(np.full((8, 8), cls, np.uint8)).save(root / "train_label" / f"{stem}.png")
        Image.fromarray(np.full((8, 8), cls, np.uint16)).save(root / "train_inst" / f"{stem}.png")
        Image.fromarray(np.full((8, 8, 3), cls, np.uint8)).save(
            root / "train_img" / f"{'z' if stem == 'a' else 'y'}_{stem}.png"
        )
    (root / "train_img" / "z_a.png").rename(root / "train_img" / "a_leftImg8bit.png")
    (root / "train_img" / "y_b.png").rename(root / "train_img" / "b_leftImg8bit.png")
    samples = discover("flat", root)
    assert [s.stem for s in samples] == ["a", "b"]
    for s in samples:
        x = load("flat", s)
        assert np.asarray(Image.open(s.image))[0, 0, 0] == x.label[0, 0]


def test_cityscapes_and_celebamask_layouts_are_discovered(tmp_path):
    write_city(tmp_path / "cs", count=4, height=32, width=64, layout="cityscapes", split="val", workers=1)
    samples = discover("cityscapes", tmp_path / "cs", "val")
    assert len(samples) == 4 and all(s.inst is not None for s in samples)
    assert samples[0].label.parent.parent.name == "val"
    write_faces(tmp_path / "faces", count=3, size=32, workers=1)
    faces = discover("celebamask", tmp_path / "faces")
    assert [f.stem for f in faces] == ["0", "1", "2"] and "skin" in faces[0].masks
    x = load("celebamask", faces[0])
    assert x.label.shape == (32, 32) and x.inst is None  # 16x16 masks brought to the 32x32 image


def test_unpaired_file_is_named(city):
    (city / "train_img" / "synthtown_000000_000019_leftImg8bit.png").unlink()
    with pytest.raises(
        LayoutError, match=r"synthtown_000000_000019_gtFine_labelIds.png has no matching image file.*unpaired"
    ):
        discover("flat", city)


def test_missing_instance_file_is_named(city):
    (city / "train_inst" / "procville_000001_000019_gtFine_instanceIds.png").unlink()
    with pytest.raises(LayoutError, match=r"procville_000001_000019_.*has no matching inst file"):
        discover("flat", city)


def test_unknown_layout(city, capsys):
    with pytest.raises(LayoutError, match="unknown layout 'ade20k': use one of flat, cityscapes, celebamask"):
        discover("ade20k", city)
    assert prepare_main(["--layout", "ade20k", "--source", str(city), "--dest", str(city / "out")]) == 2
    assert "unknown layout 'ade20k'" in capsys.readouterr().err


def _rewrite(path, fn):
    a = np.asarray(Image.open(path)).copy()
    Image.fromarray(fn(a)).save(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda c: _rewrite(
                next((c / "train_label").glob("rendham_000002*")), lambda a: np.where(a == 7, 40, a).astype(np.uint8)
            ),
            r"rendham_000002_000019_gtFine_labelIds.png: label ids \[40\] are >= label_nc 35",
        ),
        (
            lambda c: Image.new("RGB", (64, 30)).save(next((c / "train_img").glob("rendham_000002*"))),
            r"rendham_000002_000019_gtFine_labelIds.png: label map is 64x32 but the image .* is 64x30",
        ),
        (
            lambda c: next((c / "train_img").glob("rendham_000002*")).write_bytes(b"\x89PNG\r\n\x1a\nbroken"),
            r"rendham_000002_000019_leftImg8bit.png: cannot decode image",
        ),
        (
            lambda c: _rewrite(
                next((c / "train_inst").glob("rendham_000002*")),
                lambda a: np.where(a == 11, 26000, a).astype(np.uint16),
            ),
            r"rendham_000002_000019_gtFine_instanceIds.png: \d+ pixels have instance ids that disagree with the label map",
        ),
        (
            lambda c: Image.fromarray(np.full((32, 64), 30000, np.uint16)).save(
                next((c / "train_img").glob("rendham_000002*"))
            ),
            r"rendham_000002_000019_leftImg8bit.png: photo mode I;16 is not supported",
        ),
        (  # a small file (a 36 M pixel PNG of one colour) that would decode to 100 MB: refused by its header
            lambda c: Image.new("RGB", (9000, 4000)).save(next((c / "train_img").glob("rendham_000002*"))),
            r"rendham_000002_000019_leftImg8bit.png: image is 9000x4000, over the 33 M pixels a sample may have",
        ),
    ],
    ids=["label>=label_nc", "size-mismatch", "corrupt-png", "inconsistent-instances", "16-bit-grey-photo", "huge-png"],
)
def test_bad_sample_stops_before_anything_is_written(city, tmp_path, damage, message):
    damage(city)
    with pytest.raises(BadSample, match=message + r".*Nothing was written"):
        run(city, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()  # not even the folders the write probe needed


def test_skip_bad_writes_a_report_and_publishes_the_rest(city, tmp_path):
    next((city / "train_img").glob("rendham_000002*")).write_bytes(b"junk")
    m = run(city, tmp_path / "out", skip_bad=True)["train"]
    assert m["sample_count"] == 5
    report = json.loads((tmp_path / "out" / "skipped-train.json").read_text())
    assert len(report) == 1 and report[0]["file"].endswith("rendham_000002_000019_leftImg8bit.png")
    assert "cannot decode" in report[0]["problem"]


def test_manifest_records_what_users_need(city, tmp_path):
    m = run(city, tmp_path / "out", name="synthetic-city", val_fraction=0.3)
    train, val = m["train"], m["val"]
    assert train["sample_count"] + val["sample_count"] == 6 and val["sample_count"] >= 1
    assert train["dataset"] == "synthetic-city" and train["label_nc"] == 35 and train["has_instances"]
    assert train["resolution"] == {"height": 32, "width": 64}
    assert sum(train["class_histogram"]) == train["sample_count"] * 32 * 64
    assert all(len(s["sha256"]) == 64 and s["count"] > 0 for s in train["shards"])
    assert "AWS" not in json.dumps(train)


def test_rerun_resumes_and_skips_verified_shards(city, tmp_path):
    logs = []
    opts = dict(layout="flat", source=str(city), dest=str(tmp_path / "out"), workers=1, shard_mb=0.01)
    first = prepare(PrepareOptions(**opts), log=logs.append)["train"]
    assert len(first["shards"]) >= 3
    # an interrupted run: the manifest and the last shard never made it
    (tmp_path / "out" / "train" / "manifest.json").unlink()
    last = first["shards"][-1]["name"]
    (tmp_path / "out" / "train" / last).unlink()
    logs.clear()
    second = prepare(PrepareOptions(**opts), log=logs.append)["train"]
    skipped = [line for line in logs if "already written from the same source bytes and verified, skipped" in line]
    assert len(skipped) == len(first["shards"]) - 1
    assert any(last in line and "samples" in line for line in logs)
    assert second["shards"] == first["shards"]


def test_rerun_in_another_encoding_rewrites_every_shard(city, tmp_path):
    opts = dict(layout="flat", source=str(city), dest=str(tmp_path / "out"), workers=1, shard_mb=0.01)
    first = prepare(PrepareOptions(**opts), log=lambda _: None)["train"]
    logs = []
    second = prepare(PrepareOptions(**opts, encoding="zstd"), log=logs.append)["train"]
    assert not any("already written from the same source bytes" in line for line in logs)
    assert second["encoding"] == "zstd" and first["encoding"] == "png"
    assert not {s["sha256"] for s in second["shards"]} & {s["sha256"] for s in first["shards"]}
    with pytest.raises(ValueError, match="encoding='jpeg' is not one of png, zstd"):
        prepare(PrepareOptions(**opts, encoding="jpeg"), log=lambda _: None)


def test_truncated_and_corrupt_shards_and_missing_manifest_are_caught(city, tmp_path):
    run(city, tmp_path / "out")
    m = load_manifest(str(tmp_path / "out"), "train")
    verify(m)
    shard = tmp_path / "out" / "train" / m["shards"][0]["name"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ManifestError, match=r"shard-00000.parquet is \d+ bytes, the manifest says \d+: truncated"):
        verify(m, "size")
    shard.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    verify(m, "size")  # same size: only the checksum can tell
    with pytest.raises(ManifestError, match="shard-00000.parquet: sha256 does not match the manifest"):
        verify(m)
    with pytest.raises(ManifestError, match=r"no manifest at .*/val/manifest.json.*jobs.prepare_data"):
        load_manifest(str(tmp_path / "out"), "val")


def test_real_cityscapes_samples_validate(cityscapes_samples, tmp_path):
    shutil.copytree(cityscapes_samples, tmp_path / "cs")
    m = run(tmp_path / "cs", tmp_path / "out", name="cityscapes")["train"]
    assert m["sample_count"] == 6 and m["resolution"] == {"height": 1024, "width": 2048}
    hist = np.array(m["class_histogram"])
    assert hist[7] > 0 and hist[26] > 0 and hist[34] == 0  # road, car; nothing at id 34


# ---- re-runs: prepared data is a function of the source bytes ---------------------------------------------


def shard_samples(dest, split="train"):
    """{stem: (label, image bytes)} and the class histogram computed from the shards themselves."""
    import pyarrow.parquet as pq

    from data.layouts import decode_png_ids

    m = load_manifest(str(dest), split)
    samples, hist = {}, np.zeros(m["label_nc"], np.int64)
    for loc in m.shard_locations:
        for row in pq.read_table(loc.path).to_pylist():
            label = decode_png_ids(row["label"])
            samples[row["stem"]] = (label, row["image"])
            hist += np.bincount(label.ravel(), minlength=m["label_nc"])
    return m, samples, hist


def test_a_changed_source_photo_or_label_rewrites_its_shard_and_the_statistics(city, tmp_path):
    opts = dict(layout="flat", source=str(city), dest=str(tmp_path / "out"), workers=1, shard_mb=0.01)
    prepare(PrepareOptions(**opts), log=lambda _: None)
    photo = next((city / "train_img").glob("rendham_000002*"))
    _rewrite(photo, lambda a: 255 - a)  # inverted photo, same stems, same sizes
    label = next((city / "train_label").glob("procville_000001*"))
    _rewrite(label, lambda a: np.where(a == 7, 8, a).astype(np.uint8))  # road becomes sidewalk
    inst = next((city / "train_inst").glob("procville_000001*"))
    _rewrite(inst, lambda a: np.where(a == 7, 8, a).astype(np.uint16))
    logs = []
    prepare(PrepareOptions(**opts), log=logs.append)
    rewritten = [line for line in logs if "samples," in line]
    assert len(rewritten) == 2 and any("unpublished while 2 of" in line for line in logs)
    m, samples, hist = shard_samples(tmp_path / "out")
    assert samples["rendham_000002_000019"][1] == photo.read_bytes()
    assert np.array_equal(samples["procville_000001_000019"][0], np.asarray(Image.open(label)))
    assert m["class_histogram"] == hist.tolist()


def test_dropping_val_fraction_removes_the_carved_val_split(city, tmp_path):
    opts = dict(layout="flat", source=str(city), dest=str(tmp_path / "out"), workers=1)
    first = prepare(PrepareOptions(**opts, val_fraction=0.3), log=lambda _: None)
    assert first["val"]["carved_from"] == "train" and first["val"]["sample_count"] >= 1
    logs = []
    second = prepare(PrepareOptions(**opts), log=logs.append)
    assert set(second) == {"train"} and second["train"]["sample_count"] == 6
    assert not (tmp_path / "out" / "val").exists()
    assert any("[val] removed: it was carved out of 'train'" in line for line in logs)
    with pytest.raises(ManifestError, match="no manifest at"):
        load_manifest(str(tmp_path / "out"), "val")


def test_a_val_split_prepared_on_its_own_is_not_replaced_by_val_fraction(tmp_path):
    root = write_city(tmp_path / "cs", count=3, height=32, width=64, layout="cityscapes", split="train", workers=1)
    write_city(root, count=2, height=32, width=64, layout="cityscapes", split="val", workers=1)
    run(root, tmp_path / "out", layout="cityscapes", split="val")
    with pytest.raises(ValueError, match=r"val/manifest.json holds a 'val' split prepared on its own"):
        run(root, tmp_path / "out", layout="cityscapes", val_fraction=0.5)
    run(root, tmp_path / "out", layout="cityscapes")  # without --val-fraction: the real val split stays
    assert load_manifest(str(tmp_path / "out"), "val")["sample_count"] == 2


def test_fewer_samples_on_a_rerun_leave_no_unlisted_shards(city, tmp_path):
    opts = dict(layout="flat", source=str(city), dest=str(tmp_path / "out"), workers=1, shard_mb=0.01)
    first = prepare(PrepareOptions(**opts), log=lambda _: None)["train"]
    for d in ("train_label", "train_inst", "train_img"):
        for f in sorted((city / d).iterdir())[-2:]:
            f.unlink()
    second = prepare(PrepareOptions(**opts), log=lambda _: None)["train"]
    assert len(second["shards"]) < len(first["shards"])
    on_disk = sorted(p.name for p in (tmp_path / "out" / "train").glob("shard-*.parquet"))
    assert on_disk == [s["name"] for s in second["shards"]]
    assert len(list((tmp_path / "out" / "train" / "_progress").iterdir())) == len(second["shards"])


def test_a_shard_altered_in_place_names_shard_and_sample_whatever_the_verify_level(city, tmp_path):
    from data.pipeline import read_samples
    from data.pipeline_config import PipelineConfig
    from data.shards import ShardContentError
    from data.transforms import Geometry

    run(city, tmp_path / "out")
    m = load_manifest(str(tmp_path / "out"), "train")
    shard = tmp_path / "out" / "train" / m["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    at = data.find(b"IDAT", len(data) // 2)  # inside a stored PNG: Parquet's own structure stays readable
    data[at + 8] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify(m, "size")  # the size check cannot see it
    cfg = PipelineConfig(geometry=Geometry("none", size_multiple=1), verify="none")
    with pytest.raises(
        ShardContentError, match=r"shard-00000.parquet: sample \S+ \(index \d+\) is not what prepare_data wrote"
    ):
        read_samples(str(tmp_path / "out"), "train", cfg, 6)


def test_killing_prepare_data_leaves_no_worker_processes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    src = write_city(tmp_path / "big", count=64, height=256, width=512, workers=2)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            *f"jobs.prepare_data --layout flat --source {src} --dest {tmp_path}/out --workers 2".split(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    while len(parent.children()) < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    workers = parent.children()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    for p in alive:  # the test's own clean-up when it fails
        p.kill()
    assert not alive, f"{len(alive)} decode workers outlived prepare_data"
