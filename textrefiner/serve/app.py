"""The web application: the JSON API (`/predict`, `/health`, `/info`, `/explain`), its OpenAPI
page (`/docs`) and the page at `/`. Every request that cannot be served gets a 4xx with one line
in `detail` saying why; the server keeps serving."""
import base64
import binascii
import io
import json
import os
import re
import secrets
import time
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..clip_backbone import unknown_words_message
from .backend import ClassListError, class_list
from .batcher import Batcher, QueueFull

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
TOKEN_COOKIE = "textrefiner_token"


@dataclass
class Limits:
    """What one request may ask for; beyond each, a 4xx that names the flag."""
    max_upload_bytes: int = 20 * 2 ** 20  # --max-upload-mb
    max_pixels: int = 40_000_000  # --max-pixels: a decompression bomb is refused before decoding
    max_images: int = 64  # --max-images (per request)
    max_classes: int = 1000  # --max-classes
    max_name_chars: int = 200  # a class name longer than this cannot fit CLIP's 77 tokens
    max_topk: int = 1000


class RequestError(HTTPException):
    def __init__(self, status: int, detail: str):
        super().__init__(status_code=status, detail=detail)


# ---------------------------------------------------------------------------- response shapes
class ImageResult(BaseModel):
    name: str  # the upload's file name, or image<i> for base64 images without one
    classes: List[str]  # the top-k class names, most probable first
    probabilities: List[float]  # their probabilities (softmax over all the request's classes)


class PredictResponse(BaseModel):
    classes: List[str]  # the class list the probabilities are over
    images: List[ImageResult]
    note: Optional[str] = None  # one line, e.g. class-name words the CLIP does not know


PREDICT_BODY = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                       "description": "one or more image files"},
            "classnames": {"type": "string", "description": "class names separated by commas "
                                          "or new lines (default: the model's classes)"},
            "topk": {"type": "integer", "default": 5}}}},
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "description": "base64 strings (a data: URL too), or "
                       "objects {\"name\": ..., \"data\": base64}",
                       "items": {"oneOf": [{"type": "string"}, {"type": "object", "properties": {
                           "name": {"type": "string"}, "data": {"type": "string"}}}]}},
            "classnames": {"type": "array", "items": {"type": "string"}},
            "topk": {"type": "integer", "default": 5}}}}}}}


