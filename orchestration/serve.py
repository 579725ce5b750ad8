"""The registry's generator and its editor on Ray Serve: two deployments in one application.

- `Generator`: the model replicas (CPUs / a GPU each, fixed count or autoscaled on ongoing requests). Each loads
  the version `models:/NAME@ALIAS` names now, and looks again at most every `reload_s` seconds when a request
  comes: a new champion is served without a restart (the request that notices it waits for the load). Requests
  are batched (`serve.batch`): those of one size go through G together, which pays on a GPU.
- `Editor`: the HTTP ingress (serving/editor_api.py, FastAPI): decodes and checks PNG maps, calls a replica,
  answers PNG; serves the editor page. Light: one replica is plenty.

`python -m jobs.serve --model models:/pix2pixhd-synthetic-city@champion` builds it with `build(...)`; `serve run
docker/serve.yaml` does the same from a Serve config (`import_path: orchestration.serve:app`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from ray import serve

from serving.editor_api import RequestError, build_api

log = logging.getLogger("ray.serve")


@dataclass
class ServeSettings:
    model: str = "models:/pix2pixhd-synthetic-city@champion"
    tracking_uri: str | None = None
    replicas: int = 1  # Generator replicas; with max_replicas > replicas, autoscaled between the two
    max_replicas: int = 0
    target_ongoing_requests: float = 2.0  # autoscaling: requests in flight per replica it aims at
    cpus: float = 1.0  # per Generator replica
    gpus: float = 0.0  # per Generator replica
    max_batch: int = 4  # requests of one size rendered as one batch
    batch_wait_s: float = 0.01
    reload_s: float = 30.0  # how often (at most) a replica asks the registry which version the alias names
    labels: str | None = None  # label maps the editor offers to open (a folder or URI), paired with `instances`
    instances: str | None = None
    max_samples: int = 24


def _tile_map(class_id: int, thing: bool, background: int, m: int) -> np.ndarray:
    """A thumbnail's maps (1, 2, H, W): an ellipse of the class (one instance) on the background class."""
    h, w = max(64, 4 * m), max(128, 8 * m)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 <= 1
    label = np.where(inside, class_id, background)
    inst = np.where(inside, class_id * 1000 + 1 if thing else class_id, background)
    return np.stack([label, inst])[None].astype(np.int64)


