"""Load on a real ``mlflow models serve`` process: N concurrent clients posting real X-rays for S seconds.

Reports, per client count: requests (= images) per second, p50 and p95 latency next to the bare
in-process decode + forward time for one image, errors, and the server's RSS (all its processes)
before and after.

Without ``--model-uri`` it serves the main job's network (default ``aug_cnn``: 128 px grayscale,
untrained weights: serving cost does not depend on the weights), logged through
``pneumo.model_io.log_model`` into a temporary tracking store, exactly as training logs models.

    python benchmarks/bench_serve.py [--clients 1 8] [--seconds 60] [--workers 1] [--model-uri URI]
                                     [--env PNEUMO_SERVE_THREADS=2] [--data_dir ../shared/data/chest_xray]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def log_default_model(folder: Path) -> tuple[str, str]:
    """Log an untrained default aug_cnn as a pneumo pyfunc; return (tracking URI, model URI)."""
    import mlflow

    from pneumo import model_io
    from pneumo.contract import Figures, ModelContract
    from pneumo.models import build_aug_cnn
    from pneumo.preprocessing import InputSpec

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-serve")
    contract = ModelContract(
        entry_point="aug_cnn",
        input_spec=InputSpec(128, 1, equalize="clahe"),
        threshold=0.5,
        threshold_rule="fixed at 0.5 (untrained benchmark model)",
        hyperparameters={},
        validation=Figures(on="none (untrained benchmark model)", metrics={}),
    )
    with mlflow.start_run() as run:
        model_io.log_model(build_aug_cnn(128, 1), contract)
    return uri, f"runs:/{run.info.run_id}/model"


def bare_latency_ms(model_uri: str, files: list[Path], repeats: int = 60) -> float:
    """Median in-process decode + forward time for one image, in ms."""
    from pneumo.model_io import load_trained_model, predict_probabilities
    from pneumo.preprocessing import decode_image

    trained = load_trained_model(model_uri)
    blobs = [f.read_bytes() for f in files]
    times = []
    for i in range(repeats + 5):
        start = time.perf_counter()
        image = decode_image(blobs[i % len(blobs)], trained.contract.input_spec)
        predict_probabilities(trained.model, image[None])
        if i >= 5:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def server_rss_mb(process: subprocess.Popen) -> float:
    root = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def start_server(model_uri: str, env: dict, workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not start")


def load(url: str, bodies: list[str], clients: int, seconds: float) -> dict:
    """``clients`` threads, each posting one image at a time for ``seconds``."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        session = requests.Session()
        i = index
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                response = session.post(
                    f"{url}/invocations", data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}
                )
                ok = response.status_code == 200
            except requests.RequestException:
                ok = False
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                latencies.append(elapsed) if ok else None
                errors[0] += 0 if ok else 1
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    return {
        "clients": clients,
        "requests": len(latencies),
        "images_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
        "errors": errors[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model-uri", default="")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server's environment")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument(
        "--data_dir", default=os.environ.get("PNEUMO_SHARED_DATA", str(REPO.parent / "shared" / "data" / "chest_xray"))
    )
    args = parser.parse_args()

    files = []
    for name in ("NORMAL", "PNEUMONIA"):
        found = sorted(p for p in (Path(args.data_dir) / "train" / name).iterdir() if not p.name.startswith("."))
        files += found[-args.images // 2 :]
    bodies = [
        json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(f.read_bytes()).decode()]]}})
        for f in files
    ]
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ)
        if args.model_uri:
            model_uri = args.model_uri
        else:
            env["MLFLOW_TRACKING_URI"], model_uri = log_default_model(Path(folder))
            os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        env.update(item.split("=", 1) for item in args.env)
        bare = bare_latency_ms(model_uri, files)
        process, url = start_server(model_uri, env, args.workers, Path(folder) / "serve.log")
        try:
            load(url, bodies, 1, 3)  # warm-up
            rss_before = server_rss_mb(process)
            results = [load(url, bodies, clients, args.seconds) for clients in args.clients]
            rss_after = server_rss_mb(process)
            threads_bound = "TensorFlow threads not bound" not in (Path(folder) / "serve.log").read_text(
                errors="replace"
            )
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    report = {
        "model_uri": args.model_uri or "default aug_cnn (128 px gray, untrained)",
        "workers": args.workers,
        "server_env": args.env,
        "seconds": args.seconds,
        "bare_decode_forward_ms": round(bare, 1),
        "tensorflow_threads_bound": threads_bound,
        "server_rss_mb_before": round(rss_before),
        "server_rss_mb_after": round(rss_after),
        "rss_growth_percent": round(100 * (rss_after - rss_before) / rss_before, 1),
        "results": results,
    }
    print(json.dumps(report, indent=1))
    print(f"\nbare decode + forward, one image: {bare:.1f} ms")
    print("clients  images/s   p50 ms   p95 ms   p50/bare  errors")
    for r in results:
        ratio = r["p50_ms"] / bare if r["p50_ms"] else float("nan")
        row = (r["clients"], r["images_per_s"], r["p50_ms"], r["p95_ms"], ratio, r["errors"])
        print("{:7d} {:9.1f} {:8.1f} {:8.1f} {:9.2f} {:7d}".format(*row))
    print(f"server RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after ({report['rss_growth_percent']:+.1f}%)")


if __name__ == "__main__":
    main()