# ---------------------------------------------------------------------------- reading a request
async def read_request(request: Request, limits: Limits) -> Tuple[list, Optional[list], int]:
    """(images as [(name, bytes)], class names or None, top-k) of a multipart or JSON request."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if kind == "multipart/form-data":
            return await _read_form(request, limits)
        if kind == "application/json":
            return _read_json(await request.body(), limits)
    except ClientDisconnect:
        raise RequestError(400, "The client disconnected before its upload was complete.") \
            from None
    raise RequestError(415, f"Content type {kind or '(none)'!r} is not read here: send "
                            "multipart/form-data (files in 'images') or application/json "
                            "({\"images\": [base64, ...]}).")


async def _read_form(request, limits):
    form = await request.form(max_files=limits.max_images, max_fields=limits.max_classes + 16,
                              max_part_size=limits.max_upload_bytes)
    images = []
    for item in form.getlist("images"):
        if isinstance(item, str):
            raise RequestError(400, "'images' must be files (multipart file parts), not text.")
        images.append((item.filename or f"image{len(images)}", await item.read()))
    names = [name for value in form.getlist("classnames") for name in _split(value)]
    given = bool(form.getlist("classnames"))
    return images, (names if given else None), _topk(form.get("topk"))


def _split(value) -> List[str]:
    if not isinstance(value, str):
        raise RequestError(400, "'classnames' must be text: names separated by commas.")
    return [name.strip() for name in re.split(r"[,\n]", value) if name.strip()]


def _read_json(body: bytes, limits):
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "The body is not valid JSON.") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise RequestError(400, "The JSON body must be an object with 'images': a list of base64 "
                                "strings (or {\"name\", \"data\"} objects).")
    if len(data["images"]) > limits.max_images:
        raise RequestError(413, f"{len(data['images'])} images in one request: at most "
                                f"{limits.max_images} (--max-images).")
    images = [_decode_base64(item, i) for i, item in enumerate(data["images"])]
    names = data.get("classnames")
    if names is not None and (not isinstance(names, list)
                              or not all(isinstance(name, str) for name in names)):
        raise RequestError(400, "'classnames' must be a list of strings.")
    names = None if names is None else [name.strip() for name in names if name.strip()]
    return images, names, _topk(data.get("topk"))


def _decode_base64(item, index: int):
    name, data = f"image{index}", item
    if isinstance(item, dict):
        name, data = str(item.get("name") or name), item.get("data")
    if not isinstance(data, str):
        raise RequestError(400, f"Image {index}: give base64 text (or {{\"name\", \"data\"}}).")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        return name, base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"Image {index} ({name}) is not valid base64.") from None


def _topk(value) -> int:
    if value is None or value == "":
        return 5
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"topk must be a whole number, got {value!r}.") from None
    if k < 1:
        raise RequestError(400, f"topk must be at least 1, got {k}.")
    return k


def check_classnames(names: Optional[Sequence[str]], limits: Limits) -> Optional[List[str]]:
    """The request's class names, refused in one line when no classifier can be built from them
    (none, one, too many, too long, or a name given twice)."""
    if names is None:
        return None
    if len(names) < 2:
        raise RequestError(400, f"{len(names)} class name{'s' if len(names) != 1 else ''} given: "
                                "a classifier needs at least two (or leave 'classnames' out for "
                                "the model's own).")
    if len(names) > limits.max_classes:
        raise RequestError(413, f"{len(names)} class names: at most {limits.max_classes} "
                                "(--max-classes).")
    long = next((name for name in names if len(name) > limits.max_name_chars), None)
    if long is not None:
        raise RequestError(400, f"A class name of {len(long)} characters ({long[:40]!r}...): at "
                                f"most {limits.max_name_chars}, as CLIP reads 77 tokens.")
    seen = set()
    for name in names:
        if name in seen:
            raise RequestError(400, f"The class name {name!r} is given twice: give each once.")
        seen.add(name)
    return list(names)


def read_image(name: str, data: bytes, max_pixels: int) -> Image.Image:
    """The upload as an RGB image; its size is checked against `max_pixels` before decoding."""
    if not data:
        raise RequestError(400, f"{name} is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise RequestError(413, f"{name} has {width} x {height} pixels: more than the "
                                            f"limit of {max_pixels} (--max-pixels).")
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(413, f"{name} has too many pixels to decode ({exc}).") from None
    except UnidentifiedImageError:
        raise RequestError(400, f"{name} is not an image this server reads (PNG, JPEG, WebP, "
                                "GIF, BMP, TIFF ...).") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(400, f"{name} cannot be read as an image ({exc}): it may be "
                                "truncated or damaged.") from None


def preprocess(images, transform, max_pixels: int):
    """[(name, bytes)] -> ([N, 3, H, W] tensor, names) with the model's test transform."""
    import torch

    pictures = [read_image(name, data, max_pixels) for name, data in images]
    return torch.stack([transform(picture) for picture in pictures]), pictures


