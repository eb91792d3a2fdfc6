"""`textrefiner-serve`: a trained run (or an exported ONNX model) as a local web page and HTTP API.

    textrefiner-serve --model-dir output/run                 # http://127.0.0.1:8000/
    textrefiner-serve --onnx model.onnx --port 8080          # + model.json (textrefiner-export)
    curl -F images=@cat.jpg -F classnames="cat,dog" http://127.0.0.1:8000/predict

The API's probabilities are `textrefiner-predict`'s for the same images and names: the same model,
preprocessing and precision. Concurrent requests are batched on one model worker; class lists
other than the run's get their (refined) classifier built once and kept (LRU). Another address
than the loopback (--host) is served only with a random token, printed at start, that every
request must carry. Needs the `serve` extra: pip install "textrefiner[serve]". See docs/serve.md.
"""
import argparse
import contextlib
import signal
import sys

from ..errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
INSTALL = "pip install \"textrefiner[serve]\""


def require_serve():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        try:  # python-multipart (FastAPI's form parsing); its module's name before 0.0.13
            import python_multipart  # noqa: F401
        except ImportError:
            import multipart  # noqa: F401
    except ImportError:
        raise UserError(f"textrefiner-serve needs FastAPI, uvicorn and python-multipart: {INSTALL}"
                        ".") from None


def explain_picture_function():
    """The per-image picture of textrefiner-explain for `POST /explain`: a function
    `picture(backend, classnames, image) -> bytes` (PNG; `explain_image_figure`), run on the
    model worker, which runs one thing at a time as the picture's refiner-off pass needs.

    `backend` is a `TorchBackend` (`backend.predictor(classnames)` is a `Predictor` over the model
    that names `classnames`), `classnames` the request's class list (a tuple of str), `image` the
    upload as an RGB PIL image."""
    from ..explain import explain_image_figure

    def picture(backend, classnames, image) -> bytes:
        return explain_image_figure(backend.predictor(classnames), image).png

    return picture


def build_parser() -> argparse.ArgumentParser:
    from ..predict import add_run_args

    parser = argparse.ArgumentParser(
        prog="textrefiner-serve",
        description="Serve a trained run (or an ONNX export) as a web page and a JSON API: "
                    "images and class names in, probabilities out.")
    add_run_args(parser)
    parser.add_argument("--onnx", default="", metavar="MODEL.ONNX",
                        help="serve an exported model (with its JSON sidecar) instead of a run")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs the "
                             "token printed at start)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--device", default="", help="cpu, cuda, cuda:1 ... (default: the GPU "
                                                     "when there is one)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="most images run together (default 32)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="how long the worker waits for more requests to batch (default 5)")
    parser.add_argument("--max-queue", type=int, default=512,
                        help="images waiting at most; beyond, 503 (default 512)")
    parser.add_argument("--class-cache", type=int, default=16,
                        help="class lists whose classifiers are kept (default 16)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0,
                        help="largest request body in MiB (default 20)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000,
                        help="largest image in pixels, checked before decoding (default 40M)")
    parser.add_argument("--max-images", type=int, default=64, help="images per request (64)")
    parser.add_argument("--max-classes", type=int, default=1000,
                        help="class names per request (default 1000)")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return parser


def build_backend(args, log):
    import torch

    from ..predict import open_run, pick_device
    from .backend import OnnxBackend, TorchBackend

    if args.onnx:
        if args.model_dir:
            raise UserError("Give either --model-dir (a run) or --onnx (an export), not both.")
        return OnnxBackend(args.onnx)
    device = pick_device(args.device or None)
    run = open_run(args)
    if not isinstance(device, torch.device):
        device = torch.device(device)
    return TorchBackend(run, device, args.class_cache, log=log)


def serve(args, log) -> int:
    require_serve()
    import uvicorn

    from .app import Limits, build_app, new_token

    for flag in ("batch_size", "max_queue", "class_cache", "max_images", "max_classes",
                 "max_pixels"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1.")
    if args.max_upload_mb <= 0 or args.batch_window_ms < 0:
        raise UserError("--max-upload-mb must be positive and --batch-window-ms not negative.")
    backend = build_backend(args, log)
    token = None if args.host in LOOPBACK else new_token()
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2 ** 20),
                    max_pixels=args.max_pixels, max_images=args.max_images,
                    max_classes=args.max_classes)
    app = build_app(backend, limits, token, args.batch_size, args.batch_window_ms / 1000,
                    args.max_queue, explain=explain_picture_function(),
                    log=None if args.quiet else log)
    info = backend.info()
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/"
    log(f"textrefiner-serve: {info['method']}{' + TextRefiner' if info['textrefiner'] else ''} "
        f"({info['backend']}, {len(info['classes'])} classes, {info['device']}) at {where} "
        f"(API: {where}docs)")
    if token:
        log(f"textrefiner-serve: token {token}: requests must carry it (Authorization: Bearer "
            f"{token}); the page: {where}?token={token}")
    words = backend.unknown_words(tuple(backend.classnames))
    if words:
        from ..clip_backbone import unknown_words_message
        log(f"textrefiner-serve: note: {unknown_words_message(words)}")
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level="warning" if args.quiet else "info",
                            access_log=not args.quiet, timeout_graceful_shutdown=30,
                            lifespan="on")
    server = _draining_server()(config)
    with contextlib.suppress(SystemExit):  # uvicorn exits 1 where it cannot listen
        server.run()
    if not server.started:
        raise UserError(f"Could not listen on {args.host}:{args.port} (in use, or not an address "
                        "of this machine): choose another --port or --host.")
    log("textrefiner-serve: stopped (requests in flight were answered)")
    return 0


def _draining_server():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, which on SIGTERM or SIGINT stops accepting, answers what is in
        flight and returns; uvicorn would then raise the signal again (exit status 143), where
        a drained server exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    return DrainingServer


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def log(message):
        print(message, file=sys.stderr, flush=True)
    try:
        return serve(args, log)
    except UserError as exc:
        print(f"textrefiner-serve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
