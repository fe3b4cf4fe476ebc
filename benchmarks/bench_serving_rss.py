"""Memory of `mlflow models serve --workers N`: the resident set (RSS) of each process.

Each uvicorn worker loads its own copy of TensorFlow and the model, so memory grows with N. Serves
a given model, or first trains a short default-architecture ``aug_cnn`` (128 px, 1 epoch on 20
images per class) in a throwaway store; sends every worker a few real images, then reads each
process's RSS with psutil.

    python benchmarks/bench_serving_rss.py [--workers 2] [--model_uri runs:/ID/model] [--data_dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_model(data_dir: str, env: dict[str, str]) -> str:
    """Train a 1-epoch aug_cnn at the default size in ``env``'s store; returns its model URI."""
    import mlflow

    args = ["--data_dir", data_dir, "--limit_per_class", "20", "--epochs", "1", "--cache_dir", ""]
    subprocess.run([sys.executable, "-m", "entrypoints.aug_cnn", *args], cwd=REPO, env=env, check=True)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1)
    return f"runs:/{run.info.run_id}/model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model_uri", default="")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    args = parser.parse_args()
    from pneumo.data import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
        if not args.model_uri:
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
            env["MLFLOW_EXPERIMENT_NAME"] = "bench-serving"
        model_uri = args.model_uri or train_model(str(data_dir), env)
        port = free_port()
        command = ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
        command += ["--port", str(port), "--workers", str(args.workers)]
        server = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            started = time.perf_counter()
            while True:
                try:
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.5)
            startup = time.perf_counter() - started
            image = sorted((data_dir / "train" / "PNEUMONIA").iterdir())[0]
            body = {"dataframe_records": [{"image": base64.b64encode(image.read_bytes()).decode()}]}
            for _ in range(4 * args.workers):  # reach every worker (connections are balanced by the OS)
                answer = requests.post(f"{url}/invocations", json=body, timeout=120)
                answer.raise_for_status()
            tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
            rss = {p.pid: p.memory_info().rss / 2**20 for p in tree}
            print(f"model {model_uri}; startup to first /ping {startup:.0f} s; answer {answer.json()}")
            for process in tree:
                print(f"  pid {process.pid:>7}  {rss[process.pid]:7.0f} MiB  {' '.join(process.cmdline())[:90]}")
            print(f"total RSS with --workers {args.workers}: {sum(rss.values()):.0f} MiB")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
