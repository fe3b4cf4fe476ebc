"""Load on a real ``mlflow models serve`` process: N concurrent clients posting real X-rays for S seconds.

Reports, per client count: requests (= images) per second, p50 and p95 latency next to the bare
in-process decode + forward time for one image, errors, and the server's RSS (all its processes)
before and after.

With ``--heavy`` it measures instead what one heavy request costs the others (issue 18 §3): for
30 MB of empty rows, 64 rows of 25-Mpx 16-bit PNG (refused), and 8 such rows of a real X-ray (at
the pixel budget, decoded), how long the answer took, how long /ping and a one-image request
took while it was in flight, and the server's RSS before and after.

Without ``--model-uri`` it serves the main job's network (default ``aug_cnn``: 128 px grayscale,
untrained weights: serving cost does not depend on the weights), logged through
``pneumo.model_io.log_model`` into a temporary tracking store, exactly as training logs models.

    python benchmarks/bench_serve.py [--clients 1 8] [--seconds 60] [--workers 1] [--model-uri URI]
                                     [--env PNEUMO_SERVE_THREADS=2] [--data_dir ../shared/data/chest_xray]
    python benchmarks/bench_serve.py --heavy
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


def png16(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint16)).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def heavy_bodies(xray: Path) -> dict[str, bytes]:
    """The heavy requests of issue 18 §3, as JSON bodies."""
    from PIL import Image

    def split(cells: list[bytes]) -> bytes:
        rows = [[base64.b64encode(cell).decode()] for cell in cells]
        return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()

    side = 5000  # 25 M pixels, the per-image budget
    ramp = np.add.outer(np.arange(side), np.arange(side)) * 6  # smooth: ~300 kB as a 16-bit PNG, as in the issue
    gray = Image.open(xray).convert("L").resize((side, side), Image.Resampling.BILINEAR)
    return {
        "30 MB of empty rows": b'{"dataframe_records": [' + b"{}, " * 7_500_000 + b"{}]}",
        "64 x 25-Mpx 16-bit PNG": split([png16(ramp)] * 64),
        "8 x 25-Mpx 16-bit PNG (real X-ray, at the budget)": split(
            [png16(np.asarray(gray).astype(np.uint16) * 257)] * 8
        ),
    }


def in_flight(url: str, process: subprocess.Popen, body: bytes, small: str) -> dict:
    """Post ``body``; while it is in flight, alternately time /ping and a one-image request, and sample RSS."""
    answer: dict = {}

    def post() -> None:
        start = time.perf_counter()
        response = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        answer.update(seconds=time.perf_counter() - start, status=response.status_code)
        answer.update(message=response.json().get("message", "")[:120] if response.status_code != 200 else "")

    def timed(call) -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1000

    rss_before = peak = server_rss_mb(process)
    thread = threading.Thread(target=post)
    thread.start()
    pings, smalls = [], []
    headers = {"Content-Type": "application/json"}
    while thread.is_alive():
        pings.append(timed(lambda: requests.get(f"{url}/ping", timeout=600)))
        if thread.is_alive():
            smalls.append(timed(lambda: requests.post(f"{url}/invocations", data=small, headers=headers)))
        peak = max(peak, server_rss_mb(process))
    thread.join()

    def stats(values: list[float]) -> dict:
        if not values:
            return {"n": 0}
        return {"n": len(values), "p50_ms": round(float(np.median(values)), 1), "max_ms": round(max(values), 1)}

    return {
        "body_mb": round(len(body) / 1e6, 1),
        "status": answer["status"],
        "answer_s": round(answer["seconds"], 2),
        "message": answer["message"],
        "ping_in_flight": stats(pings),
        "one_image_in_flight": stats(smalls),
        "rss_peak_growth_mb": round(peak - rss_before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model-uri", default="")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server's environment")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--heavy", action="store_true", help="measure heavy requests instead of load")
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
        if args.heavy:
            process, url = start_server(model_uri, env, args.workers, Path(folder) / "serve.log")
            try:
                load(url, bodies, 1, 3)  # warm-up
                results = {
                    name: in_flight(url, process, body, bodies[0]) for name, body in heavy_bodies(files[0]).items()
                }
            finally:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
            print(json.dumps(results, indent=1))
            return
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
