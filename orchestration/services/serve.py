"""The registry's generator and its editor on Ray Serve: two deployments in one application.

- `Generator`: the model replicas (CPUs / a GPU each, fixed count or autoscaled on ongoing requests). Each loads
  the version `models:/NAME@ALIAS` names now, and a thread of it looks again every `reload_s` seconds: a new
  champion is loaded beside the old one and swapped in, without a restart and without a request waiting for the
  load. A render is one call: the replica checks the maps against its version's options, then batches them
  (`serve.batch`: requests of one size go through G together, which pays on a GPU).
- `Editor`: the HTTP ingress (serving/editor_api.py, FastAPI): decodes the PNG maps, calls a replica once,
  answers PNG; serves the editor page. Light: one replica is plenty.

`python -m jobs.serve --model models:/pix2pixhd-synthetic-city@champion` builds it with `build(...)`; `serve run
docker/serve.yaml` does the same from a Serve config (`import_path: orchestration.services.serve:app`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from ray import serve

from data import storage
from data.labels import label_set_of
from data.layouts import list_maps
from model.bundle import Pix2PixHDGenerator
from orchestration.cluster.ray_address import cluster_address
from orchestration.records.registry import load_generator, resolve_version
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run.visuals import rgb_array
from serving.editor_api import RequestError, Sample, build_api
from serving.maps import decode_ids, decode_photo, encode_rgb
from serving.pyfunc import check_request

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
    images: str | None = None  # their photos: the editor offers each sample's objects the styles of its photo
    max_samples: int = 24


def _tile_map(class_id: int, thing: bool, background: int, m: int) -> np.ndarray:
    """A thumbnail's maps (1, 2, H, W): an ellipse of the class (one instance) on the background class."""
    h, w = max(64, 4 * m), max(128, 8 * m)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 <= 1
    label = np.where(inside, class_id, background)
    inst = np.where(inside, class_id * 1000 + 1 if thing else class_id, background)
    return np.stack([label, inst])[None].astype(np.int64)


@dataclass(frozen=True)
class Loaded:
    """One version as a replica serves it: the generator, its name, what /classes says of it, its style tiles."""

    bundle: Pix2PixHDGenerator
    version: str  # NAME/VERSION
    info: dict
    tiles: dict  # class id -> PNG thumbnails, made on first ask


def loaded(bundle: Pix2PixHDGenerator, version: str) -> Loaded:
    opt = bundle.opt
    info = {
        "model": version,
        "options": asdict(opt),
        "label_nc": opt.label_nc,
        "size_multiple": opt.size_multiple,
        "instance_feat": opt.instance_feat,
        "cluster_counts": bundle.cluster_counts.tolist() if opt.instance_feat else [],
    }
    return Loaded(bundle, version, info, {})


