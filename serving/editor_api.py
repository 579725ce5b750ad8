"""The editor's HTTP API (FastAPI), independent of where the generator runs: `build_api(renderer)`.

    GET  /                 the editor page (serving/editor/: plain HTML and JS modules, no build step, no CDN)
    GET  /classes          the model and its label set: ids, names, colours, which are things, styles per class
    GET  /styles/{class}   one thumbnail per style cluster of the class (PNG data URLs)
    GET  /samples          label maps to start from; GET /samples/{name}: its label and instance PNGs (and
                           whether it has a photo); GET /samples/{name}/photo-styles: each of its instances' style
                           in its photo, as E encodes it (feature vectors /render takes as styles)
    POST /render           {"label": PNG, "instances": PNG, "styles": {"26001": 2}, "seed": 0, "style_mode": null}
                           (PNGs base64) -> image/png

Every response names the model version in `X-Model-Version`; /render also says its time in `X-Render-Ms`. Bad
input is a 4xx whose JSON `detail` names the problem: a map that is not a PNG, a wrong size, an unknown label id,
a style that does not fit, JSON nested too deep, a body over the size limit (413, chunked bodies included: counted
while they stream), a body that does not arrive within BODY_TIMEOUT_S (408). An answer names a field and what it
should be, never text of the body (a client's bytes are not reflected back, nor into logs).

`renderer` (see `Renderer`) does the model's work; orchestration/services/serve.py gives one backed by Ray Serve replicas.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the routes' (string) annotations here
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from data.labels import label_set_of
from model.options import ModelOptions
from serving.maps import MAX_PIXELS, MapError, decode_ids

EDITOR = Path(__file__).parent / "editor"
MAX_BODY = 16 * 1024 * 1024  # bytes of one request: two base64 PNGs of the largest maps fit
BODY_TIMEOUT_S = 15.0  # a body that has not arrived whole by then is a 408: a slow client holds its slot no longer


class Renderer(Protocol):
    async def info(self) -> dict: ...  # model, options, label_nc, size_multiple, instance_feat, cluster_counts

    async def render(self, maps: np.ndarray, styles: dict, seed: int, mode: str | None) -> tuple[bytes, str]: ...

    async def style_tiles(self, class_id: int) -> tuple[list[bytes], str]: ...

    async def photo_styles(self, sample: Sample) -> tuple[dict, str]: ...  # {instance id: vector}, version


class Sample(NamedTuple):
    """A map the editor can open: file bytes of its label map, instance map and photo (the last two optional)."""

    label: bytes
    instances: bytes | None = None
    photo: bytes | None = None


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def build_api(renderer: Renderer, samples: dict[str, tuple] | None = None) -> FastAPI:
    """The FastAPI app; `samples`: name -> Sample (label PNG, instance PNG or None, photo or None), the maps the
    editor can open."""
    api = EditorApi(renderer, samples or {})
    app = FastAPI(title="pix2pixHD editor", docs_url="/api")
    app.middleware("http")(api.limit_body_and_name_model)
    app.exception_handler(RequestError)(api.bad_request)
    app.get("/classes")(api.classes)
    app.get("/styles/{class_id}")(api.styles)
    app.get("/samples")(api.sample_names)
    app.get("/samples/{name}")(api.sample)
    app.get("/samples/{name}/photo-styles")(api.photo_styles)
    app.post("/render")(api.render)
    app.get("/")(api.page)
    app.mount("/editor", StaticFiles(directory=EDITOR), name="editor")
    return app


class EditorApi:
    """The routes' handlers. `seen` keeps the model version last answered, for headers of answers that did not ask
    the renderer (errors, static files)."""

    def __init__(self, renderer: Renderer, samples: dict[str, tuple]):
        self.renderer, self.samples = renderer, {name: Sample(*s) for name, s in samples.items()}
        self.seen = {"model": ""}

    async def limit_body_and_name_model(self, request: Request, call_next):
        if request.method == "POST":
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
                read = 0  # drained (to a bound), so that the client reads the answer instead of a reset connection
                async for part in request.stream():
                    read += len(part)
                    if read > 4 * MAX_BODY:
                        break
                return self.error(RequestError(f"the request body is {size} bytes; the limit is {MAX_BODY}", 413))
        response = await call_next(request)
        response.headers.setdefault("X-Model-Version", self.seen["model"])
        return response

    async def info(self) -> dict:
        i = await self.renderer.info()
        self.seen["model"] = i["model"]
        return i

    async def bad_request(self, _request, e: RequestError):
        return self.error(e)

    def error(self, e: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=e.status, headers={"X-Model-Version": self.seen["model"]})

    async def classes(self):
        i = await self.info()
        labels = label_set_of(i["label_nc"])
        counts = i["cluster_counts"] or [0] * i["label_nc"]
        return {
            "model": i["model"],
            "label_set": labels.name if labels else None,
            "size_multiple": i["size_multiple"],
            "min_size": ModelOptions(**i["options"]).min_size,
            "instance_feat": i["instance_feat"],
            "max_pixels": MAX_PIXELS,
            "classes": [
                {
                    "id": c,
                    "name": labels.names[c] if labels else f"class {c}",
                    "color": "#" + bytes(int(v) for v in labels.colors[c]).hex() if labels else "#808080",
                    "thing": bool(labels and c in labels.instance_classes),
                    "styles": int(counts[c]),
                }
                for c in range(i["label_nc"])
            ],
        }

    async def styles(self, class_id: int):
        i = await self.info()
        if not 0 <= class_id < i["label_nc"]:
            raise RequestError(f"class {class_id} is not one of this model's (0..{i['label_nc'] - 1})", 404)
        tiles, model = await self.renderer.style_tiles(class_id)
        if not tiles:
            why = "has no instance features" if not i["instance_feat"] else f"has no style clusters for {class_id}"
            raise RequestError(f"{model} {why}", 404)
        urls = [f"data:image/png;base64,{base64.b64encode(t).decode()}" for t in tiles]
        return {"model": model, "class": class_id, "styles": [{"index": k, "thumbnail": u} for k, u in enumerate(urls)]}

    async def sample_names(self):
        return {"samples": sorted(self.samples)}

    async def sample(self, name: str):
        if name not in self.samples:
            raise RequestError("no sample of that name; GET /samples lists them", 404)
        label, inst, photo = self.samples[name]
        return {
            "label": base64.b64encode(label).decode(),
            "instances": inst and base64.b64encode(inst).decode(),
            "photo": photo is not None,
        }

    async def photo_styles(self, name: str):
        if name not in self.samples:
            raise RequestError("no sample of that name; GET /samples lists them", 404)
        if self.samples[name].photo is None:
            raise RequestError("this sample has no photo: serve the editor with --images (the samples' photos)", 404)
        styles, model = await self.renderer.photo_styles(self.samples[name])
        self.seen["model"] = model
        return {"model": model, "styles": styles}

    async def render(self, request: Request):
        body = await read_body(request)
        t0 = time.perf_counter()
        maps, styles, seed, mode = parse_render(body)
        png, model = await self.renderer.render(maps, styles, seed, mode)  # checked against the model there
        self.seen["model"] = model
        ms = (time.perf_counter() - t0) * 1000
        return Response(png, media_type="image/png", headers={"X-Model-Version": model, "X-Render-Ms": f"{ms:.0f}"})

    async def page(self):
        return FileResponse(EDITOR / "index.html")


async def read_body(request) -> bytes:
    """The body, counted while it streams (a chunked one has no Content-Length to refuse it by) and bounded in
    time: over MAX_BODY is a 413 as soon as the limit is passed, a body still incomplete after BODY_TIMEOUT_S
    (a client that sends less than its Content-Length, or trickles) a 408."""
    import asyncio

    parts: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY:
                raise RequestError(f"the request body is over {MAX_BODY} bytes, the limit", 413)
            parts.append(part)

    try:
        await asyncio.wait_for(collect(), BODY_TIMEOUT_S)
    except TimeoutError:
        raise RequestError(
            f"the request body did not arrive within {BODY_TIMEOUT_S:.0f}s ({size} bytes came)", 408
        ) from None
    return b"".join(parts)


def parse_render(body: bytes) -> tuple[np.ndarray, dict, int, str | None]:
    """A /render body -> (maps (1, 2, H, W) int64, styles, seed, style mode), else RequestError naming the field.
    What needs the model (the maps' size and ids, styles at all) the renderer checks, against the version it
    renders with."""

    try:
        req = json.loads(body)
    except ValueError as e:
        raise RequestError(f"the body is not JSON ({e})") from None  # (names a position, not the text)
    except RecursionError:
        raise RequestError(
            "the body's JSON is nested too deep: /render takes an object of strings and numbers"
        ) from None
    if not isinstance(req, dict) or "label" not in req:
        raise RequestError('the body is a JSON object {"label": PNG (base64), "instances": PNG, "styles", "seed"}')
    label = _map(req["label"], "label")
    inst = _map(req["instances"], "instances") if req.get("instances") else label
    if inst.shape != label.shape:
        raise RequestError(
            f"instances are {inst.shape[1]}x{inst.shape[0]}, the label map {label.shape[1]}x{label.shape[0]}"
        )
    maps = np.stack([label, inst])[None].astype(np.int64)
    styles = req.get("styles") or {}
    if not isinstance(styles, dict):
        raise RequestError(f"styles must be an object of instance id -> cluster index or vector, got {_kind(styles)}")
    try:
        styles = {int(k): v for k, v in styles.items()}
    except ValueError:
        raise RequestError('styles keys are instance ids (integers written as strings, e.g. "26001")') from None
    seed = req.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RequestError(f"seed must be an integer, got {_kind(seed)}")
    mode = req.get("style_mode")
    if mode not in (None, "random", "largest"):
        raise RequestError(f"style_mode must be 'random', 'largest' or null, got another {_kind(mode)}")
    return maps, styles, seed, mode


def _kind(value) -> str:
    """A JSON value named by its type, not its text."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", float: "number", int: "number"}.get(
        type(value), "value"
    )


def _map(value, what: str) -> np.ndarray:
    if not isinstance(value, str):
        raise RequestError(f"{what} must be a base64-encoded PNG string")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None
    try:
        return decode_ids(data, what)
    except MapError as e:
        raise RequestError(str(e), e.status) from None
