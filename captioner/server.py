"""The JSON HTTP API: `POST /v1/captions` takes images as multipart uploads and answers their captions
as JSON; `GET /v1/health` and `GET /v1/model`. Requests that arrive together are captioned in one
model call (dynamic batching, as Triton and Ray Serve do). Served alone by `captioner serve`, beside
the web UI by app.py, or by replicas on a Ray cluster (`captioner serve --ray`)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import random
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Literal, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from . import __version__
from .data.images import ImageError, describe
from .model.checkpoint import test_reports
from .model.decoder import MAX_CONSENSUS_SAMPLES
from .pipeline import EXPERT_OPTIONS, METHOD_OPTIONS, Captioner, ImageResult

MAX_UPLOAD_MB = 25  # an image, as the web UI allows
MAX_IMAGES = 32  # a request
FIELD = "images"  # the multipart field that carries the images
# What a refused image answers: 415 not an image, 413 more pixels than the limit, 422 no data.
IMAGE_STATUS = {"unreadable": 415, "too_large": 413, "empty": 422, "missing": 422}
CALLER_SEEN_S = 1.0  # how recently a caller must have sent a job to be waited for
log = logging.getLogger("captioner.server")


class CaptionOptions(BaseModel):
    """How to caption: form fields or query parameters of `POST /v1/captions`."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["greedy", "sample", "beam"] = "greedy"
    beam_size: int = Field(3, ge=1, le=16)
    length_penalty: float = Field(0.0, ge=0.0, le=5.0, description="beam ranking: logprob / ((5+len)/6)^alpha")
    no_repeat_ngram_size: int = Field(0, ge=0, le=10)
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    num_samples: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, lt=2**31, description="sampling: image i of the request uses seed + i")
    max_length: int = Field(20, ge=2, le=64, description="most tokens generated, <end> included")
    labels: int = Field(0, ge=0, le=20, description="also answer each image's top-k ImageNet labels")
    grounding: Literal["off", "avoid", "full"] = Field(
        "full", description="what the image's evidence does: nothing; keeps out the words it does not support; "
                            "also brings in, in beam search, the objects it surely shows")
    name_animals: bool | None = Field(None, description="None: as grounding says (on unless off)")
    evidence_weight: float | None = Field(None, ge=0.0, description="None: the checkpoint's own setting")
    evidence_threshold: float | None = Field(None, gt=0.0, le=1.0)
    person_weight: float | None = Field(None, ge=0.0)
    person_threshold: float | None = Field(None, gt=0.0, le=1.0)
    object_weight: float | None = Field(None, ge=0.0)
    object_threshold: float | None = Field(None, gt=0.0, le=1.0)
    include_threshold: float | None = Field(None, ge=0.0, le=1.0)
    max_constraints: int | None = Field(None, ge=0, le=3)
    include_cost: float | None = Field(None, gt=0.0)
    consensus_samples: int | None = Field(None, ge=0, le=MAX_CONSENSUS_SAMPLES,
                                          description="beam search: re-rank by agreement with this many samples; 0: off")

    def decoding(self) -> dict:
        """What `Captioner.decode` reads for this method; the settings it ignores do not split batches."""
        expert = {k: getattr(self, k) for k in EXPERT_OPTIONS if getattr(self, k) is not None}
        return {**{k: getattr(self, k) for k in METHOD_OPTIONS[self.method]}, **expert,
                "grounding": self.grounding, "name_animals": self.name_animals}


@dataclass(eq=False)
class Job:
    """One request's readable images, preprocessed, and how to caption them."""

    names: list[str]
    pixels: list[torch.Tensor]
    options: CaptionOptions
    seeds: list[int]
    caller: str = ""  # who sent it (address and port: a connection kept alive is one caller)
    key: tuple = field(init=False)  # jobs of one key can share a model call

    def __post_init__(self):
        self.key = (self.options.method, self.options.labels, tuple(sorted(self.options.decoding().items())))


