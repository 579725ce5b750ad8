"""Tracker and registry bundle against a real (sqlite) MLflow store, no server."""

import io
import itertools
import logging
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from data import storage
from orchestration.records.tracking import (
    RUN_TAG,
    STAGE_TAG,
    UNREACHABLE_WAIT_S,
    Tracker,
    filter_value,
    quiet_client,
    send_unsent,
    unsent_file,
    unsent_folder,
)


def test_a_resumed_stage_logs_into_the_same_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tags = {RUN_TAG: "r1", STAGE_TAG: "2"}
    job = Tracker(uri, "exp", {RUN_TAG: "r1"}, "r1")  # the driver's: it creates the parent run
    first = Tracker(uri, "exp", tags, "r1/stage2", parent_tags={RUN_TAG: "r1"})
    first.params({"model": {"ngf": 8}})
    first.metrics({"G_GAN": 1.0, "note": "text is skipped"}, step=1)
    assert first.close("FAILED")  # a worker died
    second = Tracker(uri, "exp", tags, "r1/stage2", parent_tags={RUN_TAG: "r1"})
    second.params({"model": {"ngf": 8}})  # params are immutable: logging them again must not fail
    second.metrics({"G_GAN": 0.5}, step=2)
    second.artifact(b"\x89PNG fake", "images/epoch_0002.png")
    assert second.close("FINISHED") and job.close("FINISHED")
    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("exp").experiment_id])
    stage = [r for r in runs if r.data.tags[STAGE_TAG] == "2"]
    parent = [r for r in runs if r.data.tags[STAGE_TAG] == "parent"]
    assert len(stage) == 1 and len(parent) == 1
    assert stage[0].data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert stage[0].info.status == "FINISHED" and stage[0].data.params["model.ngf"] == "8"
    assert [(m.step, m.value) for m in c.get_metric_history(stage[0].info.run_id, "G_GAN")] == [(1, 1.0), (2, 0.5)]
    assert [a.path for a in c.list_artifacts(stage[0].info.run_id, "images")] == ["images/epoch_0002.png"]


def test_images_carry_their_step_and_a_stage_run_has_system_metrics(tmp_path):
    """The UI's image view reads images/<key>+step+<n>+...png (and the loggedImages tag); system metrics are
    sampled every system_metrics_s while the run is open."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = Tracker(uri, "exp", {RUN_TAG: "r3"}, "r3", system_metrics_s=0.5)
    for step, colour in ((57, (255, 0, 0)), (114, (0, 0, 255))):
        t.image(png_of(colour), "held-out", step)
    t.flush()
    time.sleep(2.5)  # a few samples
    assert t.close("FINISHED")
    c = MlflowClient(tracking_uri=uri)
    (run,) = c.search_runs([c.get_experiment_by_name("exp").experiment_id])
    paths = [a.path for a in c.list_artifacts(run.info.run_id, "images")]
    shown = {}
    for path in paths:
        m = re.fullmatch(r"images/held-out\+step\+(\d+)\+timestamp\+\d+\+[-0-9a-f]+\.png", path)
        if m:
            with Image.open(c.download_artifacts(run.info.run_id, path, str(tmp_path))) as im:
                shown[int(m.group(1))] = im.getpixel((0, 0))
    assert shown == {57: (255, 0, 0), 114: (0, 0, 255)}, paths
    assert run.data.tags["mlflow.loggedImages"] == "True"
    samples = c.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(samples) >= 2 and all(0 <= s.value <= 100 for s in samples)
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0


def png_of(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_only_the_parent_tracker_creates_the_parent_run(tmp_path):
    """A stage's tracker (in a worker) and the job's (in the driver) reconnect together after an outage: had both
    searched for the parent run, found none and created one, two parents would exist and one stay RUNNING."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    stage = Tracker(uri, "exp", {RUN_TAG: "r2", STAGE_TAG: "1"}, "r2/stage1", parent_tags={RUN_TAG: "r2"})
    stage.metrics({"G_GAN": 1.0}, step=1)
    assert stage.flush(timeout=3) is False  # it waits for the parent run and creates nothing meanwhile
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("exp").experiment_id
    assert c.search_runs([exp]) == []
    job = Tracker(uri, "exp", {RUN_TAG: "r2"}, "r2")
    assert stage.close("FINISHED") and job.close("FINISHED")
    runs = {r.data.tags[STAGE_TAG]: r for r in c.search_runs([exp])}
    assert len(c.search_runs([exp])) == 2 and set(runs) == {"parent", "1"}
    assert runs["1"].data.tags["mlflow.parentRunId"] == runs["parent"].info.run_id
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert [m.value for m in c.get_metric_history(runs["1"].info.run_id, "G_GAN")] == [1.0]