@serve.deployment(name="Generator")
class Generator:
    """Renders for the ingress, one call per request. The version the model URI names is looked up every
    `reload_s` seconds by a thread of the replica, which loads a new one beside the old and then swaps: requests
    never wait for a load, those during it are answered by the old version."""

    def __init__(self, settings: dict):
        self.s = ServeSettings(**settings)
        self.tracking_uri = resolve_tracking_uri(self.s.tracking_uri, ray_job=False)
        self.device = torch.device("cuda" if self.s.gpus and torch.cuda.is_available() else "cpu")
        self.current = self._load(resolve_version(self.s.model, self.tracking_uri))
        self._batched.set_max_batch_size(self.s.max_batch)
        self._batched.set_batch_wait_timeout_s(self.s.batch_wait_s)
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="model-reload", daemon=True).start()

    def _load(self, mv) -> Loaded:
        version = f"{mv.name}/{mv.version}"
        return loaded(load_generator(f"models:/{version}", self.tracking_uri).to(self.device).eval(), version)

    def _watch(self) -> None:
        while not self._stop.wait(self.s.reload_s):
            self.reload()

    def reload(self) -> None:
        """Load the version the model URI names now, if it is not the one served. Registry trouble keeps the
        loaded version serving (logged)."""
        try:
            mv = resolve_version(self.s.model, self.tracking_uri)
            if f"{mv.name}/{mv.version}" == self.current.version:
                return
            fresh = self._load(mv)
        except Exception as e:  # noqa: BLE001 - serving goes on with the loaded version
            log.warning("registry check for %s failed (%s); still serving %s", self.s.model, e, self.current.version)
            return
        log.info("%s now names %s (was %s): loaded", self.s.model, fresh.version, self.current.version)
        self.current = fresh

    async def info(self) -> dict:
        return self.current.info

    async def render(self, maps: np.ndarray, styles: dict, seed: int, mode: str | None):
        """-> (PNG bytes, version), or ("error", message) for maps or styles this version does not take."""
        cur = self.current
        try:
            check_request(maps, cur.bundle.opt)
            if styles and not cur.bundle.opt.instance_feat:
                raise ValueError(f"{cur.version} has no instance features: it takes no styles")
        except ValueError as e:
            return ("error", str(e))
        return await self._batched((cur, maps, styles, seed, mode))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[tuple]) -> list:
        def work() -> list:
            out: list = [None] * len(requests)
            groups: dict[int, list[int]] = {}
            for i, r in enumerate(requests):  # a swap within a batch: each version renders its own requests
                groups.setdefault(id(r[0]), []).append(i)
            for idx in groups.values():
                cur = requests[idx[0]][0]
                images = cur.bundle.render_many([(torch.from_numpy(requests[i][1]), *requests[i][2:]) for i in idx])
                for i, o in zip(idx, images, strict=True):
                    png = None if isinstance(o, ValueError) else encode_rgb(rgb_array(o[0]))
                    out[i] = ("error", str(o)) if png is None else (png, cur.version)
            return out

        # off the replica's event loop: a render of the largest size (tens of seconds on a CPU) must not hold its
        # other calls (info for /classes, style tiles) until it ends
        return await asyncio.to_thread(work)

    async def photo_styles(self, sample: Sample) -> tuple:
        """-> ({instance id: E's feature of it in the sample's photo}, version), or ("error", message)."""
        cur = self.current
        try:
            label = decode_ids(sample.label, "the sample's label map")
            inst = decode_ids(sample.instances, "its instance map") if sample.instances else label
            photo = torch.from_numpy(decode_photo(sample.photo, "its photo"))[None]
            maps = torch.from_numpy(np.stack([label, inst])[None])
            taken = await asyncio.to_thread(cur.bundle.photo_styles, photo.to(self.device), maps[:, 1], maps)
        except ValueError as e:
            return ("error", str(e))
        return {str(k): v for k, v in taken.styles.items()}, cur.version

    async def style_tiles(self, class_id: int) -> tuple[list[bytes], str]:
        """Each style of the class rendered on a thumbnail (its object on road, or the class alone)."""
        cur = self.current
        bundle, opt = cur.bundle, cur.bundle.opt
        if not opt.instance_feat or int(bundle.cluster_counts[class_id]) == 0:
            return [], cur.version
        if class_id not in cur.tiles:
            labels = label_set_of(opt.label_nc)
            thing = bool(labels and class_id in labels.instance_classes)
            background = labels.names.index("road") if labels and "road" in labels.names else class_id
            x = torch.from_numpy(_tile_map(class_id, thing, background, opt.size_multiple))
            inst = int(x[0, 1, x.shape[2] // 2, x.shape[3] // 2])
            n = int(bundle.cluster_counts[class_id])
            images = bundle.render_many([(x, {inst: k}, 0, "largest") for k in range(n)])
            cur.tiles[class_id] = [encode_rgb(rgb_array(i[0])) for i in images]
        return cur.tiles[class_id], cur.version


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

    async def photo_styles(self, sample: Sample):
        result = await self.handle.photo_styles.remote(sample)
        if result[0] == "error":
            raise RequestError(result[1])
        return result


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


def load_samples(s: ServeSettings) -> dict[str, Sample]:
    """The first `max_samples` label maps of `s.labels` (with their instance maps and photos), as file bytes."""
    if not s.labels:
        return {}

    labels = list_maps(s.labels)
    instances = list_maps(s.instances) if s.instances else {}
    photos = list_maps(s.images) if s.images else {}

    def read(found: dict, stem: str) -> bytes | None:
        return storage.read_bytes(found[stem]) if stem in found else None

    return {
        stem: Sample(storage.read_bytes(loc), read(instances, stem), read(photos, stem))
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
    """`serve run` / Serve config entry point (import_path: orchestration.services.serve:app); args are ServeSettings."""
    return build(ServeSettings(**args))


def check_inputs(s: ServeSettings) -> None:
    """What a replica would find wrong, found before anything is deployed: the --labels folder, the model URI."""

    load_samples(s)
    resolve_version(s.model, s.tracking_uri)


def deploy(s: ServeSettings, host: str, port: int, proxy_location: str, log=print) -> None:
    """Deploy the editor on the Ray of RAY_ADDRESS (a cluster: return once it runs) or a local one of its own
    (serve until Ctrl-C / SIGTERM, then shut Serve and that Ray down)."""
    import ray

    on_cluster = cluster_address() is not None
    ray.init(address=cluster_address(), logging_config=ray.LoggingConfig(log_level="WARNING"))
    serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location)
    t0 = time.perf_counter()
    serve.run(build(s), name="pix2pixhd-editor", route_prefix="/")
    shown = ray.util.get_node_ip_address() if host == "0.0.0.0" else host  # this node's (the head's) address
    log(f"serving {s.model} at http://{shown}:{port}/ (editor), POST /render; ready in {time.perf_counter() - t0:.0f}s")
    if on_cluster:
        return
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
