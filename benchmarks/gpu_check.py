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
Each measurement is skipped, and says so, when the time budget would not cover it, and
one that fails records its error without losing the others (exit status 1 then).
``--tiny`` runs the same code at toy sizes on any backend (tests/test_benchmarks.py).
Writes OUT_DIR/gpu.json and OUT_DIR/gpu.md, and prints the table and the GPU defaults
the numbers recommend for resfuse_jax/backend.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
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


def median_ms(fn, steps: int, warmup: int = 2) -> float:
  """Median wall time of a blocking ``fn`` over ``steps`` calls after ``warmup`` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


# --- JAX ----------------------------------------------------------------------------------------


def jax_step(model: str, size: dict, augmented: bool = False, **overrides) -> dict:
  """One training step on random host crops/patches, state donated, after warm-up."""
  import jax

  from benchmarks import pipeline_throughput
  from resfuse_jax import data, models, train
  from resfuse_jax.inference import predictor

  config = config_for(model, size, **overrides)
  regions = tuple(data.get_dataset("brats").regions.values())
  net, tx = predictor.build_model(config), train.make_optimizer(config.train)
  patch = tuple(config.data.patch_size)
  state = jax.jit(lambda k: train.init_state(net, tx, patch, k))(jax.random.key(0))
  shape = train.crop_shape(config) if augmented else patch
  batch = pipeline_throughput.host_batch(shape, size["batch"])
  step = jax.jit(
    train.make_step_fn(config, net, tx, regions, augmented=augmented), donate_argnums=0
  )
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics)

  ms = median_ms(run, size["steps"])
  return {
    "ms": ms,
    "compile_s": compile_s,
    "tflops_per_s": flops / ms / 1e9,
    "params": models.count_params(holder[0].params),
    "dtype": str(models.compute_dtype(config.train)),
    "plan": str(net.conv_impl),
  }


def augmentation_share(size: dict) -> dict:
  """nnU-Net's set on the device: the step with it (crops in), without, and it alone."""
  from benchmarks import pipeline_throughput
  from resfuse_jax import train

  config = config_for("resfuse", size, **{"train.compute_dtype": "bfloat16"})
  out = pipeline_throughput.step_rates(config, size["steps"])
  return {
    "ms": 1e3 * out["step_s_augmented"],  # the step with augmentation
    "plain_ms": 1e3 * out["step_s_plain"],
    "augment_ms": 1e3 * out["augment_s"],
    "augment_share_of_step": out["augment_share_of_step"],
    "step_patches_per_s": out["step_patches_per_s"],
    "crop": list(train.crop_shape(config)),
  }


def jax_volume(size: dict, eval_batch: int, on_device: bool = False, **overrides) -> dict:
  """Whole-volume inference (sliding window, Gaussian, 50% overlap) after one warm-up volume.

  ``on_device``: the tiling and blending as one jitted program (`make_device_tiler`),
  instead of host numpy around a jitted window function (what predict runs today).
  """
  import jax
  import jax.numpy as jnp

  from resfuse_jax.inference import predictor, tiler

  config = config_for("resfuse", size, **overrides)
  net = predictor.build_model(config)
  patch = (size["patch"],) * 3
  dummy = jnp.zeros((1, *patch, 1))
  params = jax.jit(net.init)(jax.random.key(0), dummy, dummy)["params"]
  forward = jax.jit(lambda p, tiles: predictor.window_probabilities(net, p, tiles))
  volume = np.random.default_rng(0).normal(size=(*size["volume"], 2)).astype(np.float32)

  def run():
    tiler.sliding_window(
      lambda tiles: forward(params, tiles), volume, patch, 3, overlap=0.5, batch_size=eval_batch
    )

  if on_device:
    tiler = tiler.make_device_tiler(
      lambda p, tiles: predictor.window_probabilities(net, p, tiles),
      volume.shape, patch, 3, 0.5, eval_batch,
    )  # fmt: skip

    def run():  # noqa: F811 - the device variant replaces the host loop
      np.asarray(tiler(params, volume))

  t = time.perf_counter()
  run()
  return {"warmup_s": time.perf_counter() - t, "ms": median_ms(run, 3, warmup=0)}


