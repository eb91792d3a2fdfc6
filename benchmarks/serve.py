"""textrefiner-serve under load: 32 clients sending one image each against `Predictor` on batches
of 32, side by side on the same machine.

    python benchmarks/serve.py --quick     # a smaller CLIP (96 px), a minute or two
    python benchmarks/serve.py             # ViT-B/16 shape (224 px)

A random-weight CLIP of the given shape, CoOp + TextRefiner on 100 classes saved as a run (as
benchmarks/predict.py), and PNG images of the CLIP's input size. Each round times, alternating
(the order reversed every other round), in wall-clock seconds:

* `Predictor`: `Predictor.from_run(run)(paths)` on batches of --clients images (reading, decoding
  and preprocessing the files included, as textrefiner-predict does);
* the server: `textrefiner-serve --model-dir RUN` in a process of its own, and --clients threads
  here, each with a kept-alive connection, each sending --requests requests of one image (the
  PNG's bytes, multipart) one after another; a request's latency is from sending to the answer.

Images per second of each, the median of the per-round ratios (server / Predictor), and the p50
and p99 latency of all the server's requests; results in benchmarks/results_serve[_quick].json.
Wall time on a shared machine: the alternation and the per-round ratio keep the load of others
out of the comparison, not out of the absolute numbers.
"""
import argparse
import http.client
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import ROOT, SHAPES, save_results  # noqa: E402  (the checkout on sys.path)

from textrefiner.data.synthetic import write_image_folder  # noqa: E402
from textrefiner.predict import Predictor  # noqa: E402
from textrefiner.serve.client import multipart, request, wait_until_healthy  # noqa: E402

from predict import saved_run  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small CLIP shape")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients = batch size")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per client per round (default 4; quick 8)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; quick 5)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--window-ms", type=float, default=5.0, help="the server's --batch-window-ms")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--port", type=int, default=8719)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.shape = "small" if args.quick else "vit_b16"
    args.requests = args.requests or (8 if args.quick else 4)
    args.rounds = args.rounds or (5 if args.quick else 3)
    name = "results_serve_quick.json" if args.quick else "results_serve.json"
    args.json = args.json or os.path.join(ROOT, "benchmarks", name)
    return args


def start_server(args, run):
    server = subprocess.Popen(
        [sys.executable, "-m", "textrefiner.serve", "--model-dir", run, "--port", str(args.port),
         "--device", args.device, "--batch-size", str(args.clients), "--batch-window-ms",
         str(args.window_ms), "--max-queue", str(4 * args.clients), "--quiet"],
        stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_until_healthy(url, 600, server)
    except RuntimeError as exc:
        server.kill()
        raise SystemExit(f"{exc}: {server.stderr.read()[-2000:]}")
    return server


def client_round(args, images):
    """(seconds, [latency per request]) of --clients threads sending --requests requests each."""
    latencies, failures = [], []
    lock = threading.Lock()
    barrier = threading.Barrier(args.clients + 1)

    def client(index):
        connection = http.client.HTTPConnection("127.0.0.1", args.port, timeout=600)
        mine = []
        try:
            barrier.wait()
            for r in range(args.requests):
                body, kind = images[(index * args.requests + r) % len(images)]
                start = time.perf_counter()
                connection.request("POST", "/predict", body, {"Content-Type": kind})
                response = connection.getresponse()
                response.read()
                mine.append(time.perf_counter() - start)
                if response.status != 200:
                    failures.append(response.status)
        finally:
            connection.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: statuses {sorted(set(failures))}")
    return seconds, latencies


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main(argv=None):
    args = parse_args(argv)
    shape = SHAPES[args.shape]
    device = torch.device(args.device)
    results = {"shape": args.shape, "clients": args.clients, "requests": args.requests,
               "rounds": args.rounds, "classes": args.classes, "window_ms": args.window_ms,
               "device": str(device), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    with tempfile.TemporaryDirectory() as folder:
        run = saved_run(os.path.join(folder, "run"), shape, args.classes)
        size = shape["image_resolution"]
        per_round = args.clients * args.requests
        classes = [f"{c} {s}" for c in ("red", "green", "blue", "yellow")
                   for s in ("circle", "square", "triangle", "cross")]
        pictures = write_image_folder(os.path.join(folder, "images"), classes,
                                      -(-per_round // len(classes)), size, 0)
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(pictures) for f in files)
        paths = paths[:per_round]
        bodies = [multipart([(os.path.basename(p), open(p, "rb").read())]) for p in paths]
        batches = [paths[i:i + args.clients] for i in range(0, len(paths), args.clients)]

        predictor = Predictor.from_run(run, device=device, batch_size=args.clients)
        server = start_server(args, run)
        try:
            def predictor_pass():
                start = time.perf_counter()
                for batch in batches:
                    predictor(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return time.perf_counter() - start

            predictor_pass()
            client_round(args, bodies)  # warm-up: the server's first batches
            seconds = {"predictor": [], "server": []}
            latencies = []
            for r in range(args.rounds):
                for name in (("predictor", "server") if r % 2 == 0 else ("server", "predictor")):
                    if name == "predictor":
                        seconds[name].append(predictor_pass())
                    else:
                        took, lat = client_round(args, bodies)
                        seconds[name].append(took)
                        latencies += lat
            health = request(f"http://127.0.0.1:{args.port}/health")[1]
            results["mean_server_batch"] = health["images"] / max(1, health["batches"])
        finally:
            server.terminate()
            results["server_exit"] = server.wait(120)
    ratio = statistics.median(p / s for p, s in zip(seconds["predictor"], seconds["server"]))
    results.update({
        "predictor_images_per_s": per_round / statistics.median(seconds["predictor"]),
        "server_images_per_s": per_round / statistics.median(seconds["server"]),
        "server_over_predictor": ratio,
        "latency_p50_ms": 1000 * percentile(latencies, 50),
        "latency_p99_ms": 1000 * percentile(latencies, 99),
        "seconds": seconds})
    print(f"{args.shape}, {args.clients} clients x {args.requests} requests of 1 image, "
          f"{args.rounds} rounds, {device}")
    print(f"{'Predictor, batches of ' + str(args.clients):34s}"
          f"{results['predictor_images_per_s']:8.1f} images/s")
    print(f"{'textrefiner-serve, ' + str(args.clients) + ' clients':34s}"
          f"{results['server_images_per_s']:8.1f} images/s   {ratio:.3f}x Predictor's "
          f"(target >= 0.8)")
    print(f"latency p50 {results['latency_p50_ms']:.0f} ms, p99 "
          f"{results['latency_p99_ms']:.0f} ms; mean batch {results['mean_server_batch']:.1f} "
          f"images; server exit status {results['server_exit']}")
    save_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
