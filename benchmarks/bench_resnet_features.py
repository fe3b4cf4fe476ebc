"""How much the resnet entry point saves by computing the frozen base's features once.

Times, on real training images at the resnet defaults (160x160 RGB, batch 32):
  - one epoch of the stacked model (frozen ResNet50 run every step, head trained), and
  - one feature extraction pass plus one epoch of the head on the cached features,
then reports the time ratio for the default number of epochs. Weights do not change the cost, so
random weights are used (no download needed).

    python benchmarks/bench_resnet_features.py [--images 512] [--epochs 15]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from pneumo import data as data_lib  # noqa: E402
from pneumo import models, pipeline  # noqa: E402
from pneumo.config import ResNetConfig, TrainConfig  # noqa: E402
from pneumo.preprocessing import InputSpec  # noqa: E402
from pneumo.resnet import extract_features  # noqa: E402
from pneumo.training import compile_model, make_optimizer, set_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--image_size", type=int, default=160)
    args = parser.parse_args()
    policy = set_precision("auto")
    data_dir = data_lib.resolve_data_dir(args.data_dir)
    files = (
        sorted((data_dir / "train" / "NORMAL").iterdir())[: args.images // 2]
        + sorted((data_dir / "train" / "PNEUMONIA").iterdir())[: args.images // 2]
    )
    frame = (
        data_lib.discover(data_dir)
        .images.set_index("path")
        .loc[[f.relative_to(data_dir).as_posix() for f in files]]
        .reset_index()
    )
    images = pipeline.load_split(frame, data_dir, InputSpec(args.image_size, 3))
    train = TrainConfig(batch_size=32, epochs=1, cosine_decay=False)

    base = models.build_resnet_base(args.image_size, 3, "none")
    features = extract_features(base, images)  # warm-up (graph tracing)
    head = models.build_resnet_head(features.images.shape[1:], ResNetConfig())
    stacked = compile_model(models.stack_resnet(base, head), make_optimizer(train, 1))
    compile_model(head, make_optimizer(train, 1))
    head_ds, _ = pipeline.train_dataset(features, 32, 2, 0, True)
    full_ds, _ = pipeline.train_dataset(images, 32, 2, 0, True)
    head.fit(head_ds.take(2), verbose=0)
    stacked.fit(full_ds.take(2), verbose=0)

    extract_seconds = timed(lambda: extract_features(base, images))
    head_ds, steps = pipeline.train_dataset(features, 32, 1, 1, True)
    head_epoch = timed(lambda: head.fit(head_ds, verbose=0))
    full_ds, _ = pipeline.train_dataset(images, 32, 1, 1, True)
    full_epoch = timed(lambda: stacked.fit(full_ds, verbose=0))

    per_image = steps * 32
    cached_total = extract_seconds + args.epochs * head_epoch
    frozen_total = args.epochs * full_epoch
    print(
        f"machine: {os.cpu_count()} cores; policy {policy}; {len(images.labels)} images at "
        f"{args.image_size}px; {per_image} balanced samples per epoch"
    )
    print(f"feature extraction (once)         {extract_seconds:8.2f} s")
    print(f"head epoch on cached features     {head_epoch:8.2f} s")
    print(f"epoch through the frozen base     {full_epoch:8.2f} s")
    print(
        f"{args.epochs} epochs: base every epoch {frozen_total:8.1f} s, cached features {cached_total:8.1f} s, "
        f"ratio {frozen_total / cached_total:5.1f}x"
    )


if __name__ == "__main__":
    main()