@serve.deployment(name="Generator")
class Generator:
    def __init__(self, settings: dict):
        from orchestration.tracking import resolve_tracking_uri

        self.s = ServeSettings(**settings)
        self.tracking_uri = resolve_tracking_uri(self.s.tracking_uri, ray_job=False)
        self.device = torch.device("cuda" if self.s.gpus and torch.cuda.is_available() else "cpu")
        self.bundle, self.version, self.checked, self.tiles = None, "", 0.0, {}
        self._refresh(force=True)
        self._batched.set_max_batch_size(self.s.max_batch)
        self._batched.set_batch_wait_timeout_s(self.s.batch_wait_s)

    def _refresh(self, force: bool = False) -> None:
        """Load the version the model URI names now, if it is not the one loaded. Registry trouble after the first
        load keeps the loaded version serving (logged)."""
        from orchestration.registry import load_generator, resolve_version

        if not force and time.monotonic() - self.checked < self.s.reload_s:
            return
        self.checked = time.monotonic()
        try:
            mv = resolve_version(self.s.model, self.tracking_uri)
            name, version = mv.name, mv.version
            if f"{name}/{version}" == self.version:
                return
            bundle = load_generator(f"models:/{name}/{version}", self.tracking_uri).to(self.device).eval()
        except Exception as e:  # noqa: BLE001 - serving goes on with the loaded version
            if self.bundle is None:
                raise
            log.warning("registry check for %s failed (%s); still serving %s", self.s.model, e, self.version)
            return
        if self.version:
            log.info("%s now names %s/%s (was %s): loaded", self.s.model, name, version, self.version)
        self.bundle, self.version, self.tiles = bundle, f"{name}/{version}", {}

    async def info(self) -> dict:
        self._refresh()
        opt = self.bundle.opt
        counts = self.bundle.cluster_counts.tolist() if opt.instance_feat else []
        return {
            "model": self.version,
            "options": asdict(opt),
            "label_nc": opt.label_nc,
            "size_multiple": opt.size_multiple,
            "instance_feat": opt.instance_feat,
            "cluster_counts": counts,
        }

    async def render(self, maps: np.ndarray, styles: dict, seed: int, mode: str | None):
        """-> (PNG bytes, version), or ("error", message) for a style that does not fit."""
        self._refresh()
        return await self._batched((maps, styles, seed, mode))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[tuple]) -> list:
        from orchestration.visuals import to_uint8
        from serving.maps import encode_rgb

        bundle, version = self.bundle, self.version

        def work() -> list:
            out = bundle.render_many([(torch.from_numpy(m), s, seed, mode) for m, s, seed, mode in requests])
            return [
                ("error", str(o)) if isinstance(o, ValueError) else (encode_rgb(to_uint8(o[0])), version) for o in out
            ]

        # off the replica's event loop: a render of the largest size (tens of seconds on a CPU) must not hold its
        # other calls (info for /classes, style tiles) until it ends
        return await asyncio.to_thread(work)

    async def style_tiles(self, class_id: int) -> tuple[list[bytes], str]:
        """Each style of the class rendered on a thumbnail (its object on road, or the class alone)."""
        from data.labels import label_set_of
        from orchestration.visuals import to_uint8
        from serving.maps import encode_rgb

        self._refresh()
        bundle = self.bundle
        opt = bundle.opt
        if not opt.instance_feat or int(bundle.cluster_counts[class_id]) == 0:
            return [], self.version
        if class_id not in self.tiles:
            labels = label_set_of(opt.label_nc)
            thing = bool(labels and class_id in labels.instance_classes)
            background = labels.names.index("road") if labels and "road" in labels.names else class_id
            x = torch.from_numpy(_tile_map(class_id, thing, background, opt.size_multiple))
            inst = int(x[0, 1, x.shape[2] // 2, x.shape[3] // 2])
            n = int(bundle.cluster_counts[class_id])
            images = bundle.render_many([(x, {inst: k}, 0, "largest") for k in range(n)])
            self.tiles[class_id] = [encode_rgb(to_uint8(i[0])) for i in images]
        return self.tiles[class_id], self.version


class HandleRenderer:
    """serving.editor_api's Renderer, backed by the Generator deployment's replicas."""

    def __init__(self, handle):
        self.handle = handle

    async def info(self) -> dict:
        return await self.handle.info.remote()

    async def render(self, maps, styles, seed, mode):
        result = await self.handle.render.remote(maps, styles, seed, mode)
        if result[0] == "error":
            raise RequestError(result[1])
        return result

    async def style_tiles(self, class_id: int):
        return await self.handle.style_tiles.remote(class_id)


# the ingress only parses and awaits the Generator: 64 requests in flight per replica, not Serve's default 5, so
# that a few slow clients (each held at most editor_api.BODY_TIMEOUT_S) do not queue everyone else behind them
@serve.deployment(name="Editor", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64)
@serve.ingress()
class Editor:
    def __init__(self, generator, settings: dict):
        self.generator = generator
        self.samples = load_samples(ServeSettings(**settings))

    def __serve_build_asgi_app__(self):
        return build_api(HandleRenderer(self.generator), self.samples)


def load_samples(s: ServeSettings) -> dict[str, tuple[bytes, bytes | None]]:
    """The first `max_samples` label maps of `s.labels` (with their instance maps), as PNG bytes."""
    if not s.labels:
        return {}
    from data import storage
    from data.layouts import list_maps

    labels = list_maps(s.labels)
    instances = list_maps(s.instances) if s.instances else {}
    return {
        stem: (storage.read_bytes(loc), storage.read_bytes(instances[stem]) if stem in instances else None)
        for stem, loc in list(labels.items())[: s.max_samples]
    }


def build(s: ServeSettings):
    """The Serve application: the Editor ingress bound to the Generator deployment."""
    options: dict = {"ray_actor_options": {"num_cpus": s.cpus, "num_gpus": s.gpus}}
    if s.max_replicas > s.replicas:
        options["autoscaling_config"] = {
            "min_replicas": s.replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = s.replicas
    options["max_ongoing_requests"] = max(8, 4 * s.max_batch)
    generator = Generator.options(**options).bind(asdict(s))
    return Editor.bind(generator, asdict(s))


def app(args: dict):
    """`serve run` / Serve config entry point (import_path: orchestration.serve:app); args are ServeSettings."""
    return build(ServeSettings(**args))
