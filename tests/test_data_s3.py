"""Shards in S3 (moto's server over real HTTP) streamed back through Ray Data."""

import io
import subprocess
import sys
import threading
import time

import boto3
import numpy as np
import pytest
from PIL import Image

from data.layouts import discover, load
from data.pipeline import build_dataset, iter_epoch
from data.pipeline_config import PipelineConfig
from data.shards import ManifestError, PrepareOptions, prepare
from data.storage import StorageError
from data.synthetic.write import write_city, write_faces
from data.transforms import Geometry

EXACT = PipelineConfig(geometry=Geometry("none", size_multiple=1, no_flip=True), instance_output="ids", batch_size=2)


def quiet(_):
    pass


def read_back(uri, split="train", cfg=EXACT):
    ds = build_dataset(uri, split, cfg)
    out = {}
    for b in iter_epoch(ds, cfg, epoch=0, train=False):
        for i, idx in enumerate(b["index"].tolist()):
            out[idx] = {k: v[i] for k, v in b.items() if k != "index"}
    return out


def assert_exact(layout, source, back):
    samples = discover(layout, source)
    assert sorted(back) == list(range(len(samples)))
    for idx, files in enumerate(samples):  # manifest index = stem order
        src = load(layout, files)
        got = back[idx]
        assert np.array_equal(got["label"].numpy(), src.label)
        if src.inst is not None:
            assert np.array_equal(got["inst"].numpy(), src.inst)
        image = np.asarray(Image.open(io.BytesIO(src.image_bytes)).convert("RGB"))
        restored = ((got["image"].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8)
        assert np.array_equal(restored, image)


def test_prepare_cli_to_s3_then_stream_back_bit_exact(ray_local, bucket, tmp_path):
    src = write_city(tmp_path / "city", count=8, height=32, width=64, workers=1)
    uri = f"{bucket}/datasets/city"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            *f"jobs.prepare_data --layout flat --source {src} --dest {uri} --name synthetic-city".split(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert f"{uri}/train/manifest.json" in r.stdout
    assert "testing-secret-key" not in r.stdout + r.stderr
    assert_exact("flat", src, read_back(uri))


def test_two_workers_see_disjoint_samples_covering_the_split_reproducibly(ray_local, bucket, tmp_path):
    src = write_city(tmp_path / "city", count=12, height=32, width=64, workers=1)
    prepare(PrepareOptions("flat", str(src), f"{bucket}/city", shard_mb=0.02, workers=1), log=quiet)
    cfg = PipelineConfig(geometry=Geometry("none", size_multiple=1), batch_size=2, seed=7)
    ds = build_dataset(f"{bucket}/city", "train", cfg)

    def epoch_split(epoch):
        parts = ds.streaming_split(2, equal=True)
        seen = [[], []]

        def consume(rank):
            seen[rank] = [i for b in iter_epoch(parts[rank], cfg, epoch) for i in b["index"].tolist()]

        threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return seen

    a, b = epoch_split(0)
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(12))
    assert len(a) == len(b) == 6
    assert epoch_split(0) == [a, b]  # same seed, same epoch: the same order on each worker


def test_rerun_on_s3_skips_the_shards_already_written(ray_local, bucket, tmp_path):
    src = write_city(tmp_path / "city", count=6, height=32, width=64, workers=1)
    opts = PrepareOptions("flat", str(src), f"{bucket}/city", shard_mb=0.01, workers=1)
    first = prepare(opts, log=quiet)["train"]
    s3 = boto3.client("s3")
    name = bucket.removeprefix("s3://")
    s3.delete_object(Bucket=name, Key="city/train/manifest.json")
    s3.delete_object(Bucket=name, Key=f"city/train/{first['shards'][0]['name']}")
    logs = []
    second = prepare(opts, log=logs.append)["train"]
    assert (
        sum("already written from the same source bytes and verified, skipped" in line for line in logs)
        == len(first["shards"]) - 1
    )
    assert second["shards"] == first["shards"]
    assert_exact("flat", src, read_back(f"{bucket}/city"))


def test_truncated_shard_in_s3_is_refused_naming_it(ray_local, bucket, tmp_path):
    src = write_city(tmp_path / "city", count=2, height=32, width=64, workers=1)
    prepare(PrepareOptions("flat", str(src), f"{bucket}/city", workers=1), log=quiet)
    s3 = boto3.client("s3")
    name = bucket.removeprefix("s3://")
    body = s3.get_object(Bucket=name, Key="city/train/shard-00000.parquet")["Body"].read()
    s3.put_object(Bucket=name, Key="city/train/shard-00000.parquet", Body=body[: len(body) // 2])
    with pytest.raises(ManifestError, match=rf"{bucket}/city/train/shard-00000.parquet is \d+ bytes.*truncated"):
        build_dataset(f"{bucket}/city", "train", EXACT)


def test_a_shard_deleted_while_a_stage_streams_is_an_input_error_naming_it(ray_local, bucket, tmp_path):
    """WEAK (a): verified when the stage began, gone mid-epoch: one ManifestError naming the shard (Train's failure
    policy does not retry those), not Ray's FileNotFoundError inside task wrappers, retried as a fault."""
    src = write_city(tmp_path / "city", count=12, height=32, width=64, workers=1)
    first = prepare(PrepareOptions("flat", str(src), f"{bucket}/city", shard_mb=0.02, workers=1), log=quiet)["train"]
    assert len(first["shards"]) >= 3
    ds = build_dataset(f"{bucket}/city", "train", EXACT)
    gone = first["shards"][-1]["name"]
    boto3.client("s3").delete_object(Bucket=bucket.removeprefix("s3://"), Key=f"city/train/{gone}")
    t0 = time.monotonic()
    with pytest.raises(ManifestError, match=rf"{gone} is listed in the manifest but was deleted while the stage"):
        for _ in iter_epoch(ds, EXACT, epoch=0):
            pass
    assert time.monotonic() - t0 < 40


def test_data_uri_without_manifest_is_a_clear_error(ray_local, bucket):
    with pytest.raises(ManifestError, match=rf"no manifest at {bucket}/nothing/train/manifest.json"):
        build_dataset(f"{bucket}/nothing", "train", EXACT)


def test_unreachable_bucket_is_a_clear_error(s3, tmp_path, monkeypatch):
    from tests.services import free_port

    src = write_city(tmp_path / "city", count=1, height=32, width=64, workers=1)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match=r"cannot reach s3://nowhere/city \(endpoint http://127.0.0.1:\d+\)"):
        prepare(PrepareOptions("flat", str(src), "s3://nowhere/city", workers=1), log=quiet)


def test_missing_bucket_is_named(s3, tmp_path):
    src = write_city(tmp_path / "city", count=1, height=32, width=64, workers=1)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' of s3://no-such-bucket/x does not exist"):
        prepare(PrepareOptions("flat", str(src), "s3://no-such-bucket/x", workers=1), log=quiet)


@pytest.mark.parametrize("encoding", ["png", "zstd"])
def test_real_cityscapes_samples_round_trip_through_s3(ray_local, bucket, cityscapes_samples, encoding):
    opts = PrepareOptions("flat", str(cityscapes_samples), f"{bucket}/cs-{encoding}", workers=2, encoding=encoding)
    m = prepare(opts, log=quiet)["train"]
    assert m["encoding"] == encoding
    assert_exact("flat", cityscapes_samples, read_back(f"{bucket}/cs-{encoding}"))


@pytest.mark.parametrize("encoding", ["png", "zstd"])
def test_synthetic_faces_with_19_classes_round_trip(ray_local, bucket, tmp_path, encoding):
    src = write_faces(tmp_path / "faces", count=40, size=64, workers=2)
    opts = PrepareOptions(
        "celebamask", str(src), f"{bucket}/faces", name="synthetic-faces", workers=2, encoding=encoding
    )
    m = prepare(opts, log=quiet)
    assert m["train"]["label_nc"] == 19 and not m["train"]["has_instances"]
    assert sum(c > 0 for c in m["train"]["class_histogram"]) == 19
    cfg = PipelineConfig(geometry=Geometry("none", size_multiple=1, no_flip=True), instance_output="none", batch_size=4)
    back = read_back(f"{bucket}/faces", cfg=cfg)
    assert_exact("celebamask", src, back)
    assert len(set(np.unique(np.stack([b["label"].numpy() for b in back.values()])).tolist())) == 19


def test_a_failed_prepare_leaves_nothing_in_the_bucket(s3, bucket, tmp_path):
    src = write_city(tmp_path / "city", count=2, height=32, width=64, workers=1)
    next((src / "train_img").iterdir()).write_bytes(b"not a png")
    from data.layouts import BadSample

    with pytest.raises(BadSample, match="Nothing was written"):
        prepare(PrepareOptions("flat", str(src), f"{bucket}/deep/prefix/city", workers=1), log=quiet)
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket.removeprefix("s3://"))
    assert listed.get("Contents", []) == []  # no probe, no empty "folder/" marker object


@pytest.mark.parametrize("where", ["s3", "local"])
def test_create_exclusive_creates_once_of_many_at_once(bucket, tmp_path, where):
    """The run lease's primitive: of eight writers racing to create one object, exactly one succeeds (S3: a
    conditional PUT, which moto's server honours as AWS S3 and MinIO do; local: O_EXCL)."""
    from concurrent.futures import ThreadPoolExecutor

    from data import storage

    loc = storage.resolve(
        f"{bucket}/runs/r/lease.json" if where == "s3" else str(tmp_path / "runs" / "r" / "lease.json")
    )
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: storage.create_exclusive(loc, f"writer {i}".encode()), range(8)))
    assert won.count(True) == 1
    assert storage.read_bytes(loc) == f"writer {won.index(True)}".encode()
    assert storage.create_exclusive(loc, b"late") is False