def caption_jobs(captioner: Captioner, jobs: Sequence[Job]) -> list[list[ImageResult]]:
    """Each job's results, with one model call for each group of jobs that share their settings."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.key, []).append(i)
    answers: list[list[ImageResult]] = [[] for _ in jobs]
    for members in groups.values():
        options = jobs[members[0]].options
        results = captioner.caption_pixels(torch.stack([p for i in members for p in jobs[i].pixels]),
                                           [n for i in members for n in jobs[i].names], options.method,
                                           seeds=[s for i in members for s in jobs[i].seeds],
                                           labels=options.labels, **options.decoding())
        for i in members:
            answers[i], results = results[:len(jobs[i].names)], results[len(jobs[i].names):]
    return answers


class DynamicBatcher:
    """Captions jobs on one thread: once the model is free, the oldest job waits at most `max_wait_ms`
    for others of its settings, until there is an image for each caller seen in the last second (at
    most `max_batch`), then they run as one model call. Waiting from when the model is free, not from
    the job's arrival, lets the callers one call answered come back and join the next; counting the
    callers spares a lone one the wait (bench/README.md). A request's images stay together."""

    def __init__(self, captioner: Captioner, max_batch: int = 32, max_wait_ms: float = 10.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be at least 1 and max_wait_ms at least 0")
        self.captioner, self.max_batch, self.max_wait = captioner, max_batch, max_wait_ms / 1000
        self.model_calls = 0
        self._callers: dict[str, float] = {}  # caller -> when it last sent a job
        self._pending: deque[tuple[Job, Future, float]] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="captioner-batcher", daemon=True)
        self._thread.start()

    async def __call__(self, job: Job) -> list[ImageResult]:
        future: Future = Future()
        with self._changed:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            now = time.monotonic()
            self._pending.append((job, future, now))
            self._callers[job.caller] = now
            self._changed.notify()
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _next_batch(self) -> list[tuple[Job, Future, float]]:
        with self._changed:
            while not self._pending and not self._closed:
                self._changed.wait()
            if not self._pending:
                return []
            now = time.monotonic()
            key, deadline = self._pending[0][0].key, max(self._pending[0][2], now) + self.max_wait
            self._callers = {c: t for c, t in self._callers.items() if now - t < CALLER_SEEN_S}
            expected = min(self.max_batch, len(self._callers))
            while (sum(len(j.names) for j, _, _ in self._pending if j.key == key) < expected
                   and (left := deadline - time.monotonic()) > 0 and not self._closed):
                self._changed.wait(left)
            batch, waiting, images = [], deque(), 0
            for item in self._pending:
                size = len(item[0].names)
                if item[0].key == key and (not batch or images + size <= self.max_batch):
                    batch.append(item)
                    images += size
                else:
                    waiting.append(item)
            self._pending = waiting
            return batch

    def _run(self) -> None:
        while batch := self._next_batch():
            try:
                answers = caption_jobs(self.captioner, [job for job, _, _ in batch])
            except Exception as err:  # the requests learn of it; the thread serves the next ones
                for _, future, _ in batch:
                    future.set_exception(err)
                continue
            self.model_calls += 1
            for (_, future, _), answer in zip(batch, answers):
                future.set_result(answer)


def read_credentials(pairs: Sequence[str] | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """USER:PASSWORD pairs from the command line and from a file (one a line, # comments); a bad one
    raises ValueError naming where it came from."""
    lines: list[tuple[str, str]] = [("--auth", pair) for pair in pairs or []]
    if auth_file:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"{auth_file}: cannot read ({err.strerror})") from None
        lines += [(f"{auth_file}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.lstrip().startswith("#")]
    credentials = []
    for where, pair in lines:
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{where}: expected USER:PASSWORD")
        credentials.append((user, password))
    return credentials or None


def authorized(header: str | None, credentials: Sequence[tuple[str, str]]) -> bool:
    """Whether an HTTP Basic `Authorization` header names one of the users with its password (each pair
    compared in constant time)."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return bool(sep) and any(secrets.compare_digest(user.encode(), u.encode())
                             & secrets.compare_digest(password.encode(), p.encode()) for u, p in credentials)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuses an API request whose body is larger than `max_bytes`: at once by its Content-Length, or
    as the bytes of a body sent without one arrive (the route answers 413 then)."""

    def __init__(self, app, max_bytes: int, prefix: str = "/v1/"):
        self.app, self.max_bytes, self.prefix = app, max_bytes, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, message = ((413, f"the request is larger than {self.max_bytes:,} bytes") if length.isdigit()
                               else (400, "Content-Length is not a number"))
            return await JSONResponse({"error": message}, status)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)


def refuse(status: int, message: str, **details) -> JSONResponse:
    """A bad request's answer: one line in the log, not a traceback."""
    log.warning("request refused (%d): %s", status, message)
    headers = {"WWW-Authenticate": 'Basic realm="captioner"'} if status == 401 else None
    return JSONResponse({"error": message, **details}, status, headers=headers)


def model_info(captioner: Captioner, name: str, batching: dict) -> dict:
    config = captioner.config
    decoder = config.get("decoder", {})
    return {
        "model": name,
        "version": __version__,
        "encoder": {k: config.get("encoder", {}).get(k) for k in ("name", "weights", "feature_dim")},
        "decoder": {k: decoder.get(k) for k in ("num_layers", "hidden_dim", "embed_dim", "image_feed", "members")},
        "vocabulary": config.get("vocab_size"),
        "defaults": {k: decoder.get(k) for k in EXPERT_OPTIONS},
        "test": test_reports(config.get("training")),
        "device": str(captioner.device), "backend": captioner.backend,
        "batching": batching,
    }


def options_schema(max_images: int) -> dict:
    """The multipart body as OpenAPI describes it: the route reads it itself, to answer each mistake
    with its own status."""
    schema = CaptionOptions.model_json_schema()
    properties = {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": f"1 to {max_images} image files (JPEG, PNG, WebP, ...)"},
                  **schema["properties"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [FIELD], "properties": properties}}}}}


