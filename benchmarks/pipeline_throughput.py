"""Patches/s of the data pipeline next to the training step's consumption, in one run.

On BraTS-sized volumes (240x240x155, phantom content), at a config's patch size and
batch size (default: configs/brats.py, patch 128^3, batch 2):
  - straight from .nii.gz: every patch decodes and preprocesses its case again
    (what a pipeline without the cache does);
  - from the preprocessed cache, in the main process and with Grain workers, each patch
    cut with the margin the config's device-side augmentation needs (nnU-Net's full set
    for configs/brats.py: a 206^3 crop per 128^3 patch);
  - the training step (resfuse, jit, after warm-up): patches consumed per second, with
    augmentation (crops in) and without (patches in), and the augmentation alone: its
    share of the step.

  python -m benchmarks.pipeline_throughput [--cases 4] [--steps 2] [--config configs/brats.py]

Run from the repository root (a relative --config is read from there).

Writes benchmarks/results/pipeline_throughput.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import measure
from resfuse_jax import augment, config_lib, data
from resfuse_jax.data import brats, phantom, pipeline

ROOT = Path(__file__).resolve().parents[1]


def patches_per_second(make_iter, batch_size: int, batches: int) -> float:
  it = make_iter()
  for _ in range(10):  # warm-up: worker start, first reads, and the prefetch buffer's first fill
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - t)


def uncached_patches_per_second(files, info, patch, crop, n: int) -> float:
  """Decode + preprocess a case from .nii.gz for every patch, then cut it."""
  rng = np.random.default_rng(0)
  t = time.perf_counter()
  for i in range(n):
    case = data.read_cases([files[i % len(files)]], info)[0]
    sampler = pipeline.PairedPatchSampler([case], patch, info.regions, 1 / 3, crop)
    sampler.random_map(0, rng)
  return n / (time.perf_counter() - t)


def step_rates(config, steps: int) -> dict[str, float]:
  """Seconds per step with augmentation (crops in) and without, and the augmentation alone."""
  b, patch = config.train.batch_size, tuple(config.data.patch_size)
  out = {}
  for augmented in (False, True):
    step = measure.train_step(config, augmented=augmented)
    seconds = measure.time_calls(step, steps).median_s
    out["step_s_augmented" if augmented else "step_s_plain"] = seconds
  augment_only = jax.jit(
    lambda batch, i: augment.augment_batch(
      step.augmentation, batch, augment.sample_keys(0, i, b), patch
    )
  )
  crops = step.batch  # the augmented step's: crops with augmentation's margin

  def run():
    jax.block_until_ready(augment_only(crops, jnp.asarray(0)))

  out["augment_s"] = measure.time_calls(run, max(steps, 3)).median_s
  out["augment_share_of_step"] = out["augment_s"] / out["step_s_augmented"]
  out["step_patches_per_s"] = b / out["step_s_augmented"]
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/brats.py")
  parser.add_argument("--model", default="resfuse")
  parser.add_argument("--cases", type=int, default=4)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  config = config_lib.load(f"{ROOT / args.config}:{args.model}")
  patch, batch_size = tuple(config.data.patch_size), config.train.batch_size
  crop = measure.crop_shape(config)
  info = measure.parts(config).dataset

  with tempfile.TemporaryDirectory() as tmp:
    spec = phantom.PhantomSpec(num_cases=args.cases, shape=(240, 240, 155), spacing=1.0, seed=0)
    t = time.perf_counter()
    root = phantom.write_phantom(Path(tmp) / "brats", spec)
    print(f"wrote {args.cases} BraTS-sized cases in {time.perf_counter() - t:.0f}s", flush=True)
    files = brats.find_cases(root)
    cfg = config.data
    cfg.cache_dir = str(Path(tmp) / "cache")
    t = time.perf_counter()
    out, ids, _ = data.prepare(cfg, files, workers=args.workers, progress=False)
    build_s = time.perf_counter() - t
    cases = data.load_cases(out, ids)

    def make_iter(workers):
      return lambda: iter(
        pipeline.train_dataset(
          cases,
          patch_size=patch,
          batch_size=batch_size,
          regions=info.regions,
          fg_fraction=1 / 3,
          seed=0,
          crop_shape=crop,
          workers=workers,
        )
      )

    results = {
      "config": args.config,
      "patch": patch,
      "crop": crop,
      "augment_preset": config.data.augment.preset,
      "batch_size": batch_size,
      "cases": args.cases,
      "volume": list(spec.shape),
      "cache_build_s": build_s,
      "uncached_patches_per_s": uncached_patches_per_second(files, info, patch, crop, 4),
      "cached_patches_per_s_0_workers": patches_per_second(make_iter(0), batch_size, args.batches),
      f"cached_patches_per_s_{args.workers}_workers": patches_per_second(
        make_iter(args.workers), batch_size, args.batches
      ),
    }
  results.update(step_rates(config, args.steps), device=str(jax.devices()[0]))
  step_rate, step_s = results["step_patches_per_s"], results["step_s_augmented"]
  best_cached = max(v for k, v in results.items() if k.startswith("cached_"))
  results["cached_over_step"] = best_cached / step_rate
  results["uncached_over_step"] = results["uncached_patches_per_s"] / step_rate

  out_dir = ROOT / "benchmarks" / "results"
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "pipeline_throughput.json").write_text(json.dumps(results, indent=2))
  print(
    f"\n{args.config} ({args.model}), patch {patch} (crop {crop}), batch {batch_size}, "
    f"{args.cases} cases of {spec.shape}; cache built in {build_s:.0f}s"
  )
  print("| source | patches/s | × step consumption |")
  print("|---|---|---|")
  print(
    f"| .nii.gz, decoded per patch | {results['uncached_patches_per_s']:.2f} | "
    f"{results['uncached_over_step']:.1f} |"
  )
  for k, v in results.items():
    if k.startswith("cached_patches"):
      print(f"| cache, {k.split('_')[-2]} workers | {v:.2f} | {v / step_rate:.1f} |")
  print(f"| training step consumes | {step_rate:.3f} ({step_s:.1f} s/step) | 1.0 |")
  print(
    f"\ndevice-side augmentation ({config.data.augment.preset}, crop {crop} -> {patch}): "
    f"{results['augment_s']:.2f} s per batch = {results['augment_share_of_step']:.1%} of the "
    f"augmented step ({step_s:.2f} s; without augmentation {results['step_s_plain']:.2f} s)"
  )


if __name__ == "__main__":
  main()
