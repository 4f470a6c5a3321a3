"""The HTTP server: a Flask app over an exported model, served by waitress.

  POST /v1/caption   an image as a multipart upload (field `image`) or as the raw body
                     (Content-Type image/* or application/octet-stream); query or form
                     fields `beam_size` (1..the export's max) and `attention=true`.
                     -> {"caption", "beams": [{"caption", "score", "log_prob", "length"}],
                         "beam_size", "attention": {"grid", "words", "maps"} (if asked)}
  GET  /healthz      the process answers
  GET  /readyz       the model is loaded and warmed up (503 before)
  GET  /             the web page (static/index.html, no external resources)

Bad input gets a 4xx with {"error": {"code", "message"}} and the server keeps serving.
Requests are checked (Pillow, header first) in the request threads; a `MicroBatcher` then
captions the waiting requests of the same beam size together in one model call.

Overload and shutdown (issue 12):
  * at most `serve.max_queue` requests wait for or are in a model call; one more is answered
    at once `503 {"error": {"code": "overloaded"}}` with `Retry-After` (seconds, estimated from
    the recent model calls), so latency stays bounded and clients back off instead of piling up;
  * a request that waits and runs longer than `serve.request_timeout_s` is answered
    `504 {"error": {"code": "timeout"}}` (the gateway-timeout status: the server, not the
    client, ran out of time; a request not yet started is taken off the queue);
  * SIGTERM (and Ctrl-C) stops accepting connections, turns /readyz to 503, finishes the
    requests in flight, closes each connection once idle, and returns (the command exits 0)
    after at most `serve.drain_timeout_s`.
"""

from __future__ import annotations

import logging
import math
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from importlib import resources
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from caption_pipeline.data.images import ImageError
from caption_pipeline.errors import DataError
from caption_pipeline.params import from_params
from caption_pipeline.serving.inference import caption_record, prepare_image

logger = logging.getLogger(__name__)

RAW_TYPES = ("application/octet-stream",)  # besides image/*
TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class ServeSettings:
    """`params:serve`; see conf/base/parameters_serve.yml."""

    host: str
    port: int
    threads: int
    max_upload_mb: float
    max_pixels: int
    max_batch: int
    batch_wait_ms: float
    max_queue: int
    request_timeout_s: float
    drain_timeout_s: float

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> ServeSettings:
        return from_params(cls, dict(params or {}), "serve")


