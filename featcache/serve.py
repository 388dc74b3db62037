"""``serve``: the model behind an HTTP API (FastAPI) with a web page to try it.

``POST /predict`` takes images as multipart files (field ``files``) or one image as the raw
body and answers the JSON objects of ``featcache predict --json``; ``GET /model`` is the model
card; ``GET /health`` says whether the model is loaded; ``GET /`` is the page. Uploads are
decoded by :mod:`featcache.images` from bytes (never unpickled, never used as a path), in
threads; the network runs in one thread at a time, on batches of what arrived together.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from featcache.bundle import DEFAULT_MODEL, ModelBundle, load_bundle
from featcache.errors import FeatcacheError
from featcache.images import try_load_pixels

MAX_NAME = 200
"""Longest upload file name echoed back as ``path`` (longer ones are cut)."""


@dataclass
class ServeSettings:
    """What :func:`create_app` serves and how: ``token`` (None: no authentication) is required as
    ``Authorization: Bearer TOKEN`` by every route but ``/health`` and the page itself; bodies
    over ``max_upload_mb`` are refused; up to ``max_batch`` images that arrive together share
    one pass through the network, which runs in ``precision`` (None: the model's)."""

    model_path: str | os.PathLike = DEFAULT_MODEL
    token: str | None = None
    max_upload_mb: float = 20.0
    max_batch: int = 32
    engine: str = "auto"
    device: str = "auto"
    precision: str | None = None

    def __post_init__(self) -> None:
        if not self.max_upload_mb > 0:
            raise FeatcacheError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        if self.max_batch < 1:
            raise FeatcacheError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.token is not None and not self.token.strip():
            raise FeatcacheError("token must not be empty (leave it out to serve without one)")


@dataclass
class _State:
    bundle: ModelBundle
    predictor: Any = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ready_after: float | None = None
    queue: asyncio.Queue | None = None


class _TooLarge(Exception):
    pass


def create_app(settings: ServeSettings) -> FastAPI:
    """The FastAPI application for ``settings``. The model file is verified now (a bad one raises
    :class:`FeatcacheError`); its backbone is built in a background thread at start-up, and
    ``/health`` answers ``loading`` until it is ready."""
    state = _State(load_bundle(settings.model_path))
    limit = int(settings.max_upload_mb * 1024 * 1024)

    def load() -> None:
        from featcache.predictor import Predictor

        try:
            state.predictor = Predictor(state.bundle, device=settings.device, engine=settings.engine,
                                        precision=settings.precision)  # fmt: skip
            state.ready_after = time.monotonic() - state.started
        except Exception as e:  # reported by /health, the server stays up
            state.error = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.queue = asyncio.Queue()
        threading.Thread(target=load, name="featcache-load", daemon=True).start()
        batcher = asyncio.create_task(_batches(state, settings.max_batch))
        yield
        batcher.cancel()

    app = FastAPI(
        title="featcache",
        summary="Classify images with a featcache model",
        description=f"Model: {Path(settings.model_path)} ({state.bundle.family}, "
        f"{len(state.bundle.folders)} classes). Every route but /health and / needs "
        "'Authorization: Bearer TOKEN' when the server was started with a token.",
        version=state.bundle.featcache_version,
        lifespan=lifespan,
    )

    app.add_middleware(_Guard, token=settings.token, limit=limit, max_mb=settings.max_upload_mb)

    @app.get("/health", summary="Whether the model is loaded and ready")
    async def health() -> JSONResponse:
        if state.error is not None:
            return JSONResponse({"status": "failed", "error": state.error}, 503)
        if state.predictor is None:
            return JSONResponse({"status": "loading"}, 503)
        backbone = state.predictor.backbone
        ready = round(state.ready_after or 0.0, 3)
        return JSONResponse(
            {"status": "ready", "engine": backbone.engine, "precision": backbone.identity.precision,
             "seconds_to_ready": ready}
        )  # fmt: skip

    @app.get("/model", summary="The model card: classes, backbone, CV accuracy, when it was fit")
    async def model() -> dict[str, Any]:
        return state.bundle.card()

    @app.post(
        "/predict",
        summary="Classify images",
        description="Images as multipart files (field 'files', one or more), or one image as the raw "
        "body. Answers a list with one object per image, as 'featcache predict --json': path (the "
        "upload's file name), label, folder, probability, top_k, category, and ood_score and unknown "
        "when the model has an out-of-distribution score. A request whose images "
        "all fail to decode is a 400 with the reasons.",
    )
    async def predict(
        request: Request,
        files: list[UploadFile] | None = File(default=None),  # noqa: B008 - FastAPI's declaration style
        top_k: int = Query(1, ge=1, le=1000),  # noqa: B008
    ) -> list[dict[str, Any]]:
        if state.predictor is None:
            raise HTTPException(503, state.error or "the model is still loading; see /health")
        if files:
            uploads = [(_name(f.filename), await f.read()) for f in files]
        elif request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(400, "a multipart upload sends its images in the field 'files'")
        else:
            body = await request.body()
            uploads = [(_name(request.headers.get("x-filename") or "upload"), body)]
        prep = state.bundle.identity.preprocessing
        decoded = await asyncio.gather(
            *(run_in_threadpool(try_load_pixels, data, prep) for _, data in uploads)
        )
        good = [i for i, px in enumerate(decoded) if not isinstance(px, str)]
        if not good:
            reasons = [{"path": name, "error": px} for (name, _), px in zip(uploads, decoded, strict=True)]
            raise HTTPException(400, reasons)
        future = asyncio.get_running_loop().create_future()
        await state.queue.put((np.stack([decoded[i] for i in good]), future))
        proba, scores = await future
        rows = iter(range(len(proba)))
        out = []
        for (name, _), px in zip(uploads, decoded, strict=True):
            if isinstance(px, str):
                out.append({"path": name, "error": px})
            else:
                i = next(rows)
                score = None if scores is None else scores[i]
                out.append(state.predictor.prediction(name, proba[i], top_k, score).to_dict())
        return out

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return resources.files("featcache").joinpath("serve_page.html").read_text(encoding="utf-8")

    return app


def check_address(host: str, port: int) -> None:
    """Raise :class:`FeatcacheError` when ``host:port`` cannot be listened on (in use, not this
    machine's address), before any work."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise FeatcacheError(
            f"cannot listen on {host}:{port}: {e.strerror or e} (choose another port)"
        ) from None


async def _batches(state: _State, max_batch: int) -> None:
    """Run the network on what is queued: one batch at a time (the engines are not re-entrant),
    taking every request already waiting, up to ``max_batch`` images."""
    while True:
        items = [await state.queue.get()]
        size = len(items[0][0])
        while size < max_batch and not state.queue.empty():
            items.append(state.queue.get_nowait())
            size += len(items[-1][0])
        try:
            proba, scores = await run_in_threadpool(
                state.predictor.score_pixels, np.concatenate([p for p, _ in items])
            )
        except Exception as e:  # each waiting request gets the error
            for _, future in items:
                if not future.done():
                    future.set_exception(e)
            continue
        start = 0
        for pixels, future in items:
            if not future.done():
                part = slice(start, start + len(pixels))
                future.set_result((proba[part], None if scores is None else scores[part]))
            start += len(pixels)


def _name(filename: str | None) -> str:
    """The upload's file name as given, for display only: its last path part, printable, cut short."""
    base = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1] or "upload"
    return "".join(c if c.isprintable() else "?" for c in base)[:MAX_NAME]


OPEN = ("/health", "/")
"""The routes served without the token: the state of the server, and the page (no model data in it)."""


class _Guard:
    """ASGI middleware: the bearer token on every route but :data:`OPEN`, and the upload size limit
    (from Content-Length when there is one, else counted as the body arrives)."""

    def __init__(self, app: Any, token: str | None, limit: int, max_mb: float):
        self.app, self.token, self.limit, self.max_mb = app, token, limit, max_mb

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in OPEN:
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.token}".encode()):
                detail = {"detail": "missing or wrong token: send 'Authorization: Bearer TOKEN'"}
                return await JSONResponse(detail, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(scope, receive, send)
        started = False
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        detail = {"detail": f"the upload is over the limit of {self.max_mb:g} MB"}
        await JSONResponse(detail, 413)(scope, receive, send)