# --- PyTorch / MONAI -----------------------------------------------------------------------------


def torch_device():
  import torch

  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_step(model: str, size: dict, dtype: str) -> dict:
  """The reference step: AdamW, clipping, channels_last_3d, bf16 autocast when asked."""
  import torch

  from benchmarks import torch_reference

  dev = torch_device()
  config = config_for(model, size)
  net = torch_reference.build(model, config.model.features, 3).to(dev)
  opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
  rng = np.random.default_rng(0)
  shape = (size["batch"], 1, *(size["patch"],) * 3)
  fmt = torch.channels_last_3d
  pre = torch.from_numpy(rng.normal(size=shape).astype(np.float32)).to(dev, memory_format=fmt)
  post = torch.from_numpy(rng.normal(size=shape).astype(np.float32)).to(dev, memory_format=fmt)
  label = torch.from_numpy(rng.integers(0, 4, size=(shape[0], *shape[2:]))).to(dev)
  regions = [(1, 2, 3), (1, 3), (3,)]

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = net(pre, post)
    targets = torch.stack([sum(label == v for v in r).bool() for r in regions], 1).float()
    loss = torch_reference.dice_bce_loss(logits.float(), targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    if dev.type == "cuda":
      torch.cuda.synchronize()

  return {"ms": median_ms(run, size["steps"]), "params": torch_reference.count_params(net)}


def monai_volume(size: dict, eval_batch: int) -> dict:
  import torch
  from monai.inferers import sliding_window_inference

  from benchmarks import torch_reference

  dev = torch_device()
  config = config_for("resfuse", size)
  net = torch_reference.build("resfuse", config.model.features, 3).to(dev).eval()
  volume = np.random.default_rng(0).normal(size=(*size["volume"], 2)).astype(np.float32)
  x = torch.from_numpy(volume).permute(3, 0, 1, 2)[None].contiguous().to(dev)

  def predictor(tiles):
    tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
    return torch.sigmoid(net(tiles[:, 0:1], tiles[:, 1:2]).float())

  def run():
    with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16):
      sliding_window_inference(
        x, (size["patch"],) * 3, eval_batch, predictor, overlap=0.5, mode="gaussian"
      ).cpu()

  t = time.perf_counter()
  run()
  return {"warmup_s": time.perf_counter() - t, "ms": median_ms(run, 3, warmup=0)}


# --- the host data path --------------------------------------------------------------------------


def data_path(size: dict, workers: int, threads: int = 8, batches: int = 40) -> dict:
  """Patches/s out of Grain (memory-mapped cases, nnU-Net's crop): ``workers`` processes,
  ``threads`` reading threads each; timed after the prefetch buffer has drained once."""
  from absl import flags

  from resfuse_jax import data, train
  from resfuse_jax.data import pipeline

  flags.FLAGS.mark_as_parsed()
  config = config_for("resfuse", size)
  crop = train.crop_shape(config)
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    cases = []
    for i in range(size["cases"]):
      arrays = {}
      for key in ("pre", "post", "label"):
        if key == "label":
          value = (rng.random(size["case_shape"]) < 0.02).astype(np.uint8) * 3
        else:
          value = rng.normal(size=size["case_shape"]).astype(np.float32)
        np.save(Path(tmp) / f"{i}_{key}.npy", value)
        arrays[key] = np.load(Path(tmp) / f"{i}_{key}.npy", mmap_mode="r")
      cases.append(
        data.Case(f"c{i}", arrays["pre"], arrays["post"], arrays["label"], (1.0,) * 3,
                  np.eye(4), size["case_shape"], tuple((0, s) for s in size["case_shape"]))
      )  # fmt: skip
    it = iter(
      pipeline.train_dataset(
        cases,
        patch_size=config.data.patch_size,
        batch_size=size["batch"],
        regions=data.get_dataset("brats").regions,
        fg_fraction=1 / 3,
        seed=0,
        crop_shape=crop,
        workers=workers,
        read_threads=threads,
      )
    )
    for _ in range(10):  # past the start-up and the first fill of the buffer
      next(it)
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    rate = batches * size["batch"] / (time.perf_counter() - t)
  return {"patches_per_s": rate, "workers": workers, "threads": threads, "crop": list(crop)}