class RequestError(Exception):
    """A bad request: HTTP `status`, a short `code` and a message naming the problem (and
    response `headers`, e.g. Retry-After)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class Overloaded(RequestError):
    """503: the queue is full; `retry_after` whole seconds is when a retry likely gets in."""

    def __init__(self, pending: int, retry_after: int):
        super().__init__(
            503,
            "overloaded",
            f"the server is at capacity ({pending} requests "
            f"queued, serve.max_queue); retry after {retry_after} s",
            {"Retry-After": str(retry_after)},
        )


class RequestTimeout(RequestError):
    """504: the request waited and ran longer than serve.request_timeout_s."""

    def __init__(self, timeout_s: float):
        super().__init__(
            504,
            "timeout",
            f"the caption took longer than the server's limit "
            f"of {timeout_s:g} s (serve.request_timeout_s); the server is busy, "
            "retry later",
        )


class MicroBatcher:
    """Captions the requests that wait at the same time in one model call.

    `submit(image, beam_size)` blocks until its caption is ready. One worker thread takes the
    first waiting request, collects for up to `wait_ms` up to `max_batch - 1` more of the same
    beam size (others wait for the next rounds, first come first served), and runs them as
    one batch: on 2 cores a batch of 8 is about 2x the images/s
    of 8 single calls. Only this thread calls the model.

    The queue is bounded: with `max_queue` requests pending (queued or in the running call),
    `submit` raises `Overloaded` at once. Past capacity an unbounded queue only turns every
    request slow (latency grows with the queue while throughput stays the same); shedding the
    excess keeps the admitted requests' latency near `max_queue / max_batch + 1` model calls
    and tells clients when to come back. TF Serving bounds its batching queue the same way
    (`max_enqueued_batches`, UNAVAILABLE past it), as gunicorn bounds waiting connections
    (`backlog`). `timeout_s` bounds a request's wait and run: past it `RequestTimeout`, and a
    request the worker has not started yet is dropped from the queue (its future cancelled).
    """

    def __init__(
        self,
        caption: Callable[[list[bytes], int], dict],
        max_batch: int,
        wait_ms: float,
        max_queue: int = 1_000_000,
        timeout_s: float = math.inf,
    ):
        self._caption, self._max_batch, self._wait = caption, max_batch, wait_ms / 1000
        self._max_queue, self._timeout = max_queue, timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._held: list = []  # taken from the queue but of another beam size
        self._lock = threading.Lock()
        self.pending = 0  # submitted, not yet answered (or dropped): bounded by max_queue
        self._call_s = 0.0  # moving average of a model call's seconds, for Retry-After
        threading.Thread(target=self._run, name="micro-batcher", daemon=True).start()

    def check_capacity(self) -> None:
        """`Overloaded` if the queue is full now: lets a request be shed before its upload is
        parsed and checked, the CPU that the admitted requests need. `submit` decides."""
        if self.pending >= self._max_queue:
            raise Overloaded(self.pending, self.retry_after())

    def submit(self, image: bytes, beam_size: int) -> tuple[dict, int]:
        """(the model's outputs for a batch, this image's index in it)."""
        with self._lock:
            self.check_capacity()
            self.pending += 1
        future: Future = Future()
        self._queue.put((image, beam_size, future))
        try:
            return future.result(timeout=None if math.isinf(self._timeout) else self._timeout)
        except (FutureTimeout, CancelledError):
            future.cancel()  # False once running: the call finishes, its answer is dropped
            raise RequestTimeout(self._timeout) from None

    def retry_after(self) -> int:
        """Whole seconds until the queue has likely drained: its model calls, at least 1."""
        calls = math.ceil(self.pending / self._max_batch)
        return max(1, math.ceil(calls * self._call_s))

    def _done(self, count: int) -> None:
        with self._lock:
            self.pending -= count

    def _next(self, timeout: float | None):
        """The held request first, else the queue's next (queue.Empty after `timeout`)."""
        if self._held:
            return self._held.pop(0)
        return self._queue.get(timeout=timeout)

    def _run(self) -> None:
        while True:
            first = self._next(None)
            batch, other = [first], []  # other: of another beam size, for the next rounds
            deadline = time.monotonic() + self._wait
            while len(batch) < self._max_batch:
                try:
                    item = self._next(max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                (batch if item[1] == first[1] else other).append(item)
            self._held = other + self._held
            live = [item for item in batch if item[2].set_running_or_notify_cancel()]
            self._done(len(batch) - len(live))  # timed out while queued: not captioned
            if live:
                self._call(live)

    def _call(self, batch: list) -> None:
        started = time.monotonic()
        try:
            outputs = self._caption([item[0] for item in batch], batch[0][1])
            for index, item in enumerate(batch):
                item[2].set_result((outputs, index))
        except Exception as error:  # noqa: BLE001 (handed to the waiting requests)
            for item in batch:
                item[2].set_exception(error)
        finally:
            seconds = time.monotonic() - started
            self._call_s = seconds if not self._call_s else 0.8 * self._call_s + 0.2 * seconds
            self._done(len(batch))


def create_app(load_model: Callable[[], Any], settings: ServeSettings) -> Flask:
    """The app; `load_model()` (an `export.ExportedCaptioner`) runs in a background thread,
    so that /healthz answers at once and /readyz turns 200 when the model is warm."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_upload_mb * 1024 * 1024)
    state: dict[str, Any] = {"model": None, "batcher": None, "error": None}
    app.config["draining"] = threading.Event()  # set by serve() on SIGTERM
    page = resources.files("caption_pipeline.serving").joinpath("static/index.html").read_bytes()

    def load() -> None:
        try:
            model = load_model()
            model.caption([_warmup_image()], model.default_beam_size)  # loads the graph now
            state["batcher"] = MicroBatcher(
                model.caption,
                settings.max_batch,
                settings.batch_wait_ms,
                settings.max_queue,
                settings.request_timeout_s,
            )
            state["model"] = model
            logger.info("Model %s ready", model.path)
        except Exception as error:  # noqa: BLE001 (reported by /readyz)
            state["error"] = str(error)
            logger.error("Model could not be loaded: %s", error)

    threading.Thread(target=load, name="model-loader", daemon=True).start()

    @app.errorhandler(RequestError)
    def bad_request(error: RequestError):
        return _error(error.status, error.code, error.message, error.headers)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if error.code == 413:
            return _error(
                413,
                "upload_too_large",
                f"the upload is over the limit of {settings.max_upload_mb:g} MB",
            )
        return _error(
            error.code or 500, error.name.lower().replace(" ", "_"), error.description or error.name
        )

    @app.errorhandler(Exception)
    def internal_error(error: Exception):
        logger.exception("Internal error on %s %s", request.method, request.path)
        return _error(500, "internal_error", f"{type(error).__name__}: {error}")

    @app.get("/")
    def index():
        return Response(page, mimetype="text/html")

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz():
        model = state["model"]
        if app.config["draining"].is_set():
            return jsonify(status="draining", error="shutting down"), 503
        if model is None:
            status = "failed" if state["error"] else "loading"
            return jsonify(status=status, error=state["error"]), 503
        info = model.info
        return jsonify(
            status="ready",
            model=str(model.path),
            image_size=info["image_size"],
            grid=info["grid"],
            default_beam_size=info["default_beam_size"],
            max_beam_size=info["max_beam_size"],
            queued=state["batcher"].pending,
            max_queue=settings.max_queue,
        )

    @app.post("/v1/caption")
    def caption():
        model = state["model"]
        if model is None:
            return _error(503, "not_ready", "the model is still loading; retry shortly")
        started = time.perf_counter()
        state["batcher"].check_capacity()
        data, name = _upload()
        beam_size = _beam_size(model.max_beam_size, model.default_beam_size)
        attention = _flag("attention")
        try:
            image = prepare_image(data, name, settings.max_pixels)
        except ImageError as error:
            status = 413 if error.reason == "too_large" else 400
            raise RequestError(status, error.reason, str(error)) from None
        outputs, index = state["batcher"].submit(image, beam_size)
        record = caption_record(outputs, index, model.info["grid"], attention)
        return jsonify(
            **record,
            beam_size=beam_size,
            elapsed_ms=round(1000 * (time.perf_counter() - started), 1),
        )

    return app


def _upload() -> tuple[bytes, str]:
    """The image bytes and a name for messages, from a multipart form or the raw body."""
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        file = request.files.get("image")
        if file is None:
            raise RequestError(
                400,
                "missing_image",
                f"multipart upload without a file field 'image' (fields: {sorted(request.files)})",
            )
        data, name = file.read(), f"upload {file.filename or 'image'!r}"
    elif mimetype.startswith("image/") or mimetype in RAW_TYPES:
        data, name = request.get_data(cache=False), "request body"
    else:
        raise RequestError(
            415,
            "unsupported_content_type",
            f"Content-Type {mimetype or '(none)'!r}: send multipart/form-data "
            "with a file field 'image', or the raw image as image/jpeg, "
            "image/png or application/octet-stream",
        )
    if not data:
        raise RequestError(400, "empty", f"{name}: empty, 0 bytes")
    return data, name


def _field(name: str) -> str | None:
    value = request.args.get(name)
    return request.form.get(name) if value is None else value


def _beam_size(maximum: int, default: int) -> int:
    value = _field("beam_size")
    if value is None or value == "":
        return default
    try:
        beam_size = int(value)
    except ValueError:
        beam_size = 0
    if not 1 <= beam_size <= maximum:
        raise RequestError(
            400, "bad_beam_size", f"beam_size must be an integer in 1..{maximum}, got {value!r}"
        )
    return beam_size


def _flag(name: str) -> bool:
    value = (_field(name) or "").lower()
    if value not in TRUE + FALSE:
        raise RequestError(400, f"bad_{name}", f"{name} must be true or false, got {value!r}")
    return value in TRUE


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    return jsonify(error={"code": code, "message": message}), status, headers or {}


def serve(load_model: Callable[[], Any], settings: ServeSettings) -> None:
    """Run the app with waitress until SIGTERM or Ctrl-C, then drain and return.

    Instead of `server.run()`, this thread runs waitress's event loop one poll at a time, so
    that it sees a signal between polls. On SIGTERM the listening socket is closed (new
    connections are refused at once, and a load balancer's next try goes elsewhere), /readyz
    turns 503, the requests that waitress has read or is answering finish (the loop keeps
    polling, so their answers go out), idle keep-alive connections are closed, and the worker
    threads are shut down. Waiting is bounded by `serve.drain_timeout_s`, like gunicorn's
    `graceful_timeout`: a process manager gets its exit 0 before it would send SIGKILL. A
    second SIGTERM while draining stops at once (the default handler is back).
    """
    import waitress
    from waitress.channel import HTTPChannel
    from waitress.wasyncore import close_all, dispatcher

    app = create_app(load_model, settings)
    # waitress refuses bodies far over the limit itself; Flask answers those near it in JSON.
    server = waitress.create_server(
        app,
        host=settings.host,
        port=settings.port,
        threads=settings.threads,
        max_request_body_size=int(4 * settings.max_upload_mb * 1024 * 1024),
        ident="caption-pipeline",
    )
    draining: threading.Event = app.config["draining"]
    previous = signal.signal(signal.SIGTERM, lambda *_: draining.set())
    logger.info("Serving on http://%s:%d/", settings.host, settings.port)

    def busy() -> int:
        """Connections with a request being read, run or answered; idle ones are closed (a
        keep-alive client then reconnects elsewhere instead of sending us more)."""
        count = 0
        for channel in list(server._map.values()):
            if isinstance(channel, HTTPChannel):
                if channel.requests or channel.request or channel.total_outbufs_len:
                    count += 1
                elif draining.is_set():
                    channel.handle_close()
        return count

    try:
        while not draining.is_set():
            server.asyncore.loop(
                timeout=0.2, map=server._map, count=1, use_poll=server.adj.asyncore_use_poll
            )
    except KeyboardInterrupt:
        draining.set()
    finally:
        signal.signal(signal.SIGTERM, previous)
    dispatcher.close(server)  # the listening socket only; the trigger wakes the loop still
    deadline = time.monotonic() + settings.drain_timeout_s
    logger.info(
        "Shutting down: %d connections busy, waiting up to %g s", busy(), settings.drain_timeout_s
    )
    while busy() and time.monotonic() < deadline:
        server.asyncore.loop(
            timeout=0.1, map=server._map, count=1, use_poll=server.adj.asyncore_use_poll
        )
    if busy():
        logger.warning("Drain timeout: %d requests still in flight are dropped", busy())
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
    close_all(server._map)  # idle keep-alive connections and the trigger
    logger.info("Stopped")


def check_settings(settings: ServeSettings) -> ServeSettings:
    """A DataError naming the first setting out of range."""
    for name, low in (
        ("port", 0),
        ("threads", 1),
        ("max_pixels", 1),
        ("max_batch", 1),
        ("max_queue", 1),
    ):
        value = getattr(settings, name)
        if not isinstance(value, int) or value < low:
            raise DataError(f"serve.{name} must be an integer >= {low}, got {value!r}")
    for name in ("max_upload_mb", "request_timeout_s", "drain_timeout_s"):
        value = getattr(settings, name)
        if not isinstance(value, (int, float)) or not value > 0:
            raise DataError(f"serve.{name} must be a number > 0, got {value!r}")
    if not settings.batch_wait_ms >= 0:
        raise DataError(f"serve.batch_wait_ms must be >= 0, got {settings.batch_wait_ms!r}")
    if settings.threads <= settings.max_queue:
        # A request past the queue needs a free waitress thread to be told 503 at once;
        # otherwise it waits, unseen, in waitress's own unbounded task queue.
        raise DataError(
            f"serve.threads ({settings.threads}) must be greater than "
            f"serve.max_queue ({settings.max_queue}), so that requests past the "
            "queue are answered 503 at once"
        )
    return settings


def _warmup_image() -> bytes:
    """A small white PNG, captioned once before /readyz says ready."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buffer, format="PNG")
    return buffer.getvalue()