def test_an_unreachable_server_never_raises_or_blocks(tmp_path):
    from tests.services import free_port

    messages = []
    t = Tracker(f"http://127.0.0.1:{free_port()}", "exp", {RUN_TAG: "x"}, "x", log=messages.append)
    start = time.monotonic()
    for step in range(100):
        t.metrics({"G_GAN": 1.0}, step)  # the training loop is never held up
    assert time.monotonic() - start < 0.5
    start = time.monotonic()
    assert t.close(timeout=60) is False  # bounded by UNREACHABLE_WAIT_S once the server is known to be down
    assert time.monotonic() - start < UNREACHABLE_WAIT_S + 2
    assert any("cannot log to" in m and "training continues" in m for m in messages)
    assert any("were not sent" in m for m in messages)
    # a tracker started after the outage was seen in this process waits as little, and warns no more
    messages.clear()
    start = time.monotonic()
    late = Tracker(t.uri, "exp", {RUN_TAG: "y"}, "y", log=messages.append)
    late.tags_({"a": "b"})
    assert late.close("FINISHED", timeout=30) is False
    assert time.monotonic() - start < UNREACHABLE_WAIT_S + 2
    assert not any("cannot log to" in m for m in messages)


class ResettingServer:
    """An HTTP server on 127.0.0.1 that answers the first request on each connection and keeps it alive, then
    resets the connection (RST, no answer) when a second request comes on it: a server closing an idle kept-alive
    connection just as the client sends on it. With `reset_all`, it resets every request."""

    EXPERIMENT = b'{"experiment": {"experiment_id": "1", "name": "e", "lifecycle_stage": "active"}}'

    def __init__(self, reset_all: bool = False):
        self.reset_all, self.answered, self.resets = reset_all, 0, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn, conn.makefile("rb") as reader:
            for n in itertools.count():
                while reader.readline() not in (b"", b"\r\n"):  # the request line and headers (GETs have no body)
                    pass
                if self.reset_all or n > 0:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.resets += 1
                    return
                self.answered += 1
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(self.EXPERIMENT)}"
                conn.sendall(head.encode() + b"\r\nConnection: keep-alive\r\n\r\n" + self.EXPERIMENT)

    def close(self):
        self.sock.close()


def test_a_kept_alive_connection_reset_by_the_server_is_retried_once_and_at_once(caplog):
    """CI saw MLflow's system-metrics thread warn "Connection reset by peer" into a job's log: uvicorn closes idle
    connections after 5 s, the monitor asks every 5 s, and a request went out on a connection being closed. That
    is retried on a new connection, without urllib3's "Retrying ..." warning in the log; a server that resets
    everything still fails in two tries, not minutes."""
    server = ResettingServer()
    try:
        client = quiet_client(server.url)
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                assert client.get_experiment("1").name == "e"
        assert server.resets == 2 and server.answered == 3  # the 2nd and 3rd went out on a reset connection
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        server.close()
    server = ResettingServer(reset_all=True)
    try:
        start = time.monotonic()
        with pytest.raises(MlflowException, match="Connection reset by peer"):
            quiet_client(server.url).get_experiment("1")
        assert time.monotonic() - start < 2 and server.resets == 2
    finally:
        server.close()


