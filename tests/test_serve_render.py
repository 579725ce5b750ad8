"""The editor's render path without a cluster: the ingress (serving/editor_api.py) calls its renderer once per
render, and a Generator replica (orchestration/services/serve.py) loads a new champion beside the one it serves, so that
renders during the load are answered at once by the old version."""

import asyncio
import inspect
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from ray.serve import batching
from starlette.requests import Request

from model.step import TrainStep
from orchestration.records.registry import build_bundle
from orchestration.run.config import load_config
from orchestration.services import serve as served
from serving.editor_api import EditorApi
from serving.maps import encode_ids
from tests.helpers import png64, street


class Counting:
    """A renderer that counts what the ingress asks of it."""

    def __init__(self):
        self.calls = []

    async def info(self):
        self.calls.append("info")
        return {"model": "g/1"}

    async def render(self, maps, styles, seed, mode):
        self.calls.append("render")
        return encode_ids(maps[0, 0]), "g/1"

    async def style_tiles(self, class_id):
        self.calls.append("style_tiles")
        return [], "g/1"


def post(body: bytes) -> Request:
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/render", "headers": []}, receive)


def test_a_render_is_one_call_to_the_renderer():
    renderer = Counting()
    label, inst = street()
    body = json.dumps({"label": png64(label), "instances": png64(inst), "seed": 3}).encode()
    response = asyncio.run(EditorApi(renderer, {}).render(post(body)))
    assert response.status_code == 200 and response.headers["x-model-version"] == "g/1"
    assert renderer.calls == ["render"]  # it used to ask info() first: two actor round trips a render


def tiny_bundle(seed: int):
    cfg = load_config("configs/tiny.yaml")
    return build_bundle(cfg, TrainStep(cfg.stage_model(3), seed=seed).state_dict(), 3, data_uri="")


@pytest.fixture
def batch_queue_reset():
    """serve.batch keeps one queue per decorated method, for every instance, bound to the loop that made it: made
    here, it would stay in this process and make the deployment unpicklable for later tests."""
    yield
    enqueue = inspect.getclosurevars(served.Generator.func_or_class._batched).nonlocals["enqueue_request"]
    inspect.getclosurevars(enqueue).nonlocals["lazy_batch_queue_wrapper"]._queue = None


def test_renders_during_a_new_champions_load_are_answered_by_the_old_version(monkeypatch, batch_queue_reset):
    names = {"version": "1"}
    loads = []

    def load_generator(uri, tracking_uri):
        loads.append(uri)
        if uri.endswith("/2"):
            time.sleep(3.0)  # a large version from a slow registry
        return tiny_bundle(int(uri[-1]))

    monkeypatch.setattr(served, "resolve_version", lambda spec, uri: SimpleNamespace(name="g", **names))
    monkeypatch.setattr(served, "load_generator", load_generator)
    monkeypatch.setattr(served, "resolve_tracking_uri", lambda uri, ray_job: None)
    # serve.batch asks the replica's context for its max_ongoing_requests (a warning check); there is none here
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
    replica = served.Generator.func_or_class({"reload_s": 3600.0})
    label, inst = street()
    maps = np.stack([label, inst])[None].astype(np.int64)

    async def scenario():
        first = await replica.render(maps, {}, 0, None)
        names["version"] = "2"  # the alias moves
        reload = threading.Thread(target=replica.reload)
        reload.start()
        await asyncio.sleep(0.3)  # the new version is loading
        t0 = time.monotonic()
        during = await replica.render(maps, {}, 0, None)
        waited = time.monotonic() - t0
        await asyncio.to_thread(reload.join)
        after = await replica.render(maps, {}, 0, None)
        bad = await replica.render(maps[:, :, :60], {}, 0, None)
        return first, during, waited, after, bad

    first, during, waited, after, bad = asyncio.run(scenario())
    assert loads == ["models:/g/1", "models:/g/2"]
    assert first[1] == during[1] == "g/1" and during[0][:4] == b"\x89PNG"
    assert waited < 1.5, waited  # not the 3 s load: the old version answered
    assert after[1] == "g/2" and after[0] != first[0]  # other weights, another image
    assert bad[0] == "error" and "the maps are 60x128" in bad[1]  # checked in the replica, once
