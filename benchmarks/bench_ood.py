"""What the input gate and the calibration cost per image, as a share of the model's forward pass.

Times, on real training images decoded with the default aug_cnn input spec (128x128 grayscale,
pneumo's CLAHE) in batches as the server makes them (64 images):
  - the forward pass of the default aug_cnn architecture (:func:`pneumo.model_io.predict_probabilities`;
    weights do not change the cost, so they are untrained; at the precision training would pick,
    ``precision=auto``), and
  - the gate's judgement of the same batch plus the calibration of the scores
    (:func:`pneumo.serving.answer_frame`: everything the server adds after the forward pass),
each the median of ``--repeats`` runs, and prints the ratio (issue 16 asks for under 10%).

    python benchmarks/bench_ood.py [--images 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from pneumo import model_io, models  # noqa: E402
from pneumo.calibration import Calibration  # noqa: E402
from pneumo.config import DataConfig  # noqa: E402
from pneumo.contract import Figures, ModelContract  # noqa: E402
from pneumo.ood import fit_gate  # noqa: E402
from pneumo.preprocessing import decode_image  # noqa: E402
from pneumo.serving import answer_frame  # noqa: E402
from pneumo.training import set_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = 64


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    spec = DataConfig().input_spec
    root = Path(args.data_dir) / "train"
    files = [path for name in ("NORMAL", "PNEUMONIA") for path in sorted((root / name).iterdir())[: args.images // 2]]
    images = np.stack([decode_image(path.read_bytes(), spec) for path in files])
    contract = ModelContract(
        entry_point="aug_cnn",
        input_spec=spec,
        threshold=0.5,
        threshold_rule="benchmark",
        hyperparameters={},
        validation=Figures("benchmark", {}),
        input_gate=fit_gate(images[::2], images[1::2]),
        calibration=Calibration(0.5, -0.5, "benchmark", 0, 0.0, 0.0),
    )
    policy = set_precision("auto")
    model = models.build_aug_cnn(spec.image_size, spec.channels)
    batches = [images[i : i + BATCH] for i in range(0, len(images), BATCH)]
    scores = np.full(BATCH, 0.5)
    model_io.predict_probabilities(model, batches[0])  # the first call builds the graph
    forward = median_seconds(lambda: [model_io.predict_probabilities(model, batch) for batch in batches], args.repeats)
    gated = median_seconds(
        lambda: [answer_frame(contract, batch, scores[: len(batch)]) for batch in batches], args.repeats
    )
    per_image = 1000 / len(images)
    print(f"{len(images)} images, batches of {BATCH}, median of {args.repeats}, model precision {policy}")
    print(f"forward pass:            {forward * per_image:.3f} ms per image")
    print(f"gate + calibration:      {gated * per_image:.3f} ms per image")
    print(f"ratio gate / forward:    {gated / forward:.3f}")


if __name__ == "__main__":
    main()
