"""The project's one GPU check: every GPU measurement of issue 16, side by side in one run.

  bash benchmarks/gpu_check.sh OUT_DIR        # on the H200 machine: wheels, pytest -m gpu, this
  python -m benchmarks.gpu_check --out=OUT_DIR [--budget_s=300] [--tiny]

Measures, at configs/brats.py (128^3 patches, batch 2, 5.8 M-parameter ResFuse):
  - the training step of resfuse and resunet in float32 and bfloat16, against the PyTorch
    reference on the same device (bf16 autocast, channels_last_3d), and the device-side
    augmentation's share of the step (nnU-Net's full set);
  - each alternative of backend.py's GPU column: model.conv_impl, model.downsample,
    model.upsample, model.conv_layout (one fresh process each: XLA reads its flags once);
  - whole-volume inference (240x240x155, 50% overlap, Gaussian) per eval batch size,
    against MONAI's sliding_window_inference with bf16 autocast;
  - the host data path (Grain, cache memory-mapped, nnU-Net's crop margin) against the
    step's consumption.
A list of measurements run by the harness (measure.py) that the CPU suite also runs:
each is skipped, and says so, when the time budget would not cover it, and one that
fails records its error without losing the others (exit status 1 then).
``--tiny`` runs the same code at toy sizes on any backend (tests/test_benchmarks.py).
Writes OUT_DIR/gpu.json and OUT_DIR/gpu.md, and prints the table and the GPU defaults
the numbers recommend for resfuse_jax/backend.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from benchmarks import measure, workloads

MODULE = "benchmarks.gpu_check"
ROOT = measure.ROOT
GOALS = {"step_ms": 10.0, "volume_ms": 100.0, "data_over_step": 2.0}


def sizes(tiny: bool) -> dict:
  if tiny:
    return {"patch": 16, "batch": 2, "features": (4, 8), "volume": (40, 36, 30), "steps": 3,
            "case_shape": (48, 48, 40), "cases": 2, "eval_batches": (2, 4)}  # fmt: skip
  return {"patch": 128, "batch": 2, "features": None, "volume": (240, 240, 155), "steps": 20,
          "case_shape": (240, 240, 155), "cases": 2, "eval_batches": (2, 4, 8)}  # fmt: skip


def config_for(model: str, size: dict, **overrides):
  """configs/brats.py at these sizes, with backend.py's GPU column set explicitly.

  Explicit, so the baseline is the GPU column on any backend (``--tiny`` on a CPU
  runs what the GPU runs) and each variant changes exactly one field of it.
  """
  from resfuse_jax import backend, config_lib

  gpu = backend.DEFAULTS["gpu"]
  values = {"data.patch_size": (size["patch"],) * 3, "train.batch_size": size["batch"]}
  values |= {f"model.{k}": gpu[k] for k in ("conv_impl", "downsample", "upsample")}
  values["train.compute_dtype"] = gpu["compute_dtype"]
  if size["features"]:
    values["model.features"] = size["features"]
  values.update(overrides)
  return config_lib.load(f"{ROOT / 'configs' / 'brats.py'}:{model}", values)


BF16, F32 = {"train.compute_dtype": "bfloat16"}, {"train.compute_dtype": "float32"}


# --- what each measurement runs -------------------------------------------------------------------


def step(model: str, size: dict, **overrides) -> dict:
  """Training's step on random host patches, state donated, after two warm-up steps."""
  return workloads.jax_step(config_for(model, size, **overrides), size["steps"], warmup=2)


def profile(size: dict) -> dict:
  """The bf16 step traced once: device time per op kind (convolutions, fusions, copies...)."""
  return workloads.step_profile(config_for("resfuse", size, **BF16))


def layout_step(layout: str, tiny: bool) -> dict:
  """Worker: XLA reads --xla_gpu_force_conv_* once, when its backend starts."""
  from resfuse_jax import backend

  backend.apply_conv_layout(layout)
  return step("resfuse", sizes(tiny), **BF16)


def threefry_step(partitionable: bool, tiny: bool) -> dict:
  """Worker: the augmented bf16 step (its random draws) with the other threefry flavour;
  ``compile_s`` says what it does to the compile (4x on CPU), ``ms`` to the step."""
  import jax

  jax.config.update("jax_threefry_partitionable", partitionable)
  jax.config.update("jax_enable_compilation_cache", False)  # both sides really compile
  size = sizes(tiny)
  config = config_for("resfuse", size, **BF16)
  return {**workloads.jax_step(config, size["steps"], warmup=2, augmented=True), "augmented": True}


WORKERS = {"layout_step": layout_step, "threefry_step": threefry_step}


def augmentation_share(size: dict) -> dict:
  """nnU-Net's set on the device: the step with it (crops in), without, and it alone."""
  from benchmarks import pipeline_throughput

  config = config_for("resfuse", size, **BF16)
  out = pipeline_throughput.step_rates(config, size["steps"])
  return {
    "ms": 1e3 * out["step_s_augmented"],  # the step with augmentation
    "plain_ms": 1e3 * out["step_s_plain"],
    "augment_ms": 1e3 * out["augment_s"],
    "augment_share_of_step": out["augment_share_of_step"],
    "step_patches_per_s": out["step_patches_per_s"],
    "crop": list(measure.crop_shape(config)),
  }


