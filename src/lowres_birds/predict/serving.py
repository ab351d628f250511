"""HTTP server for a trained classifier: a one-page web app plus a small JSON API.

Built on ``Classifier`` so that an upload goes through exactly the preprocessing of ``predict-image`` and the
Python API. Uploads stay in memory (the request body is capped before parsing, and the multipart parser is
told never to spool to disk), are decoded on a small bounded thread pool, and are classified by a single
inference thread that stacks concurrent requests into one batch.

Limits: one request body (413 beyond ``max_upload_bytes``), the bodies of all clients together (503 beyond
``max_inflight_bytes``, counted from the declared length or as chunks arrive), and time: a client that sends
nothing for ``client_timeout_s`` is dropped, whether before its request is complete (``http_server``), between
two chunks of its body (408) or idle between requests.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import os
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from lowres_birds import __version__
from lowres_birds.config import DEFAULT_CLIENT_TIMEOUT_S, DEFAULT_MAX_INFLIGHT_MB, DEFAULT_MAX_UPLOAD_MB, LR_SIZE
from lowres_birds.data.images import decode_image
from lowres_birds.errors import UserError
from lowres_birds.predict.classifier import Classifier, to_model_input

if TYPE_CHECKING:
    import uvicorn
    from uvicorn.protocols.http.h11_impl import RequestResponseCycle

STATIC_DIR = Path(__file__).parents[1] / "static"
MAX_BATCH_FILES = 32
MAX_QUEUED_REQUESTS = 256  # beyond this the server answers 503 instead of piling up work
MAX_TOP = 20
MIN_CONFIDENCE_QUERY = Query(
    0.0, ge=0, le=1, description="abstain (label null) when the top calibrated probability is below this"
)
CLOSE = {"Connection": "close"}  # after a refused or cut upload: the rest of its body is never read


class InferenceQueue:
    """One thread owns the model; requests that arrive while it is busy are classified together (micro-batching)."""

    def __init__(self, classifier: Classifier, max_batch_images: int = MAX_BATCH_FILES):
        self.classifier = classifier
        self.max_batch_images = max_batch_images
        self._requests: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue(MAX_QUEUED_REQUESTS)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # images per model call -> calls
        self.inference_s = 0.0  # time spent in model calls
        self._thread = threading.Thread(target=self._serve_forever, name="inference", daemon=True)
        self._thread.start()

    def submit(self, images: np.ndarray) -> Future:
        """uint8 N x 64 x 64 x 3 -> a future of N x C probabilities; 503 when the queue is full."""
        future: Future = Future()
        try:
            self._requests.put_nowait((images, future))
        except queue.Full:
            raise HTTPException(503, "the server is busy; retry in a moment") from None
        return future

    def stats(self) -> dict:
        """Model calls so far: how many, images per call, and images per second of model time."""
        calls, images = sum(self.batch_sizes.values()), sum(size * n for size, n in self.batch_sizes.items())
        return {
            "model_calls": calls,
            "images": images,
            "mean_batch": images / calls if calls else 0.0,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
            "model_images_per_s": images / self.inference_s if self.inference_s else 0.0,
        }

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def _serve_forever(self) -> None:
        stopping = False
        while not stopping:
            request = self._requests.get()
            if request is None:
                return
            batch = [request]
            while sum(len(images) for images, _ in batch) < self.max_batch_images:
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stopping = True
                    break
                batch.append(request)
            self._classify(batch)

    def _classify(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        images = np.concatenate([images for images, _ in batch])
        started = time.perf_counter()
        try:
            probs, unknown = self.classifier.predict_scores(images)
        except Exception as exc:  # the model failed: every waiting request gets the error, the thread lives on
            for _, future in batch:
                future.set_exception(exc)
            return
        self.inference_s += time.perf_counter() - started
        self.batch_sizes[len(images)] += 1
        start = 0
        for images, future in batch:
            end = start + len(images)
            future.set_result((probs[start:end], None if unknown is None else unknown[start:end]))
            start = end


class UploadBudget:
    """Request-body bytes held by all clients together. Used from the event loop's thread only (no lock)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    @asynccontextmanager
    async def reservation(self) -> AsyncIterator[Reservation]:
        held = Reservation(self)
        try:
            yield held
        finally:
            self.used -= held.bytes


class Reservation:
    """What one request holds of the budget, until its response is built."""

    def __init__(self, budget: UploadBudget):
        self.budget = budget
        self.bytes = 0

    def grow(self, total: int) -> None:
        """Hold ``total`` bytes for this request; 503 when all clients together would pass the limit."""
        if total <= self.bytes:
            return
        if self.budget.used + total - self.bytes > self.budget.limit:
            raise HTTPException(
                503,
                f"the server is receiving too many uploads at once (limit {self.budget.limit:,} bytes); retry in a "
                "moment",
                headers=CLOSE,
            )
        self.budget.used += total - self.bytes
        self.bytes = total


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    timeout_s: float


