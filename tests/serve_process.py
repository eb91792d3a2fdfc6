"""A textrefiner-serve process for the tests: started on a free port, healthy or failed within
a deadline, stopped with SIGTERM."""
import glob
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import HANG_TIMEOUT
from textrefiner.serve.client import wait_until_healthy

STARTUP_S = 180  # a deadline for a busy 2-core machine; a healthy server answers in seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m textrefiner.serve ARGS` on a free port, its stderr in a file."""

    def __init__(self, args, tmp_path, host="127.0.0.1", name="server"):
        self.port, self.host = free_port(), host
        self.url = f"http://{host}:{self.port}"
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "textrefiner.serve", *args, "--host", host,
             "--port", str(self.port), "--device", "cpu"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until_healthy(self.url, STARTUP_S, self.process)
        except RuntimeError as exc:
            self.stop()
            raise AssertionError(f"{exc}:\n{self.output()}") from None

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for_output(self, text: str, deadline_s: float = 60) -> str:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if text in self.output():
                return self.output()
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in the server's output:\n{self.output()}")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(HANG_TIMEOUT)
        if not self.log.closed:
            self.log.close()


def images_of(folder):
    return sorted(glob.glob(os.path.join(folder, "*", "*.png")))




class ThreadServer:
    """An application (`textrefiner.serve.app.build_app`'s) served by uvicorn on a thread of this
    process, on a free port: for what a command line cannot set up (a stand-in explainer)."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until_healthy(self.url, STARTUP_S)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(HANG_TIMEOUT)


def tiny_backend(run: str, class_cache: int = 16):
    """The TorchBackend textrefiner-serve builds for `run` on the CPU."""
    from textrefiner.serve import build_backend, build_parser

    args = build_parser().parse_args(["--model-dir", run, "--device", "cpu",
                                      "--class-cache", str(class_cache)])
    return build_backend(args, lambda message: None)