def volume(size: dict, eval_batch: int, placement: str = "host") -> dict:
  """Whole-volume inference through the one tiler, windows cut and blended on ``placement``."""
  config = config_for("resfuse", size)
  return workloads.jax_volume(config, size["volume"], eval_batch, placement, repeats=3)


def resident(size: dict, dtype: str) -> dict:
  """Crops/s of the device-resident sampler at the host path's crop: compare data/..."""
  config = config_for("resfuse", size)
  return workloads.resident_path(config, size["case_shape"], size["cases"], 20, dtype)


def resident_step(size: dict) -> dict:
  """The bf16 augmented step drawing its crops from the resident set vs given them: the
  sampler's share of the step (issue 28's goal: <= 10 %)."""
  from benchmarks import resident_data

  config = config_for("resfuse", size, **BF16)
  out = resident_data.step_share(config, size["steps"], size["case_shape"], size["cases"])
  return {**out, "ms": out["resident_step_ms"]}


def monai(size: dict, eval_batch: int) -> dict:
  config = config_for("resfuse", size)
  return workloads.monai_volume(config, size["volume"], eval_batch, bf16=True, repeats=3)


def torch_step(model: str, size: dict, dtype: str) -> dict:
  return workloads.torch_step(config_for(model, size), size["steps"], dtype, warmup=2)


def data(size: dict, workers: int, threads: int = 8) -> dict:
  """Crops/s out of Grain (memory-mapped cases, nnU-Net's crop), timed after start-up."""
  config = config_for("resfuse", size)
  return workloads.data_path(config, size["case_shape"], size["cases"], workers, threads, 40)


# --- the list ------------------------------------------------------------------------------------


def plan(size: dict) -> list[measure.Measurement]:
  """The measurements, most important first, with the seconds each needs on an H200."""
  M = measure.Measurement
  tiny = size["patch"] < 128
  cores = min(16, os.cpu_count() or 1)

  def variant(field, value):
    return lambda: step("resfuse", size, **BF16, **{f"model.{field}": value})

  def layout(value):
    return lambda: measure.run_isolated(MODULE, "layout_step", 600, layout=value, tiny=tiny)

  def threefry(value):
    kw = {"partitionable": value, "tiny": tiny}
    return lambda: measure.run_isolated(MODULE, "threefry_step", 600, **kw)

  jobs = [
    M("step/resfuse/bfloat16", lambda: step("resfuse", size, **BF16), 40),
    M("profile/resfuse/bfloat16", lambda: profile(size), 20),
    M("torch_step/resfuse/bfloat16", lambda: torch_step("resfuse", size, "bfloat16"), 15),
    M("augmentation/resfuse/bfloat16", lambda: augmentation_share(size), 60),
    M("data/workers=0", lambda: data(size, 0), 20),
    M("data/threads=16", lambda: data(size, 0, threads=16), 20),
    M(f"data/workers={cores}", lambda: data(size, cores), 25),
    M("data/resident/bfloat16", lambda: resident(size, "bfloat16"), 15),
    M("data/resident_step/bfloat16", lambda: resident_step(size), 45),
    M("volume/jax/eval_batch=4", lambda: volume(size, 4), 30),
    M("volume/monai/eval_batch=4", lambda: monai(size, 4), 15),
    M("volume/jax_device/eval_batch=4", lambda: volume(size, 4, "device"), 30),
    M("step/resfuse/float32", lambda: step("resfuse", size, **F32), 40),
    M("torch_step/resfuse/float32", lambda: torch_step("resfuse", size, "float32"), 15),
    M("step/resunet/bfloat16", lambda: step("resunet", size, **BF16), 35),
    M("torch_step/resunet/bfloat16", lambda: torch_step("resunet", size, "bfloat16"), 15),
    M("step/resunet/float32", lambda: step("resunet", size, **F32), 35),
    M("torch_step/resunet/float32", lambda: torch_step("resunet", size, "float32"), 15),
    M("variant/downsample=strided", variant("downsample", "strided"), 40),
    M("variant/upsample=transpose", variant("upsample", "transpose"), 40),
    M("variant/conv_impl=planes", variant("conv_impl", "planes"), 60),
    M("variant/threefry_partitionable=false", threefry(False), 60),
    M("variant/threefry_partitionable=true", threefry(True), 60),
    M("variant/conv_layout=default", layout("default"), 50),
    M("variant/conv_layout=nchw", layout("nchw"), 50),
  ]
  for b in size["eval_batches"]:
    if b != 4:
      jobs.append(M(f"volume/jax/eval_batch={b}", lambda b=b: volume(size, b), 25))
  return jobs


