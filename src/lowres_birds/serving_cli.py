"""Commands ``predict-image`` (photos -> top species) and ``serve`` (web page + JSON API).

Kept apart from serving.py so that building the CLI parser never imports FastAPI. Both commands go through
``Classifier``, the same preprocessing as the Python API.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

from lowres_birds.errors import UserError

DEFAULT_MAX_UPLOAD_MB = 10.0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, help="trained run folder")
    parser.add_argument("--onnx", type=Path, help="exported ONNX model (instead of --run)")


def _load_classifier(args):
    from lowres_birds.inference import Classifier

    if (args.run is None) == (args.onnx is None):
        raise UserError(f"{args.command}: pass exactly one of --run RUN or --onnx MODEL")
    return Classifier.load(args.run or args.onnx)


# --------------------------------------------------------------------------- predict-image


def add_predict_image(sub) -> None:
    parser = sub.add_parser("predict-image", help="top species for one or more photos", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="photos of any size (reduced to 64x64 as in training)")
    _add_model_options(parser)
    parser.add_argument("--top", type=int, default=5, help="how many species to list per photo")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_predict_image(args) -> int:
    import numpy as np

    from lowres_birds.inference import to_model_input

    if args.top < 1:
        raise UserError(f"predict-image: --top must be at least 1, got {args.top}")
    classifier = _load_classifier(args)
    images = np.stack([to_model_input(path) for path in args.paths])  # every file is checked before any output
    tops = [classifier.top_k(row, args.top) for row in classifier.predict_arrays(images)]
    if args.json:
        answers = [{"path": str(path), "top": [{"label": label, "probability": p} for label, p in top]} for path, top in zip(args.paths, tops)]
        print(json.dumps(answers, indent=2))
        return 0
    width = max(len(label) for top in tops for label, _ in top)
    for path, top in zip(args.paths, tops):
        print(path)
        for rank, (label, probability) in enumerate(top, 1):
            print(f"  {rank:>2}. {label:<{width}}  {probability:6.1%}")
    return 0


# --------------------------------------------------------------------------- serve


def add_serve(sub) -> None:
    parser = sub.add_parser("serve", help="web page and JSON API for a trained model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network; there is no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest request body accepted (one photo, or a whole batch)")


def run_serve(args) -> int:
    import uvicorn

    from lowres_birds.serving import create_app

    if args.max_upload_mb <= 0:
        raise UserError(f"serve: --max-upload-mb must be positive, got {args.max_upload_mb}")
    listener = bind(args.host, args.port)
    app = create_app(_load_classifier(args), max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    host, port = listener.getsockname()[:2]
    print(f"serving {args.run or args.onnx} on http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[listener])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a busy port or bad address is one clear line, not a traceback."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as exc:
        raise UserError(f"serve: cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port or --host") from None
    listener.listen(2048)
    return listener