def build_api(captioner: Captioner, caption: Callable[[Job], Awaitable[list[ImageResult]]], *, name: str,
              model_calls: Callable[[], int], credentials: Sequence[tuple[str, str]] | None = None,
              max_images: int = MAX_IMAGES, max_upload_mb: float = MAX_UPLOAD_MB,
              batching: dict | None = None) -> FastAPI:
    """The API's FastAPI app around `caption`, which captions a job (a `DynamicBatcher`, or Ray Serve's
    batch handler), and `model_calls`, which counts the calls it made. With `credentials`, every route
    but /v1/health asks for HTTP Basic auth."""
    app = FastAPI(title="captioner", version=__version__,
                  description="Image captioning: multipart images in, captions as JSON out.")
    upload_limit = int(max_upload_mb * 2**20)
    app.add_middleware(BodyLimit, max_bytes=max_images * upload_limit + 2**20)
    info = model_info(captioner, name, batching or {})
    served = {"requests": 0, "images": 0}

    def denied(request: Request) -> JSONResponse | None:
        if credentials and not authorized(request.headers.get("authorization"), credentials):
            return refuse(401, "this server needs HTTP Basic credentials (USER:PASSWORD)")
        return None

    @app.get("/v1/health")
    async def health():
        """Whether the server answers (no credentials needed, for load balancers)."""
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model(request: Request):
        """What this server captions with (the model, its sizes, default settings and test scores), and
        what it has served: requests and images captioned, and the model calls that took."""
        return denied(request) or {**info, "served": {**served, "model_calls": model_calls()}}

    @app.post("/v1/captions", openapi_extra=options_schema(max_images))
    async def captions(request: Request):
        """Captions 1 to `max_images` images: per image, the caption, every beam or sample with its
        log-probability, optional labels, or why it could not be read. 200 when any image was
        captioned; otherwise the status of the first image's refusal."""
        if refused := denied(request):
            return refused
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return refuse(415, f"send the images as multipart/form-data, in the field {FIELD!r}")
        try:
            form = await request.form(max_files=max_images, max_fields=len(CaptionOptions.model_fields))
        except BodyTooLarge:
            return refuse(413, f"the request is larger than {max_images * upload_limit + 2**20:,} bytes")
        except (MultiPartException, HTTPException) as err:  # malformed, or more parts than a request may have
            message = getattr(err, "detail", None) or str(err)
            return refuse(422 if message.startswith("Too many") else 400, f"cannot read the form: {message}")
        try:
            return await answer(request, form)
        finally:
            await form.close()

    async def answer(request: Request, form) -> JSONResponse | dict:
        uploads = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
        fields = {key: value for key, value in form.multi_items() if not isinstance(value, UploadFile)}
        if stray := sorted({key for key, _ in uploads if key != FIELD}):
            return refuse(422, f"unknown file field(s) {', '.join(map(repr, stray))}: send images in {FIELD!r}")
        if both := sorted(set(fields) & set(request.query_params)):
            return refuse(422, f"{', '.join(both)} given both as a form field and a query parameter")
        try:
            options = CaptionOptions.model_validate({**request.query_params, **fields})
        except ValidationError as err:
            problems = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in err.errors()]
            return refuse(422, "; ".join(f"{p['field']}: {p['message']}" for p in problems), fields=problems)
        if not uploads:
            return refuse(422, f"no image: send 1 to {max_images} files in the field {FIELD!r}")
        names, pixels, refusals = [], [], {}
        for i, (_, upload) in enumerate(uploads):
            label = f"{FIELD}[{i}] {upload.filename or 'upload'!r}"
            names.append(upload.filename or f"{FIELD}[{i}]")
            if upload.size is not None and upload.size > upload_limit:
                refusals[i] = (413, f"{label}: {upload.size:,} bytes is above the limit of {upload_limit:,}")
                continue
            data = await upload.read()
            try:
                pixels.append((i, await run_in_threadpool(captioner.transform.load, data)))
            except ImageError as err:
                refusals[i] = (IMAGE_STATUS.get(err.reason, 415), str(err).replace(describe(data), label, 1))
        if not pixels:
            first = refusals[0]
            return refuse(first[0], first[1], images=[{"file": names[i], "error": m, "status": s}
                                                     for i, (s, m) in sorted(refusals.items())])
        base = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
        good = [i for i, _ in pixels]
        caller = "%s:%s" % tuple(request.client) if request.client else ""
        results = iter(await caption(Job([names[i] for i in good], [p for _, p in pixels], options,
                                         [base + i for i in good], caller)))
        served["requests"] += 1
        served["images"] += len(good)
        images = []
        for i, file in enumerate(names):
            if i in refusals:
                status, message = refusals[i]
                log.warning("image refused (%d): %s", status, message)
                images.append({"file": file, "error": message, "status": status})
            else:
                images.append(image_answer(next(results), file))
        return {"model": name, "method": options.method, "options": options.model_dump(exclude_none=True),
                "images": images}

    return app


