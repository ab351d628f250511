"""The JSON API (good photos, every kind of bad upload, the limits), micro-batching, `predict-image`, a foreign
ONNX\nmodel refused at load, and the limits of a live server (stalled, idle and concurrent clients, over raw
sockets)."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import wait
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lowres_birds.cli import main
from lowres_birds.config import DEFAULT_CLIENT_TIMEOUT_S
from lowres_birds.predict.classifier import Classifier, to_model_input
from lowres_birds.predict.serving import InferenceQueue, bind, create_app, http_server

MAX_UPLOAD_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def classifier(trained_run) -> Classifier:
    return Classifier.load(trained_run)


@pytest.fixture(scope="module")
def client(classifier):
    with TestClient(create_app(classifier, max_upload_bytes=MAX_UPLOAD_BYTES)) as test_client:
        yield test_client


@pytest.fixture
def photo(demo_data) -> Path:
    return sorted((demo_data / "upscale_train").glob("*.jpg"))[0]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def assert_still_serving(client, photo: Path) -> None:
    response = client.post("/api/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- good requests


def test_predict_matches_the_python_api_and_previews_the_model_input(client, classifier, photo):
    response = client.post(
        "/api/predict?preview=true&top=3", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}
    )

    assert response.status_code == 200, response.text
    answer = response.json()
    expected = classifier(photo, top_k=3)
    assert [entry["label"] for entry in answer["top"]] == [e["label"] for e in expected]
    assert [entry["probability"] for entry in answer["top"]] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    assert answer["input_size"] == 64 and answer["elapsed_ms"] > 0 and answer["model"]
    header, encoded = answer["preview"].split(",", 1)
    assert header == "data:image/png;base64"
    preview = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
    np.testing.assert_array_equal(preview, to_model_input(photo))


def test_any_size_and_mode_is_accepted(client, classifier):
    rng = np.random.default_rng(0)
    odd = Image.fromarray(rng.integers(0, 255, (180, 300, 4), dtype=np.uint8), "RGBA")

    response = client.post("/api/predict", files={"file": ("odd.png", png_bytes(odd), "image/png")})

    assert response.status_code == 200, response.text
    assert len(response.json()["top"]) == min(5, len(classifier.labels))
    assert sum(entry["probability"] for entry in response.json()["top"]) == pytest.approx(1, abs=1e-4)  # 3 classes


def test_batch_answers_each_file_in_order(client, classifier, demo_data):
    photos = sorted((demo_data / "test").glob("*.jpg"))[:4]

    response = client.post(
        "/api/predict/batch?top=1", files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    )

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [p.name for p in photos]
    assert [r["top"][0]["label"] for r in results] == [best["label"] for (best,) in classifier(photos, top_k=1)]


def test_labels_health_and_page(client, classifier):
    assert client.get("/api/labels").json() == {"labels": classifier.labels}
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["classes"] == len(classifier.labels) and health["version"]
    assert health["runtime"] == classifier.runtime
    page = client.get("/")
    assert page.status_code == 200 and "photo-input" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200 and "://" not in response.text  # works offline: nothing from a CDN
    assert "://" not in page.text


def test_large_upload_stays_in_memory(client, monkeypatch):
    """A 3 MB photo is past Starlette's 1 MB spooling threshold: it must not be written to a temporary file."""

    def refuse_disk(self):
        raise AssertionError("upload spooled to disk")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", refuse_disk)
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 255, (1000, 1000, 3), dtype=np.uint8))
    data = png_bytes(noisy)
    assert len(data) > 2 * 1024 * 1024

    response = client.post("/api/predict", files={"file": ("noise.png", data, "image/png")})

    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("filename", "make_data", "status", "message"),
    [
        ("notes.txt", lambda photo: b"these are not pixels", 415, "not an image"),
        ("empty.jpg", lambda photo: b"", 422, "empty"),
        ("cut.jpg", lambda photo: photo.read_bytes()[: len(photo.read_bytes()) // 2], 422, "truncated"),
        ("bomb.png", lambda photo: png_declaring(8000, 6000), 422, "decompression bomb"),  # 48 MP, PIL alone only warns
        ("huge.png", lambda photo: png_declaring(100_000, 100_000), 422, "decompression bomb"),
    ],
)
def test_bad_image_is_refused_with_a_json_error(client, photo, filename, make_data, status, message):
    response = client.post("/api/predict", files={"file": (filename, make_data(photo), "image/jpeg")})

    assert response.status_code == status
    assert message in response.json()["error"] and filename in response.json()["error"]
    assert_still_serving(client, photo)


@pytest.mark.parametrize(("method", "path", "status"), [("get", "/api/nothing", 404), ("get", "/api/predict", 405)])
def test_routing_errors_are_json_errors_too(client, method, path, status):
    answer = getattr(client, method)(path)
    assert answer.status_code == status and set(answer.json()) == {"error"}


def test_upload_over_the_limit_is_413(client, photo):
    response = client.post("/api/predict", files={"file": ("big.jpg", b"\0" * (MAX_UPLOAD_BYTES + 1), "image/jpeg")})

    assert response.status_code == 413
    assert "limit" in response.json()["error"]
    assert_still_serving(client, photo)


def test_chunked_upload_without_length_is_cut_at_the_limit(client, photo):
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'.encode()

    def body():
        yield head
        for _ in range(MAX_UPLOAD_BYTES // 65536 + 2):
            yield b"\0" * 65536

    response = client.post(
        "/api/predict", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )

    assert response.status_code == 413
    assert_still_serving(client, photo)


def test_too_many_batch_files_is_422(client, photo):
    data = photo.read_bytes()
    response = client.post("/api/predict/batch", files=[("files", (f"{i}.jpg", data, "image/jpeg")) for i in range(33)])

    assert response.status_code == 422
    assert "32" in response.json()["error"]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [
        ({"files": {"photo": ("a.jpg", b"x", "image/jpeg")}}, 422, "field 'file'"),
        ({"data": {"file": "not a file"}}, 415, "multipart"),
        ({"content": b"raw bytes", "headers": {"content-type": "image/jpeg"}}, 415, "multipart"),
    ],
)
def test_missing_file_field(client, photo, request_kwargs, status, message):
    response = client.post("/api/predict", **request_kwargs)

    assert response.status_code == status
    assert message in response.json()["error"]


def test_bad_query_is_a_json_422(client, photo):
    response = client.post("/api/predict?top=0", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})

    assert response.status_code == 422
    assert "top" in response.json()["error"]


