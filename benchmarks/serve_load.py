"""Load test for ``lowres-birds serve``: N requests at C concurrent to POST /api/predict, on loopback only.

Starts the server itself (``--run`` or ``--onnx``) or targets one already running (``--url`` on 127.0.0.1 /
localhost), prints p50/p95 latency, throughput and errors, and appends one line with the machine described
to the "Serving" section of BENCHMARKS.md.

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
import subprocess
import sys
import tempfile
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
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", type=Path, help="trained run folder: the script starts the server")
    target.add_argument("--onnx", type=Path, help="exported ONNX model: the script starts the server")
    target.add_argument("--url", help="a server already running on loopback, e.g. http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=1000, help="total requests (at most 100,000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (at most 256)")
    parser.add_argument("--image", type=Path, help="photo to send (default: a synthetic 256x256 JPEG bird)")
    parser.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file to append the result to")
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


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import torch

    busy = f", load average {os.getloadavg()[0]:.1f} before the run" if hasattr(os, "getloadavg") else ""
    return f"{len(os.sched_getaffinity(0))} cores, {cpu}, torch {torch.__version__}, Python {platform.python_version()}{busy}"


def record(path: Path, row: str) -> None:
    """Add ``row`` at the end of the Serving section (created if missing); other sections are left as they are."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{TABLE_HEADER}\n{row}\n"
    else:
        start = text.index(SECTION)
        next_section = text.find("\n## ", start + len(SECTION))
        end = len(text) if next_section == -1 else next_section + 1
        text = text[:start] + text[start:end].rstrip("\n") + f"\n{row}\n" + ("\n" + text[end:] if next_section != -1 else "")
    path.write_text(text, encoding="utf-8")


def main() -> int:
    args = parse_args()
    photo = args.image.read_bytes() if args.image else synthetic_photo()
    image_name = args.image.name if args.image else "synthetic 256x256 JPEG"
    machine = describe_machine()
    server = None
    with tempfile.TemporaryFile("w+") as log:
        if args.url:
            url, model = args.url.rstrip("/"), httpx.get(f"{args.url.rstrip('/')}/api/health", timeout=5).json()["model"]
        else:
            model_args = ["--run", str(args.run)] if args.run else ["--onnx", str(args.onnx)]
            server, url = start_server(model_args, log)
            model = f"{'onnx' if args.onnx else 'torch'}: {(args.run or args.onnx).name}"
        try:
            latencies, errors, wall = asyncio.run(load(url, photo, args.requests, args.concurrency))
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    p50, p95 = (np.percentile(latencies, [50, 95]) if len(latencies) else (float("nan"), float("nan")))
    throughput = len(latencies) / wall
    print(f"{args.requests} requests, {args.concurrency} concurrent, {model}, {image_name}")
    print(f"p50 {p50:.1f} ms  p95 {p95:.1f} ms  {throughput:.1f} requests/s  errors {errors}  ({wall:.1f} s)")
    print(f"machine: {machine}")
    if not args.no_record:
        date = datetime.date.today().isoformat()
        record(args.benchmarks, f"| {date} | {model} | {image_name} | {args.requests} | {args.concurrency} | {p50:.1f} | {p95:.1f} | {throughput:.1f} | {errors} | {machine} |")
        print(f"appended to {args.benchmarks}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