def image_answer(result: ImageResult, name: str) -> dict:
    entry = {"file": name, "caption": result.text,
             "captions": [{"text": c.text, "logprob": round(c.logprob, 4), "perplexity": round(c.perplexity, 3)}
                          for c in result.captions]}
    if result.captions and result.captions[0].required:
        entry["brought_in"] = result.captions[0].required  # the objects the evidence required
    if result.labels is not None:
        entry["labels"] = [{"name": x.name, "word": x.word, "probability": round(x.probability, 4)}
                           for x in result.labels]
    return entry


def serve_local(captioner: Captioner, name: str, host: str, port: int, *, max_batch: int, max_wait_ms: float,
                wrap: Callable[[FastAPI], FastAPI] | None = None, **api_options) -> None:
    """Runs the API on uvicorn in this process until interrupted; `wrap` may add to its app (app.py
    mounts the web UI on it)."""
    import uvicorn

    batcher = DynamicBatcher(captioner, max_batch, max_wait_ms)
    app = build_api(captioner, batcher, name=name, model_calls=lambda: batcher.model_calls,
                    batching={"max_batch": max_batch, "max_wait_ms": max_wait_ms}, **api_options)
    try:
        uvicorn.run(wrap(app) if wrap else app, host=host, port=port, access_log=False)
    finally:
        batcher.close()


def ray_deployment(checkpoint: str | None, name: str, load_options: dict, *, replicas: int, max_batch: int,
                   max_wait_ms: float, **api_options):
    """The API as a Ray Serve application: `replicas` copies, each loading the model once and batching
    with `serve.batch` (at most `max_batch` requests a call)."""
    from ray import serve

    batching = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "replicas": replicas, "ray": True}

    def build() -> FastAPI:  # runs on each replica
        captioner = Captioner.from_pretrained(checkpoint, **load_options)
        calls = [0]  # this replica's

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000)
        async def caption(jobs: list[Job]) -> list[list[ImageResult]]:
            calls[0] += 1
            return await asyncio.to_thread(caption_jobs, captioner, jobs)

        return build_api(captioner, caption, name=name, model_calls=lambda: calls[0], batching=batching,
                         **api_options)

    return serve.deployment(serve.ingress(build)(), name="captioner", num_replicas=replicas).bind()


def serve_on_ray(address: str, host: str, port: int, checkpoint: str | None, name: str, load_options: dict,
                 **options) -> None:
    """Deploys the API on the Ray cluster at `address` ("" starts a local one) and serves until
    interrupted."""
    import ray
    from ray import serve

    ray.init(address=address or None)
    serve.start(http_options={"host": host, "port": port})
    serve.run(ray_deployment(checkpoint, name, load_options, **options), name="captioner", route_prefix="/")
    log.info("serving on http://%s:%d/v1/captions through Ray Serve", host, port)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
