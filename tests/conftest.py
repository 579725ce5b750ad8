import os

import pytest
import torch

from model.options import ModelOptions

MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def mlflow_uris_do_not_leak():
    """mlflow.set_tracking_uri / set_registry_uri also write MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into
    os.environ, which every later subprocess inherits: Ray nodes a later test starts then track into this test's
    store (a cluster job without a tracking URI was no longer refused). Restored after each test, and MLflow's
    in-process URIs unset."""
    saved = {k: os.environ.get(k) for k in MLFLOW_URI_VARIABLES}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    # ... and in this process: a registry URI set by one test (load_generator sets both) sent a later test's
    # mlflow.register_model / load_model to the other test's store
    import sys

    if "mlflow" in sys.modules:
        import mlflow.tracking._model_registry.utils as registry_uri
        import mlflow.tracking._tracking_service.utils as tracking_uri

        tracking_uri._tracking_uri = None
        registry_uri._registry_uri = None


def tiny_options(**overrides) -> ModelOptions:
    """A pix2pixHD small enough for CPU tests: 8 classes, ngf 8, two downsamplings."""
    base = dict(
        label_nc=8,
        ngf=8,
        n_downsample_global=2,
        n_blocks_global=2,
        n_blocks_local=1,
        ndf=8,
        num_D=2,
        n_layers_D=2,
        nef=4,
        n_downsample_E=2,
        niter=1,
        niter_decay=0,
    )
    base.update(overrides)
    return ModelOptions(**base)


def tiny_batch(opt: ModelOptions, n: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Blocky labels, instances and an image that is a function of them (so G can learn it)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, opt.label_nc, (n, h // 8, w // 8), generator=g)
    label = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2).to(torch.uint8)
    inst = label.long() * 1000 + (torch.arange(w) >= w // 2).long()
    palette = torch.rand(opt.label_nc, 3, generator=g) * 2 - 1
    image = palette[label.long()].permute(0, 3, 1, 2).contiguous()
    return {"label": label, "inst": inst, "image": image}


@pytest.fixture
def opt() -> ModelOptions:
    return tiny_options()


# ---- real local services ---------------------------------------------------------------------------------

SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared"
CITYSCAPES_SAMPLES = SHARED / "datasets" / "cityscapes_samples"


@pytest.fixture(scope="session")
def city6(tmp_path_factory) -> str:
    """Six procedural street scenes (128x64) prepared once for the session, no validation split: read, never
    written, by the tests that take it."""
    from tests.helpers import prepared_city

    return prepared_city(tmp_path_factory.mktemp("city6"), count=6)


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 400 KiB (tmpfs, mounted by this test as root): writes past it fail with ENOSPC, as on
    a full disk. Skips when not root. Unmounted afterwards."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    where = tmp_path / "small-disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, with the AWS environment pointing at it. Yields the endpoint URL."""
    from tests.services import apply_env, moto_s3_server, restore_env, s3_environment

    with moto_s3_server(tmp_path_factory.mktemp("moto")) as endpoint:
        old = apply_env(s3_environment(endpoint))
        try:
            yield endpoint
        finally:
            restore_env(old)


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket per test; yields its s3:// URI."""
    import re

    from tests.services import make_bucket

    name = (
        re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
        + "-"
        + str(abs(hash(request.node.nodeid)) % 10**6)
    )
    make_bucket(s3, name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def ray_local(s3):
    """A local Ray instance with 2 CPUs (started after the S3 environment, so its workers inherit it)."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, object_store_memory=500 * 2**20, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def cityscapes_samples():
    if not CITYSCAPES_SAMPLES.is_dir():
        pytest.skip(
            f"real Cityscapes samples not present at {CITYSCAPES_SAMPLES} (they ship in ../shared, not the repo)"
        )
    return CITYSCAPES_SAMPLES


# ---- the test bed: docker/compose.yaml as hosts (tests/compose_bed.py) --------------------------------------

BED_SECRET = f"p2p-secret-{__import__('uuid').uuid4().hex}"  # the nodes' S3 secret: must reach no log, no MLflow
BED_TOKEN = f"p2p-token-{__import__('uuid').uuid4().hex}"


@pytest.fixture(scope="module")
def testbed():
    """docker/compose.yaml started as a cluster of hosts, once: for the one module that takes it
    (tests/test_cluster.py), shared by its tests and stopped when it ends, so that the rest of the suite does not
    run beside an idle cluster (test_register_infer.py took 196 s beside it, 183 s alone). MinIO (moto), its bucket,
    PostgreSQL, MLflow, a Ray head and two workers, and a client host. The env file is docker/.env.example with
    fresh secrets; Ray token authentication on, as there. The one difference from the file: Ray's head notices a
    lost node after 3 s (1 s x 3 health checks) instead of Ray's 15."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.compose_bed import POSTGRES_BIN, ComposeBed
    from tests.hosts import unavailable

    reason = unavailable() or (None if POSTGRES_BIN else "PostgreSQL is not installed: make test installs it (root)")
    if reason:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="p2pbed-", dir="/tmp"))
    work.chmod(0o711)  # PostgreSQL runs as its own user and must reach its folder
    env = {"MINIO_ROOT_PASSWORD": BED_SECRET, "POSTGRES_PASSWORD": BED_SECRET[-16:], "RAY_AUTH_TOKEN": BED_TOKEN}
    faster = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    # P2P_COMPOSE_FILE: another compose file (beside its .env.example), e.g. an older one, to see a test fail on it
    compose = Path(os.environ.get("P2P_COMPOSE_FILE", Path(__file__).resolve().parents[1] / "docker" / "compose.yaml"))
    bed = ComposeBed(work, env, compose_file=compose, extra_env={"ray-head": faster})
    try:
        bed.up()
        yield bed
    finally:
        bed.down()
        keep = Path("test-artifacts") / "testbed"  # the services' logs, for a failed run's reader
        shutil.rmtree(keep, ignore_errors=True)
        for log in work.glob("*/service.log"):
            (keep / log.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(log, keep / log.parent.name / "service.log")
        shutil.rmtree(work, ignore_errors=True)