# --- the run -------------------------------------------------------------------------------------


def layout_worker(layout: str, size: dict) -> dict:
  """In a fresh process: XLA reads --xla_gpu_force_conv_* once, when its backend starts."""
  cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker_layout", layout]
  cmd += ["--tiny"] if size["patch"] < 128 else []
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr[-3000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(size: dict) -> list[tuple[str, float, object]]:
  """(name, seconds it is expected to need on an H200, thunk), most important first."""
  bf16, f32 = {"train.compute_dtype": "bfloat16"}, {"train.compute_dtype": "float32"}
  jobs = [
    ("step/resfuse/bfloat16", 40, lambda: jax_step("resfuse", size, **bf16)),
    ("torch_step/resfuse/bfloat16", 15, lambda: torch_step("resfuse", size, "bfloat16")),
    ("augmentation/resfuse/bfloat16", 60, lambda: augmentation_share(size)),
    ("data/workers=0", 20, lambda: data_path(size, 0)),
    ("data/threads=16", 20, lambda: data_path(size, 0, threads=16)),
    (f"data/workers={min(16, os.cpu_count() or 1)}", 25,
     lambda: data_path(size, min(16, os.cpu_count() or 1))),  # fmt: skip
    ("volume/jax/eval_batch=4", 30, lambda: jax_volume(size, 4)),
    ("volume/monai/eval_batch=4", 15, lambda: monai_volume(size, 4)),
    ("volume/jax_device/eval_batch=4", 30, lambda: jax_volume(size, 4, on_device=True)),
    ("step/resfuse/float32", 40, lambda: jax_step("resfuse", size, **f32)),
    ("torch_step/resfuse/float32", 15, lambda: torch_step("resfuse", size, "float32")),
    ("step/resunet/bfloat16", 35, lambda: jax_step("resunet", size, **bf16)),
    ("torch_step/resunet/bfloat16", 15, lambda: torch_step("resunet", size, "bfloat16")),
    ("step/resunet/float32", 35, lambda: jax_step("resunet", size, **f32)),
    ("torch_step/resunet/float32", 15, lambda: torch_step("resunet", size, "float32")),
    ("variant/downsample=strided", 40,
     lambda: jax_step("resfuse", size, **bf16, **{"model.downsample": "strided"})),
    ("variant/upsample=transpose", 40,
     lambda: jax_step("resfuse", size, **bf16, **{"model.upsample": "transpose"})),
    ("variant/conv_impl=planes", 60,
     lambda: jax_step("resfuse", size, **bf16, **{"model.conv_impl": "planes"})),
    ("variant/conv_layout=nhwc", 50, lambda: layout_worker("nhwc", size)),
    ("variant/conv_layout=nchw", 50, lambda: layout_worker("nchw", size)),
  ]  # fmt: skip
  for b in size["eval_batches"]:
    if b != 4:
      jobs.append((f"volume/jax/eval_batch={b}", 25, lambda b=b: jax_volume(size, b)))
  return jobs


def recommend(r: dict) -> dict:
  """The GPU column these numbers support, field by field where both sides were measured.

  The baseline, step/resfuse/bfloat16, runs backend.py's current GPU column.
  """

  def ms(name):
    return r.get(name, {}).get("ms")

  base = ms("step/resfuse/bfloat16")
  out = {}
  current = {"conv_impl": "xla", "downsample": "space_to_depth", "upsample": "depth_to_space"}
  for field, alternatives in (
    ("conv_impl", ("planes",)),
    ("downsample", ("strided",)),
    ("upsample", ("transpose",)),
    ("conv_layout", ("nhwc", "nchw")),
  ):
    timed = {alt: ms(f"variant/{field}={alt}") for alt in alternatives}
    if base and all(timed.values()):
      best = min(timed, key=timed.get)
      out[field] = best if timed[best] < base else current.get(field, "default")
  if base and ms("step/resfuse/float32"):
    out["compute_dtype"] = "bfloat16" if base < ms("step/resfuse/float32") else "float32"
  volumes = {
    int(k.split("=")[1]): v["ms"] for k, v in r.items() if k.startswith("volume/jax/") and "ms" in v
  }
  if volumes:
    out["eval_batch_size"] = min(volumes, key=volumes.get)
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
  if rates and "step_patches_per_s" in aug:
    out["data path >= 2x step consumption"] = max(rates) >= 2 * aug["step_patches_per_s"]
  return out


def markdown(res: dict) -> str:
  lines = [f"# GPU check: {res['device']} ({res['date']})", "",
           f"`{res['command']}`; jax {res['versions'].get('jax')}, torch "
           f"{res['versions'].get('torch')}; budget {res['budget_s']} s, used {res['used_s']:.0f} s",
           "", "| measurement | ms | other |", "|---|---|---|"]  # fmt: skip
  for name, v in res["results"].items():
    ms = f"{v['ms']:.2f}" if "ms" in v else ""
    rest = ", ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}"
                     for k, x in v.items() if k not in ("ms", "error", "traceback"))  # fmt: skip
    if "error" in v:
      rest = f"ERROR {v['error']}"
    lines.append(f"| {name} | {ms} | {rest} |")
  lines += ["", "## Goals", ""] + [f"- {k}: {'met' if ok else 'NOT met'}" for k, ok in
                                     res["goals"].items()]  # fmt: skip
  lines += ["", "## GPU defaults these numbers recommend (resfuse_jax/backend.py)", "",
            "```", json.dumps(res["recommended_gpu_defaults"], indent=2), "```"]  # fmt: skip
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", help="folder for gpu.json and gpu.md")
  p.add_argument("--budget_s", type=float, default=300.0, help="skip what would not fit")
  p.add_argument("--tiny", action="store_true", help="toy sizes: the code paths on any backend")
  p.add_argument("--only", default="", help="comma-separated name prefixes to run")
  p.add_argument("--worker_layout", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  size = sizes(args.tiny)
  if args.worker_layout:
    from resfuse_jax import backend

    backend.apply_conv_layout(args.worker_layout)
    print(json.dumps(jax_step("resfuse", size, **{"train.compute_dtype": "bfloat16"})))
    return 0
  if not args.out:
    p.error("--out is required")
  import jax

  start = time.perf_counter()
  versions = {"jax": jax.__version__}
  try:
    import torch

    versions["torch"] = torch.__version__
  except ImportError:
    pass
  results, failed = {}, False
  only = [o for o in args.only.split(",") if o]
  for name, expected_s, thunk in plan(size):
    if only and not any(name.startswith(o) for o in only):
      continue
    left = args.budget_s - (time.perf_counter() - start)
    if not args.tiny and left < expected_s:
      results[name] = {"skipped": f"{left:.0f} s of budget left, needs ~{expected_s} s"}
      print(f"--- {name}: skipped (budget)", flush=True)
      continue
    t = time.perf_counter()
    try:
      results[name] = thunk()
    except Exception as e:  # noqa: BLE001 - one failure must not lose the other measurements
      failed = True
      results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}",
                       "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
    results[name]["wall_s"] = time.perf_counter() - t
    print(f"--- {name}: {json.dumps({k: v for k, v in results[name].items() if k != 'traceback'})}",
          flush=True)  # fmt: skip
  res = {
    "device": str(jax.devices()[0]),
    "backend": jax.default_backend(),
    "versions": versions,
    "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
    "date": time.strftime("%Y-%m-%d %H:%M"),
    "budget_s": args.budget_s,
    "used_s": time.perf_counter() - start,
    "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in size.items()},
    "results": results,
  }
  res["goals"] = goals(results)
  res["recommended_gpu_defaults"] = recommend(results)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "gpu.json").write_text(json.dumps(res, indent=2))
  table = markdown(res)
  (out / "gpu.md").write_text(table)
  print(table)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
