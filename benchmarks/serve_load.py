"""Load test for ``lowres-birds serve``: N requests at C concurrent to POST /api/predict, on loopback only.

Starts the server itself (``--run`` or ``--onnx``) or targets one already running (``--url`` on 127.0.0.1 /
localhost), prints p50/p95 latency, throughput and errors, where a request's milliseconds went (the server's
/api/stats: upload parsing, decoding, queue wait + model, answer) and the micro-batch sizes the server used.
When it started the server itself it then stops it and measures, in the same run, the model's offline
throughput at that mean micro-batch size (``Classifier.predict_arrays``), and prints served/offline.
Appends one line with the machine described to the "Serving" section of BENCHMARKS.md.

The load comes from ``wrk`` (Debian package; a C client that leaves the cores to the server) when it is
installed, else from an httpx client in this process.

    python benchmarks/serve_load.py --run runs/tiny                 # 1,000 requests, 16 concurrent
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 200 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Serving (benchmarks/serve_load.py)"
TABLE_HEADER = (
    "| date | model | image | requests | concurrency | p50 ms | p95 ms | requests/s | errors | machine |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)
WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=%(boundary)s"
local f = io.open("%(body)s", "rb"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%.3f %%.3f %%.3f\\n", summary.requests,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout +
    summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, summary.duration / 1e6))
end
"""
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", type=Path, help="trained run folder: the script starts the server")
    target.add_argument("--onnx", type=Path, help="exported ONNX model: the script starts the server")
    target.add_argument("--url", help="a server already running on loopback, e.g. http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=1000, help="total requests (at most 100,000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (at most 256)")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="load duration with wrk (--requests applies to the httpx client)"
    )
    parser.add_argument("--image", type=Path, help="photo to send (default: a synthetic 256x256 JPEG bird)")
    parser.add_argument(
        "--benchmarks", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file to append the result to"
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args()
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be 1..100000 and --concurrency 1..256")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        parser.error(f"--url must point at this machine (127.0.0.1 or localhost), not {urlparse(args.url).hostname}")
    return args


def synthetic_photo() -> bytes:
    """A 256x256 JPEG of a drawn bird, the size of the high-res training twins."""
    from lowres_birds.data.demo import draw_bird

    buffer = io.BytesIO()
    draw_bird(0, np.random.default_rng(0)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def start_server(model_args: list[str], log) -> tuple[subprocess.Popen, str]:
    """``lowres-birds serve`` on a free loopback port; returns once it printed its address and /api/health is up."""
    command = [sys.executable, "-m", "lowres_birds", "serve", *model_args, "--host", "127.0.0.1", "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    line = server.stdout.readline()  # "serving ... on http://127.0.0.1:PORT/ ..." once the model is loaded
    if " on http://" not in line:
        server.wait(30)
        log.seek(0)
        raise SystemExit(f"server did not start (exit {server.returncode}): {log.read().strip()[-500:]}")
    url = line.split(" on ", 1)[1].split("/ ", 1)[0]
    # uvicorn's access log goes to stdout: keep reading it, or a full pipe would block the server.
    threading.Thread(target=server.stdout.read, daemon=True).start()
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not answer /api/health within 60 s") from None


async def load(url: str, photo: bytes, requests: int, concurrency: int) -> tuple[np.ndarray, int, float]:
    """(latencies of the successful requests in ms, error count, wall seconds)."""
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while not queue.empty():
            queue.get_nowait()
            started = time.perf_counter()
            try:
                response = await client.post("/api/predict", files={"file": ("bird.jpg", photo, "image/jpeg")})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await client.post("/api/predict", files={"file": ("warmup.jpg", photo, "image/jpeg")})
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return np.array(latencies), errors, wall


def load_with_wrk(url: str, photo: bytes, seconds: float, concurrency: int) -> tuple[int, float, float, int, float]:
    """(requests, p50 ms, p95 ms, errors, wall seconds) of ``wrk`` posting ``photo`` for ``seconds``."""
    boundary = "lowresbirdsboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="bird.jpg"\r\n'.encode()
        + b"Content-Type: image/jpeg\r\n\r\n"
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "body.bin").write_bytes(body)
        script = Path(folder) / "post.lua"
        script.write_text(WRK_SCRIPT % {"boundary": boundary, "body": Path(folder) / "body.bin"})
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:.0f}s", "-s", str(script), f"{url}/api/predict"]
        output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    requests, errors, p50, p95, wall = output.split("RESULT ", 1)[1].split()
    return int(requests), float(p50), float(p95), int(errors), float(wall)


def offline_images_per_second(model: Path, batch: int, photo: bytes, seconds: float = 10.0) -> float:
    """The model alone through ``Classifier.predict_arrays`` at ``batch`` images per call, nothing else running."""
    from PIL import Image

    from lowres_birds.predict.classifier import Classifier, to_model_input

    classifier = Classifier.load(model)
    image = to_model_input(Image.open(io.BytesIO(photo)))
    images = np.repeat(image[None], batch, axis=0)
    for _ in range(5):
        classifier.predict_arrays(images, batch_size=batch)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        classifier.predict_arrays(images, batch_size=batch)
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    import torch

    busy = f", load average {os.getloadavg()[0]:.1f} before the run" if hasattr(os, "getloadavg") else ""
    cores = len(os.sched_getaffinity(0))
    return f"{cores} cores, {cpu}, torch {torch.__version__}, Python {platform.python_version()}{busy}"


def record(path: Path, row: str) -> None:
    """Add ``row`` at the end of the Serving section (created if missing); other sections are left as they are."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{TABLE_HEADER}\n{row}\n"
    else:
        start = text.index(SECTION)
        next_section = text.find("\n## ", start + len(SECTION))
        end = len(text) if next_section == -1 else next_section + 1
        text = (
            text[:start]
            + text[start:end].rstrip("\n")
            + f"\n{row}\n"
            + ("\n" + text[end:] if next_section != -1 else "")
        )
    path.write_text(text, encoding="utf-8")


def main() -> int:
    args = parse_args()
    photo = args.image.read_bytes() if args.image else synthetic_photo()
    image_name = args.image.name if args.image else "synthetic 256x256 JPEG"
    machine = describe_machine()
    server = None
    use_wrk = shutil.which("wrk") is not None
    with tempfile.TemporaryFile("w+") as log:
        if args.url:
            url, model = (
                args.url.rstrip("/"),
                httpx.get(f"{args.url.rstrip('/')}/api/health", timeout=5).json()["model"],
            )
        else:
            model_args = ["--run", str(args.run)] if args.run else ["--onnx", str(args.onnx)]
            server, url = start_server(model_args, log)
            model = f"{'onnx' if args.onnx else 'torch'}: {(args.run or args.onnx).name}"
        try:
            before = httpx.get(f"{url}/api/stats", timeout=5).json()
            if use_wrk:
                count, p50, p95, errors, wall = load_with_wrk(url, photo, args.seconds, args.concurrency)
            else:
                latencies, errors, wall = asyncio.run(load(url, photo, args.requests, args.concurrency))
                count = len(latencies)
                p50, p95 = np.percentile(latencies, [50, 95]) if count else (float("nan"), float("nan"))
            stats = httpx.get(f"{url}/api/stats", timeout=5).json()
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    throughput = count / wall
    calls = stats["model_calls"] - before["model_calls"]
    mean_batch = (stats["images"] - before["images"]) / calls if calls else 0.0
    print(
        f"{count} requests in {wall:.1f} s, {args.concurrency} concurrent ({'wrk' if use_wrk else 'httpx'}), {model}, "
        f"{image_name}"
    )
    print(f"p50 {p50:.1f} ms  p95 {p95:.1f} ms  {throughput:.1f} requests/s  errors {errors}")
    print(
        "mean ms per request: "
        + ", ".join(f"{stage} {ms:.2f}" for stage, ms in stats["mean_ms"].items())
        + " (model = queue wait + model call)"
    )
    print(f"micro-batches: mean {mean_batch:.1f} images per model call; sizes {stats['batch_sizes']}")
    ratio_text = ""
    if server is not None and mean_batch:
        batch = max(1, round(mean_batch))
        offline = offline_images_per_second(args.run or args.onnx, batch, photo)
        ratio_text = f"; offline {offline:.0f} img/s at batch {batch} -> served/offline {throughput / offline:.2f}"
        print(
            f"the model alone at batch {batch}: {offline:.1f} images/s; served requests/s / offline images/s = "
            f"{throughput / offline:.2f}"
        )
    print(f"machine: {machine}")
    if not args.no_record:
        date = datetime.date.today().isoformat()
        note = f"{throughput:.1f} (mean batch {mean_batch:.1f}{ratio_text})"
        record(
            args.benchmarks,
            f"| {date} | {model} | {image_name} | {count} | {args.concurrency} | {p50:.1f} | {p95:.1f} | {note} | "
            f"{errors} | {machine} |",
        )
        print(f"appended to {args.benchmarks}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