# --------------------------------------------------------------------------- micro-batching


class GatedClassifier:
    """Stands in for a model: records batch sizes and holds its first batch until released."""

    labels = ["a", "b"]

    def __init__(self):
        self.batch_sizes: list[int] = []
        self.busy = threading.Event()
        self.release = threading.Event()

    def predict_scores(self, images: np.ndarray) -> tuple[np.ndarray, None]:
        self.batch_sizes.append(len(images))
        self.busy.set()
        assert self.release.wait(10)
        return np.tile([0.25, 0.75], (len(images), 1)), None


def test_requests_waiting_for_the_model_are_classified_together():
    model = GatedClassifier()
    inference = InferenceQueue(model, max_batch_images=32)
    try:
        first = inference.submit(np.zeros((1, 64, 64, 3), np.uint8))
        assert model.busy.wait(10)
        waiting = [inference.submit(np.zeros((n, 64, 64, 3), np.uint8)) for n in (1, 2, 3)]
        model.release.set()
        wait([first, *waiting], timeout=10)
    finally:
        inference.close()

    assert model.batch_sizes == [1, 6]
    assert [len(future.result()[0]) for future in waiting] == [1, 2, 3]


# --------------------------------------------------------------------------- CLI


def test_predict_image_prints_a_table_and_json(trained_run, classifier, demo_data, capsys):
    photos = [str(p) for p in sorted((demo_data / "test").glob("*.jpg"))[:2]]

    assert main(["predict-image", *photos, "--run", str(trained_run), "--top", "2"]) == 0
    table = capsys.readouterr().out
    assert main(["predict-image", *photos, "--run", str(trained_run), "--top", "2", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)

    assert [a["path"] for a in answers] == photos
    for answer, path in zip(answers, photos):
        expected = classifier(path, top_k=2)
        assert [e["label"] for e in answer["top"]] == [e["label"] for e in expected]
        assert path in table and f"1. {expected[0]['label']}" in table and f"{expected[0]['score']:.1%}" in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--run", "RUN", "not-there.jpg"], "not-there.jpg"),
        (["--run", "RUN", "BAD"], "not a readable image"),
        (["--run", "RUN", "--top", "0", "PHOTO"], "--top"),
        (["PHOTO"], "--run"),
    ],
)
def test_predict_image_bad_input_is_one_line_and_exit_2(trained_run, demo_data, tmp_path, capsys, extra, message):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"GIF89a broken")
    photo = sorted((demo_data / "test").glob("*.jpg"))[0]
    argv = [{"RUN": str(trained_run), "BAD": str(bad), "PHOTO": str(photo)}.get(a, a) for a in extra]

    assert main(["predict-image", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err


def test_serve_on_a_busy_port_is_one_line_and_exit_2(trained_run, capsys):
    busy = bind("127.0.0.1", 0)
    try:
        assert main(["serve", "--run", str(trained_run), "--port", str(busy.getsockname()[1])]) == 2
    finally:
        busy.close()
    assert "cannot listen" in capsys.readouterr().err


def test_stats_and_server_timing_say_where_a_request_went(classifier, demo_data):
    """Each answer carries a Server-Timing header (upload, decode, model, answer); /api/stats sums them and
    reports the micro-batch sizes the model was called with."""
    photo = next((demo_data / "test").iterdir()).read_bytes()
    with TestClient(create_app(classifier)) as client:
        for _ in range(3):
            response = client.post("/api/predict", files={"file": ("bird.jpg", photo, "image/jpeg")})
            assert response.status_code == 200
            stages = dict(item.split(";dur=") for item in response.headers["server-timing"].split(", "))
            assert set(stages) == {"upload", "decode", "model", "answer"} and all(
                float(ms) >= 0 for ms in stages.values()
            )
        stats = client.get("/api/stats").json()
    assert (
        stats["requests"] == 3 and stats["images"] == 3 and stats["model_calls"] == sum(stats["batch_sizes"].values())
    )
    assert set(stats["mean_ms"]) == {"upload", "decode", "model", "answer"}


def foreign_onnx(path: Path, wrong: str) -> Path:
    """A small ONNX graph with a 'labels' key that is not one of ours: it takes float vectors ('input'), or it takes
    uint8 images and answers 3 numbers per image for its 2 labels ('output')."""
    import onnx
    from onnx import TensorProto, helper

    if wrong == "input":
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])]
        nodes, initializers = [helper.make_node("Identity", ["x"], ["y"])], []
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])]
    else:
        inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 64, 64, 3])]
        nodes = [
            helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f", "axes"], ["y"], keepdims=0),
        ]
        initializers = [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
    graph = helper.make_graph(nodes, "foreign", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    helper.set_model_props(model, {"labels": json.dumps(["a", "b"]), "layout": "nhwc"})
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("wrong", ["input", "output"])
@pytest.mark.parametrize("command", ["serve", "predict-image", "predict"])
def test_a_foreign_onnx_model_with_labels_is_refused_at_load(command, wrong, demo_data, tmp_path, capsys, monkeypatch):
    import uvicorn

    # were it accepted, return instead of serving
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    model = foreign_onnx(tmp_path / "foreign.onnx", wrong)
    photo = sorted((demo_data / "test").glob("*.jpg"))[0]
    argv = {
        "serve": ["serve", "--onnx", str(model), "--port", "0"],
        "predict-image": ["predict-image", str(photo), "--onnx", str(model)],
        "predict": ["predict", "--onnx", str(model), "--data", str(demo_data), "--out", str(tmp_path / "s.csv")],
    }[command]

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and err.startswith("error: ")
        and "foreign.onnx" in err
        and "not a lowres-birds model" in err
    )
    assert not (tmp_path / "s.csv").exists()


# --------------------------------------------------------------------------- limits of a live server (raw sockets on
# loopback)


def poll(condition, what: str, timeout_s: float = 10.0) -> None:
    """Check ``condition`` until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@contextmanager
def live_server(classifier, **limits):
    """The app served by `serve`'s uvicorn server in a thread on a free loopback port: (app, port)."""
    app = create_app(classifier, **limits)
    listener = bind("127.0.0.1", 0)
    server = http_server(app, limits.get("client_timeout_s", DEFAULT_CLIENT_TIMEOUT_S), log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        poll(lambda: server.started, "the server did not start")
        yield app, listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
    assert not thread.is_alive(), "the server did not stop"


BOUNDARY = "b0undary"


def start_upload(port: int, declared: int, sent: int = 200) -> socket.socket:
    """A multipart upload that declares ``declared`` bytes and sends only the first ``sent``."""
    part = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.jpg"\r\n\r\n'.encode()
    head = (
        f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + part + b"\0" * (sent - len(part)))
    return sock


def read_until_closed(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after ``timeout_s``."""
    received, deadline = b"", time.monotonic() + timeout_s
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection open for {timeout_s:g} s (received {received[:80]!r})"
            ) from None
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def test_a_client_that_stalls_mid_upload_gets_408_and_is_dropped(classifier):
    with live_server(classifier, client_timeout_s=0.5) as (app, port):
        with start_upload(port, declared=100_000) as stalled:
            answer = read_until_closed(stalled)
        assert answer.startswith(b"HTTP/1.1 408") and b"no data for 0.5 s" in answer
        poll(lambda: app.state.uploads.used == 0, "the stalled upload still holds its bytes")


def test_idle_and_half_sent_connections_are_closed(classifier):
    with live_server(classifier, client_timeout_s=0.5) as (_, port):
        with (
            socket.create_connection(("127.0.0.1", port)) as idle,
            socket.create_connection(("127.0.0.1", port)) as half,
            socket.create_connection(("127.0.0.1", port)) as kept_alive,
        ):
            half.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the headers never end
            kept_alive.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_until_closed(idle) == b""
            assert read_until_closed(half) == b""
            assert read_until_closed(kept_alive).startswith(b"HTTP/1.1 200")  # answered, then closed once idle


def test_uploads_in_flight_are_bounded_across_clients(classifier, photo):
    megabyte = 2**20
    with live_server(
        classifier, max_upload_bytes=megabyte, max_inflight_bytes=megabyte * 5 // 2, client_timeout_s=30
    ) as (app, port):
        url = f"http://127.0.0.1:{port}/api/predict"
        stalled = [start_upload(port, declared=megabyte) for _ in range(2)]
        try:
            poll(lambda: app.state.uploads.used == 2 * megabyte, "the two stalled uploads are not counted")
            with start_upload(port, declared=megabyte) as third:
                answer = read_until_closed(third)
            assert answer.startswith(b"HTTP/1.1 503") and b"too many uploads at once" in answer
            small = httpx.post(url, files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=30)
            assert small.status_code == 200, small.text  # what is left of the budget still serves
        finally:
            for sock in stalled:
                sock.close()
        poll(lambda: app.state.uploads.used == 0, "the closed uploads still hold their bytes")
        assert (
            httpx.post(url, files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=30).status_code
            == 200
        )