def recommend(r: dict) -> dict:
  """The GPU column these numbers support, field by field where both sides were measured.

  The baseline, step/resfuse/bfloat16, runs backend.py's current GPU column; a field
  changes only when every alternative was timed and one beat the baseline.
  """
  from resfuse_jax import backend

  def ms(name):
    return r.get(name, {}).get("ms")

  base = ms("step/resfuse/bfloat16")
  current = backend.DEFAULTS["gpu"]
  out = {}
  for field in ("conv_impl", "downsample", "upsample", "conv_layout"):
    timed = {alt: ms(f"variant/{field}={alt}") for alt in backend.CHOICES[field]}
    timed.pop(current[field], None)
    if base and all(timed.values()):
      best = min(timed, key=timed.get)
      out[field] = best if timed[best] < base else current[field]
  if base and ms("step/resfuse/float32"):
    out["compute_dtype"] = "bfloat16" if base < ms("step/resfuse/float32") else "float32"
  volumes = {  # (placement, batch) -> ms
    ("device" if k.startswith("volume/jax_device/") else "host", int(k.split("=")[1])): v["ms"]
    for k, v in r.items()
    if k.startswith(("volume/jax/", "volume/jax_device/")) and "ms" in v
  }
  if volumes:
    out["tiling"], out["eval_batch_size"] = min(volumes, key=volumes.get)
  rng = {v: r.get(f"variant/threefry_partitionable={v}", {}) for v in ("true", "false")}
  if all("ms" in x for x in rng.values()):  # the step within 2%: the shorter compile
    close = abs(rng["true"]["ms"] - rng["false"]["ms"]) <= 0.02 * rng["true"]["ms"]
    key = (lambda v: rng[v]["compile_s"]) if close else (lambda v: rng[v]["ms"])
    out["threefry_partitionable"] = min(rng, key=key) == "true"
  return out


def goals(r: dict) -> dict:
  def ms(name):
    return r.get(name, {}).get("ms")

  out = {}
  if ms("step/resfuse/bfloat16"):
    out["resfuse bf16 step <= 10 ms"] = ms("step/resfuse/bfloat16") <= GOALS["step_ms"]
    if ms("torch_step/resfuse/bfloat16"):
      out["resfuse bf16 step <= PyTorch's"] = ms("step/resfuse/bfloat16") <= ms(
        "torch_step/resfuse/bfloat16"
      )
  volumes = [v["ms"] for k, v in r.items() if k.startswith("volume/jax") and "ms" in v]
  if volumes:  # the host-tiled path (predict's today) or the device-tiled one
    out["volume <= 100 ms"] = min(volumes) <= GOALS["volume_ms"]
  aug = r.get("augmentation/resfuse/bfloat16", {})
  rates = [
    v["patches_per_s"] for k, v in r.items() if k.startswith("data/") and "patches_per_s" in v
  ]
  share = r.get("data/resident_step/bfloat16", {}).get("sampler_share")
  if share is not None:
    out["resident sampler <= 10% of the step"] = share <= 0.10
  if rates and "step_patches_per_s" in aug:
    out["data path >= 2x step consumption"] = max(rates) >= 2 * aug["step_patches_per_s"]
  return out


def markdown(res: dict) -> str:
  lines = [f"# GPU check: {measure.header_line(res)}", ""]
  lines += [f"`{res['command']}`; budget {res['budget_s']} s, used {res['used_s']:.0f} s", ""]
  lines += measure.records_table(res["results"])
  lines += ["", "## Goals", ""]
  lines += [f"- {k}: {'met' if ok else 'NOT met'}" for k, ok in res["goals"].items()]
  lines += ["", "## GPU defaults these numbers recommend (resfuse_jax/backend.py)", ""]
  lines += ["```", json.dumps(res["recommended_gpu_defaults"], indent=2), "```"]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", help="folder for gpu.json and gpu.md")
  p.add_argument("--budget_s", type=float, default=300.0, help="skip what would not fit")
  p.add_argument("--tiny", action="store_true", help="toy sizes: the code paths on any backend")
  p.add_argument("--only", default="", help="comma-separated name prefixes to run")
  p.add_argument("--compile_cache", default="", help="XLA's persistent compilation cache folder")
  measure.add_worker_flags(p)
  args = p.parse_args(argv)
  from resfuse_jax import backend

  backend.apply_conv_layout("auto")  # the baseline is the GPU column, as every command runs it
  backend.apply_rng_default()
  if args.compile_cache:
    measure.use_compilation_cache(args.compile_cache)
  if args.worker:
    measure.run_worker(WORKERS, args.worker, args.kwargs)
    return 0
  if not args.out:
    p.error("--out is required")
  size = sizes(args.tiny)
  command = f"python -m {MODULE} " + " ".join(sys.argv[1:] if argv is None else argv)
  header = measure.environment(command)
  budget = math.inf if args.tiny else args.budget_s  # --tiny runs every code path
  only = [o for o in args.only.split(",") if o]
  start = time.perf_counter()
  results, failed = measure.run_measurements(plan(size), budget, only)
  res = {**header, "budget_s": args.budget_s, "used_s": time.perf_counter() - start}
  res["sizes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in size.items()}
  res |= {"results": results, "goals": goals(results)}
  res["recommended_gpu_defaults"] = recommend(results)
  measure.write_report(args.out, "gpu", res, markdown)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
