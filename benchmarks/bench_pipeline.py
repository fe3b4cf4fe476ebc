"""Input pipeline against bare model: is the tf.data + augmentation path the bottleneck?

Times, on the real training images at the default aug_cnn settings:
  1. the input pipeline alone (balanced index draw, gather, augmentation, prefetch);
  2. the model's train step alone, on batches already materialised in memory;
  3. both together, as training runs them.
Reports images per second and the ratios: pipeline/model throughput (above 1: the pipeline keeps up)
and together/model-alone time (the pipeline's overhead on training).

    python benchmarks/bench_pipeline.py [--steps 40] [--precision float32] [--data_dir ../shared/data/chest_xray]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from pneumo import data as data_lib  # noqa: E402
from pneumo import models, pipeline  # noqa: E402
from pneumo.augmentation import build_augmenter  # noqa: E402
from pneumo.config import AugmentConfig, CNNConfig, DataConfig, TrainConfig  # noqa: E402
from pneumo.training import compile_model, make_optimizer, set_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rate(images: int, seconds: float) -> float:
    return images / max(seconds, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="alternating model-alone and together timings")
    parser.add_argument("--cache_dir", default="outputs/cache")
    parser.add_argument("--precision", default="auto", help="auto, float32 or mixed_bfloat16")
    args = parser.parse_args()
    data, train = DataConfig(data_dir=args.data_dir, cache_dir=args.cache_dir), TrainConfig(precision=args.precision)
    policy = set_precision(train.precision)
    data_dir = data_lib.resolve_data_dir(data.data_dir)
    found = data_lib.discover(data_dir)
    manifest = data_lib.build_manifest(found.images, data.val_fraction, data.seed)
    train_set = pipeline.load_split(data_lib.split_frame(manifest, "train"), data_dir, data.input_spec, data.cache_dir)
    batch, steps = train.batch_size, args.steps
    dataset, _ = pipeline.train_dataset(
        train_set, batch, 2, data.seed, True, build_augmenter(AugmentConfig(), data.seed)
    )

    model = compile_model(models.build_aug_cnn(data.image_size, data.channels, CNNConfig()), make_optimizer(train, 100))
    warm = list(dataset.take(4))
    model.fit(tf.data.Dataset.from_tensor_slices(warm[0]).batch(batch).repeat(), steps_per_epoch=3, epochs=1, verbose=0)

    started = time.perf_counter()
    materialised = list(dataset.take(steps))
    pipeline_seconds = time.perf_counter() - started

    in_memory = tf.data.Dataset.from_tensor_slices(
        (tf.concat([x for x, _ in materialised], 0), tf.concat([y for _, y in materialised], 0))
    ).batch(batch)
    # Alternate the two measurements and keep medians: another process sharing the cores then
    # slows both alike instead of skewing their ratio.
    model_times, together_times = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        model.fit(in_memory, epochs=1, verbose=0)
        model_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        model.fit(dataset.take(steps), epochs=1, verbose=0)
        together_times.append(time.perf_counter() - started)
    model_seconds, together_seconds = statistics.median(model_times), statistics.median(together_times)
    ratios = sorted(t / m for t, m in zip(together_times, model_times))

    images = steps * batch
    print(
        f"machine: {os.cpu_count()} cores; keras {keras.__version__}; policy {policy}; "
        f"{data.image_size}x{data.image_size}x{data.channels}, batch {batch}, {steps} steps"
    )
    print(f"pipeline alone      {rate(images, pipeline_seconds):8.1f} images/s")
    print(f"model step alone    {rate(images, model_seconds):8.1f} images/s")
    print(f"pipeline + model    {rate(images, together_seconds):8.1f} images/s")
    print(f"pipeline/model throughput ratio   {model_seconds / pipeline_seconds:6.2f}  (>1: the pipeline keeps up)")
    print(f"together/model-alone time ratio   {together_seconds / model_seconds:6.2f}  (1.00 = no pipeline overhead)")
    print(f"  per repeat: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