def create_app(
    classifier: Classifier,
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20),
    max_batch_files: int = MAX_BATCH_FILES,
    decode_workers: int | None = None,
    max_inflight_bytes: int = int(DEFAULT_MAX_INFLIGHT_MB * 2**20),
    client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
) -> FastAPI:
    """The web app and API around ``classifier``. ``max_upload_bytes`` caps each request body (413 beyond),
    ``max_inflight_bytes`` all of them together (503 beyond), ``client_timeout_s`` the wait for each body chunk
    (408)."""
    if max_inflight_bytes < max_upload_bytes:
        raise ValueError("max_inflight_bytes must be at least max_upload_bytes")
    limits = Limits(max_upload_bytes, client_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.inference = InferenceQueue(classifier, max_batch_files)
        app.state.timings = {}
        app.state.decoders = ThreadPoolExecutor(
            decode_workers or min(4, os.cpu_count() or 1), thread_name_prefix="decode"
        )
        try:
            yield
        finally:
            app.state.decoders.shutdown(wait=True, cancel_futures=True)
            app.state.inference.close()

    app = FastAPI(title="lowres-birds", version=__version__, lifespan=lifespan)
    app.state.uploads = UploadBudget(max_inflight_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    model_name = Path(classifier.name).name

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and the router's own (404, 405) alike
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": problems}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/api/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": model_name,
            "classes": len(classifier.labels),
            "input_size": LR_SIZE,
            "runtime": classifier.runtime,
            "tta": classifier.tta,
            "version": __version__,
        }

    @app.get("/api/labels")
    async def labels() -> dict:
        return {"labels": classifier.labels}

    @app.get("/api/stats")
    async def stats() -> dict:
        """Where requests' time went (mean ms per stage) and how the model was called (micro-batch sizes)."""
        timings: dict[str, float] = app.state.timings
        count = timings.get("requests", 0)
        return {
            "requests": count,
            "mean_ms": {stage: round(total / count, 3) for stage, total in timings.items() if stage != "requests"}
            if count
            else {},
            **app.state.inference.stats(),
        }

    async def classify(
        request: Request, response: Response, started: float, uploads: list[UploadFile], top: int, min_confidence: float
    ) -> tuple[list[dict], list[np.ndarray], float]:
        """Decode (thread pool) -> micro-batched model call -> one answer per photo (top-k, label, unknown flag;
        ``Classifier.answer``); the stages' times go to the Server-Timing header."""
        loop = asyncio.get_running_loop()
        received = time.perf_counter()
        contents = [await upload.read() for upload in uploads]
        images = await asyncio.gather(
            *(
                loop.run_in_executor(request.app.state.decoders, decode_upload, data, upload.filename or "upload")
                for data, upload in zip(contents, uploads)
            )
        )
        decoded = time.perf_counter()
        probs, unknown = await asyncio.wrap_future(request.app.state.inference.submit(np.stack(images)))
        predicted = time.perf_counter()
        answers = [
            classifier.answer(row, None if unknown is None else unknown[i], top, min_confidence)
            for i, row in enumerate(probs)
        ]
        stages = {
            "upload": received - started,
            "decode": decoded - received,
            "model": predicted - decoded,
            "answer": time.perf_counter() - predicted,
        }
        response.headers["Server-Timing"] = ", ".join(
            f"{stage};dur={seconds * 1000:.2f}" for stage, seconds in stages.items()
        )
        timings = request.app.state.timings
        timings["requests"] = timings.get("requests", 0) + 1
        for stage, seconds in stages.items():
            timings[stage] = timings.get(stage, 0.0) + seconds * 1000
        return answers, images, (time.perf_counter() - started) * 1000

    @app.post("/api/predict")
    async def predict(
        request: Request,
        response: Response,
        top: int = Query(5, ge=1, le=MAX_TOP),
        preview: bool = Query(False, description="include the 64x64 model input as a PNG data URL"),
        min_confidence: float = MIN_CONFIDENCE_QUERY,
    ) -> dict:
        """One photo in the multipart field ``file`` -> the top species, the answer (``label``: null when unknown or
        below ``min_confidence``) and, for a calibrated model, ``unknown`` and ``unknown_score``."""
        started = time.perf_counter()
        async with app.state.uploads.reservation() as held:
            uploads = await read_uploads(request, limits, held, max_files=1)
            (best,), (image,), elapsed_ms = await classify(request, response, started, uploads, top, min_confidence)
        answer = {**best, "model": model_name, "input_size": LR_SIZE, "elapsed_ms": round(elapsed_ms, 2)}
        if preview:
            answer["preview"] = png_data_url(image)
        return answer

    @app.post("/api/predict/batch")
    async def predict_batch(
        request: Request,
        response: Response,
        top: int = Query(5, ge=1, le=MAX_TOP),
        min_confidence: float = MIN_CONFIDENCE_QUERY,
    ) -> dict:
        """Up to ``max_batch_files`` photos in the multipart field ``files`` -> the answer for each, in order."""
        started = time.perf_counter()
        async with app.state.uploads.reservation() as held:
            uploads = await read_uploads(request, limits, held, max_files=max_batch_files, field="files")
            answers, _, elapsed_ms = await classify(request, response, started, uploads, top, min_confidence)
        results = [{"filename": upload.filename, **answer} for upload, answer in zip(uploads, answers)]
        return {"results": results, "model": model_name, "input_size": LR_SIZE, "elapsed_ms": round(elapsed_ms, 2)}

    return app


async def read_uploads(
    request: Request, limits: Limits, held: Reservation, max_files: int, field: str = "file"
) -> list[UploadFile]:
    """The files of one multipart field, held in memory; 413 past the upload limit, 503 past the budget of all
    uploads, 408 when the client stalls, 422 past ``max_files`` or when absent."""
    max_bytes = limits.max_upload_bytes
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, f"send the photo as multipart/form-data in the field '{field}'", headers=CLOSE)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > max_bytes:
            raise HTTPException(
                413, f"upload of {int(declared):,} bytes is larger than the limit of {max_bytes:,} bytes", headers=CLOSE
            )
        held.grow(int(declared))
    parser = MultiPartParser(
        request.headers, _capped(request.stream(), limits, held), max_files=max_files, max_fields=8
    )
    parser.spool_max_size = max_bytes + 1  # never roll an upload over to a temporary file on disk
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(422, exc.message) from None
    uploads = [item for item in form.getlist(field) if isinstance(item, UploadFile)]
    if not uploads:
        raise HTTPException(422, f"no file in the multipart field '{field}'")
    return uploads