# ---------------------------------------------------------------------------- the application
def build_app(backend, limits: Optional[Limits] = None, token: Optional[str] = None,
              max_batch: int = 32, window: float = 0.005, max_queued: int = 512,
              explain=None, log=None) -> FastAPI:
    """The application serving `backend`. `token`: every request but /health must carry it
    (`Authorization: Bearer TOKEN`, `?token=TOKEN` or the cookie the page sets). `explain`:
    a function (backend, classnames, image) -> PNG bytes run on the model worker, or None."""
    limits = limits or Limits()
    log = log or (lambda message: None)
    batcher = Batcher(backend.probabilities, max_batch, window, max_queued, log)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()  # whatever is queued is computed first

    app = FastAPI(title="textrefiner-serve", lifespan=lifespan,
                  description="A trained textrefiner run: images and class names in, "
                              "probabilities out. See docs/serve.md.")
    app.state.batcher, app.state.backend, app.state.limits = batcher, backend, limits

    app.add_middleware(Guard, limits=limits, token=token)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request, exc):
        log(f"textrefiner-serve: {exc.status_code} {request.method} {request.url.path}: "
            f"{exc.detail}")
        return await http_exception_handler(request, exc)

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc):
        log(f"textrefiner-serve: 503 {request.method} {request.url.path}: queue full")
        return JSONResponse({"detail": f"The server is busy ({batcher.queued} images queued, "
                                       f"limit {batcher.max_queued}): try again shortly."},
                            status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(ClassListError)
    async def class_list_error(request, exc):
        log(f"textrefiner-serve: 400 {request.method} {request.url.path}: {exc}")
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        """Liveness: the model worker is running."""
        alive = batcher.alive
        return JSONResponse({"status": "ok" if alive else "stopped", "queued": batcher.queued,
                             "batches": batcher.batches, "images": batcher.images,
                             "uptime_s": round(time.time() - started, 1)},
                            status_code=200 if alive else 503)

    def explains() -> bool:
        """/explain answers a picture: an explainer, a TextRefiner run, the PyTorch model."""
        return explain is not None and backend.info()["textrefiner"] and backend.kind == "pytorch"

    @app.get("/info")
    async def info():
        """The model: method, backbone, TextRefiner on or off, its classes, input size, limits."""
        return {**backend.info(), "explain": explains(),
                "limits": {"max_upload_bytes": limits.max_upload_bytes,
                           "max_pixels": limits.max_pixels, "max_images": limits.max_images,
                           "max_classes": limits.max_classes}}

    async def _prepared(request):
        images, names, topk = await read_request(request, limits)
        if not images:
            raise RequestError(400, "No images: send one or more in 'images'.")
        key = class_list(check_classnames(names, limits), backend)
        backend.check(key)  # a list the model cannot name: one line, before any work
        batch, pictures = await run_in_threadpool(preprocess, images, backend.transform,
                                                  limits.max_pixels)
        return images, key, min(topk, len(key)), batch, pictures

    @app.post("/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY)
    async def predict(request: Request):
        """Class probabilities of one or more images: top-k classes per image."""
        images, key, topk, batch, _ = await _prepared(request)
        probabilities = await batcher.predict(batch, key)
        values, indices = probabilities.topk(topk, dim=-1)
        note = unknown_words_message(await run_in_threadpool(backend.unknown_words, key))
        return {"classes": list(key), "note": note or None, "images": [
            {"name": name, "classes": [key[i] for i in row_indices],
             "probabilities": row_values}
            for (name, _), row_values, row_indices in zip(images, values.tolist(),
                                                           indices.tolist())]}

    @app.post("/explain", openapi_extra=PREDICT_BODY,
              responses={200: {"content": {"image/png": {}}}, 501: {"description": "no explainer"}})
    async def explain_endpoint(request: Request):
        """The explanation picture (PNG) of the first image (TextRefiner runs; 501 otherwise)."""
        if explain is None:
            raise RequestError(501, "Explanations are not available on this server: this "
                                    "installation has no explainer (textrefiner-explain).")
        if not explains():
            raise RequestError(501, "Explanations show what TextRefiner reads: this model has no "
                                    "TextRefiner (or is an ONNX export).")
        _, key, _, _, pictures = await _prepared(request)
        png = await batcher.call(lambda: explain(backend, key, pictures[0]))
        return Response(png, media_type="image/png")

    return app


class Guard:
    """ASGI middleware: the token (where one is set) and the upload limit. A Content-Length over
    the limit is refused before the body is read; a body that grows past it (chunked, or longer
    than announced) is stopped by a 413 raised from `receive` inside the handler."""

    def __init__(self, app, limits: Limits, token: Optional[str]):
        self.app, self.limits, self.token = app, limits, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.token is not None and scope["path"] != "/health":
            given = _token_of(request)
            if given is None or not secrets.compare_digest(given, self.token):
                return await JSONResponse(
                    {"detail": "This server needs its token (printed when it started): send "
                               "Authorization: Bearer TOKEN, or open /?token=TOKEN."},
                    status_code=401)(scope, receive, send)
            if request.query_params.get("token"):
                send = _with_cookie(send, self.token)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_upload_bytes:
            return await JSONResponse({"detail": _too_large(self.limits)},
                                      status_code=413)(scope, receive, send)
        await self.app(scope, _limited(receive, self.limits), send)


def _with_cookie(send, token: str):
    """`send` that sets the token cookie, so the page's own requests (and /docs) carry it."""
    async def sending(message):
        if message["type"] == "http.response.start":
            cookie = f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
            message = {**message, "headers": list(message.get("headers", []))
                       + [(b"set-cookie", cookie.encode())]}
        await send(message)
    return sending


def _token_of(request: Request) -> Optional[str]:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)


def _too_large(limits: Limits) -> str:
    return (f"The upload is larger than {limits.max_upload_bytes / 2 ** 20:g} MiB "
            "(--max-upload-mb): send fewer or smaller images.")


def _limited(receive, limits: Limits):
    """`receive` that stops a body at the limit with a 413."""
    received = 0

    async def limited():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limits.max_upload_bytes:
                raise RequestError(413, _too_large(limits))
        return message
    return limited


def new_token() -> str:
    return secrets.token_urlsafe(24)