def test_records_kept_during_an_outage_reach_the_server_once_it_answers(s3, tmp_path):
    """A stage's tracker closes while MLflow is down (its worker process then ends): what it could not send is kept
    in the run's folder in storage (S3 here) and a later send_unsent delivers it to the server on that address."""
    from tests.services import free_port, make_bucket, mlflow_server

    make_bucket(s3, "kept")
    root = storage.resolve("s3://kept/runs/r1")
    uri = f"http://127.0.0.1:{free_port()}"
    messages = []
    tags = {RUN_TAG: "r1", STAGE_TAG: "1"}
    t = Tracker(
        uri, "exp", tags, "r1/stage1", parent_tags={RUN_TAG: "r1"}, log=messages.append, unsent=unsent_file(root)
    )
    t.params({"model": {"ngf": 8}})
    for step in (1, 2, 3):
        t.metrics({"G_GAN": 1.0 / step}, step)
    t.artifact(b"\x89PNG fake", "images/epoch_0003.png")
    t.image(png_of((0, 255, 0)), "held-out", 3)
    assert t.close("FINISHED") is False
    assert any("7 tracking records" in m for m in messages), messages  # params, 3 metrics, artifact, image, end
    assert any(f"are kept in {t.unsent}" in m for m in messages), messages
    assert len(storage.list_files(unsent_folder(root))) == 1
    assert send_unsent(uri, root, log=messages.append) == 0  # still down: kept, not lost
    assert len(storage.list_files(unsent_folder(root))) == 1

    with mlflow_server(tmp_path, s3, "kept", port=int(uri.rsplit(":", 1)[1])):
        assert send_unsent(uri, root, log=messages.append) == 1
        assert storage.list_files(unsent_folder(root)) == []
        c = MlflowClient(tracking_uri=uri)
        exp = c.get_experiment_by_name("exp")
        (stage,) = c.search_runs([exp.experiment_id], f"tags.`{STAGE_TAG}` = '1'")
        (parent,) = c.search_runs([exp.experiment_id], f"tags.`{STAGE_TAG}` = 'parent'")
        assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert stage.info.status == "FINISHED" and stage.data.params["model.ngf"] == "8"
        assert [(m.step, m.value) for m in c.get_metric_history(stage.info.run_id, "G_GAN")] == [
            (1, 1.0),
            (2, 0.5),
            (3, 1 / 3),
        ]
        art = c.download_artifacts(stage.info.run_id, "images/epoch_0003.png", str(tmp_path))
        assert Path(art).read_bytes() == b"\x89PNG fake"
        assert any(a.path.startswith("images/held-out+step+3+") for a in c.list_artifacts(stage.info.run_id, "images"))
        assert send_unsent(uri, root) == 0  # nothing left: nothing sent twice


def test_filter_values_are_quoted_so_a_quote_cannot_break_the_search(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tags = {RUN_TAG: "bob's run"}
    first = Tracker(uri, "exp", tags, "bob's run")
    first.metrics({"x": 1.0}, 0)
    assert first.close()
    second = Tracker(uri, "exp", tags, "bob's run")  # found again by its tag, not created twice
    second.metrics({"x": 2.0}, 1)
    assert second.close()
    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[RUN_TAG] == "bob's run"
    assert filter_value('say "hi"') == "'say \"hi\"'" and filter_value("it's") == '"it\'s"'
    with pytest.raises(ValueError, match="both quote characters"):
        filter_value('it\'s "x"')


def test_instance_feature_bundle_carries_encoder_and_per_class_clusters(city6):
    from model.step import TrainStep
    from orchestration.records.registry import build_bundle
    from orchestration.run.config import load_config

    cfg = load_config("configs/tiny.yaml", ["model.instance_feat=true", "data.val_split=null"])
    state = TrainStep(cfg.stage_model(3)).state_dict()
    bundle = build_bundle(cfg, state, 3, city6)
    assert bundle.E is not None and tuple(bundle.clusters.shape) == (35, 10, 3)
    assert bundle.clusters[26].abs().sum() > 0 and bundle.clusters[0].abs().sum() == 0  # cars seen, id 0 not
    label = torch.full((1, 64, 128), 7)
    label[:, 40:, 50:80] = 26
    out = bundle(torch.stack([label, label * 1000], 1))
    assert out.shape == (1, 3, 64, 128)


@pytest.mark.parametrize(
    "address, on_cluster", [("ray-head:6379", True), ("auto", True), ("local", False), ("", False)]
)
def test_only_a_cluster_address_forbids_the_embedded_store(monkeypatch, address, on_cluster):
    """On a cluster the embedded store would vanish with the job's working directory: refused. RAY_ADDRESS=local
    is Ray's own local instance, the same as none: the embedded store is right there."""
    from orchestration.records.tracking import resolve_tracking_uri
    from orchestration.run.config import ConfigError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", address)
    if on_cluster:
        with pytest.raises(ConfigError, match="this job runs on a Ray cluster"):
            resolve_tracking_uri(ray_job=True)
    else:
        assert resolve_tracking_uri(ray_job=True).startswith("sqlite:///")
    assert resolve_tracking_uri(ray_job=False).startswith("sqlite:///")  # a job that never runs on the cluster