async def _capped(stream: AsyncIterator[bytes], limits: Limits, held: Reservation) -> AsyncIterator[bytes]:
    """The request body, refused with 413 as soon as it grows past the upload limit (chunked uploads too), with
    503 past the budget of all uploads, and with 408 when no chunk arrives for ``limits.timeout_s``."""
    received, chunks = 0, aiter(stream)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(chunks), limits.timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise HTTPException(408, f"no data for {limits.timeout_s:g} s; upload dropped", headers=CLOSE) from None
        except ClientDisconnect:
            raise HTTPException(400, "the client went away during the upload", headers=CLOSE) from None
        received += len(chunk)
        if received > limits.max_upload_bytes:
            raise HTTPException(
                413, f"upload is larger than the limit of {limits.max_upload_bytes:,} bytes", headers=CLOSE
            )
        held.grow(received)
        yield chunk


def decode_upload(data: bytes, filename: str) -> np.ndarray:
    """Uploaded bytes -> the 64x64x3 model input; 415 when they are not an image, 422 when broken or too large."""
    if not data:
        raise HTTPException(422, f"{filename} is empty")
    try:
        Image.open(io.BytesIO(data)).close()  # identifies the format from the header only
    except UnidentifiedImageError:
        raise HTTPException(415, f"{filename} is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF expected)") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        pass  # an image, but a broken or huge one: decode_image names the problem below
    upload = io.BytesIO(data)
    upload.name = filename
    try:
        return to_model_input(decode_image(upload))
    except UserError as exc:
        raise HTTPException(422, str(exc).removesuffix("; replace or remove it")) from None


def png_data_url(image: np.ndarray) -> str:
    """HxWx3 uint8 -> a ``data:image/png;base64,...`` URL (the page enlarges it with nearest-neighbour)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def http_server(
    app: FastAPI, client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S, log_level: str = "info"
) -> uvicorn.Server:
    """The uvicorn server ``serve`` runs: idle keep-alive connections and connections that have not sent a complete
    request within ``client_timeout_s`` are closed (uvicorn alone waits forever for a first request)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class RequestDeadlineProtocol(H11Protocol):
        """Arms a deadline on connect and after each response; it closes the connection unless a request started."""

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_deadline()

        def _arm_deadline(self) -> None:
            self.loop.call_later(self.timeout_keep_alive, self._deadline, self.cycle)

        def _deadline(self, cycle: RequestResponseCycle | None) -> None:
            if self.cycle is cycle and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    config = uvicorn.Config(app, log_level=log_level, http=RequestDeadlineProtocol, timeout_keep_alive=client_timeout_s)
    return uvicorn.Server(config)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a busy port or bad address is one clear line, not a traceback."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as exc:
        raise UserError(
            f"serve: cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port or --host"
        ) from None
    listener.listen(2048)
    return listener
