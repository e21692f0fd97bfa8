"""Every speed measurement of issue 7, side by side in one run: ours (JAX) vs PyTorch/MONAI.

  pip install -e '.[bench]'
  python -m benchmarks.suite --name=cpu            # ~1 h on 2 CPU cores
  python -m benchmarks.suite --name=cpu --before   # adds XLA's 3D conv (the code before the rewrites)

Run from the repository root. Writes benchmarks/results/<name>.json and <name>.md.
Each measurement runs in a fresh subprocess (its peak RSS is that process's alone);
times are medians over --steps steps after a warm-up step, so compilation is
reported apart from them. The conv implementation of a JAX measurement is set in
its config (``model.conv_impl``), not through the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BRATS_CONFIG = ROOT / "configs" / "brats.py"

VOLUME = (240, 240, 155)  # one BraTS case


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def brats_config(model: str, patch: int, batch: int, conv_impl: str | None = None):
  """configs/brats.py for ``model`` at this patch edge and batch size.

  ``conv_impl``: ``model.conv_impl``; None keeps the config's default (``auto``, or
  ``$RESFUSE_CONV_IMPL`` where set).
  """
  from resfuse_jax import config_lib

  overrides = {"data.patch_size": (patch,) * 3, "train.batch_size": batch}
  if conv_impl:
    overrides["model.conv_impl"] = conv_impl
  return config_lib.load(f"{BRATS_CONFIG}:{model}", overrides)


def regions() -> tuple[tuple[int, ...], ...]:
  from resfuse_jax import data

  return tuple(data.get_dataset("brats").regions.values())


def random_batch(batch: int, patch: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  shape = (batch, patch, patch, patch)
  return {
    "pre": rng.normal(size=(*shape, 1)).astype(np.float32),
    "post": rng.normal(size=(*shape, 1)).astype(np.float32),
    "label": rng.integers(0, 4, size=shape).astype(np.int32),
  }


def timed(fn, steps: int) -> tuple[float, list[float]]:
  """(first call's seconds, the next ``steps`` calls' seconds); fn must block."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return first, times


def jax_step(
  model_name: str, patch: int, batch: int, steps: int, conv_impl: str | None = None
) -> dict:
  import jax
  import jax.numpy as jnp

  from resfuse_jax import models, train
  from resfuse_jax.inference import predictor

  config = brats_config(model_name, patch, batch, conv_impl)
  model = predictor.build_model(config)
  tx = train.make_optimizer(config.train)
  state = jax.jit(lambda k: train.init_state(model, tx, (patch,) * 3, k))(jax.random.key(0))
  data = jax.tree.map(jnp.asarray, random_batch(batch, patch))
  # Augmentation off: the PyTorch reference has none (the data rows measure it apart).
  step = jax.jit(
    train.make_step_fn(config, model, tx, regions(), augmented=False), donate_argnums=0
  )
  t = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], data)
    jax.block_until_ready(metrics)

  first, times = timed(run, steps)
  return {
    "params": models.count_params(state.params),
    "compile_s": compile_s,
    "first_step_s": first,
    "step_times_s": times,
    "flops": float(cost["flops"]),
  }


def torch_model(model_name: str, features, channels_last: bool = True):
  from benchmarks import torch_reference

  return torch_reference.build(model_name, features, len(regions()), channels_last)


def torch_step(model_name: str, patch: int, batch: int, steps: int) -> dict:
  import torch

  from benchmarks import torch_reference

  config = brats_config(model_name, patch, batch)
  model = torch_model(model_name, config.model.features)
  step = torch_reference.make_train_step(model, regions(), lr=config.train.lr)
  b = random_batch(batch, patch)
  fmt = torch.channels_last_3d
  pre = torch.from_numpy(b["pre"]).permute(0, 4, 1, 2, 3).contiguous(memory_format=fmt)
  post = torch.from_numpy(b["post"]).permute(0, 4, 1, 2, 3).contiguous(memory_format=fmt)
  label = torch.from_numpy(b["label"]).long()
  first, times = timed(lambda: step(pre, post, label), steps)
  return {
    "params": torch_reference.count_params(model),
    "first_step_s": first,
    "step_times_s": times,
  }


def jax_inference(model_name: str, patch: int, batch: int, conv_impl: str | None = None) -> dict:
  import jax
  import jax.numpy as jnp

  from resfuse_jax.inference import predictor, tiler

  config = brats_config(model_name, patch, batch, conv_impl)
  model = predictor.build_model(config)
  dummy = jnp.zeros((1, patch, patch, patch, 1))
  params = jax.jit(model.init)(jax.random.key(0), dummy, dummy)["params"]
  forward = jax.jit(lambda p, tiles: predictor.window_probabilities(model, p, tiles))

  def predict(tiles):
    return forward(params, tiles)

  volume = np.random.default_rng(0).normal(size=(*VOLUME, 2)).astype(np.float32)
  t = time.perf_counter()
  jax.block_until_ready(predict(np.zeros((batch, patch, patch, patch, 2), np.float32)))
  warm = time.perf_counter() - t
  t = time.perf_counter()
  out = tiler.sliding_window(
    predict, volume, (patch,) * 3, len(regions()), overlap=0.5, batch_size=batch
  )
  return {"warmup_s": warm, "volume_s": time.perf_counter() - t, "out_shape": list(out.shape)}


def onnx_export(model_name: str, patch: int, batch: int, path: str) -> dict:
  """Writes the JAX worker's model and parameters (same init) as ``path`` (model.onnx)."""
  import jax
  import jax.numpy as jnp

  from resfuse_jax.inference import predictor
  from resfuse_jax.serving import onnx_graph

  config = brats_config(model_name, patch, batch)
  model = predictor.build_model(config)
  dummy = jnp.zeros((1, patch, patch, patch, 1))
  params = jax.jit(model.init)(jax.random.key(0), dummy, dummy)["params"]
  t = time.perf_counter()
  Path(path).write_bytes(onnx_graph.to_onnx(model, params, (patch,) * 3).SerializeToString())
  return {"export_s": time.perf_counter() - t, "bytes": Path(path).stat().st_size}


def onnxruntime_inference(model_name: str, patch: int, batch: int, path: str) -> dict:
  """``path`` (from `onnx_export`, another process, as a deployer has the file) run by
  onnxruntime through the package's own sliding window, partial last batch as it is."""
  import onnxruntime

  from resfuse_jax.inference import onnx_runtime, tiler

  predict = onnx_runtime.OnnxWindow(path)
  volume = np.random.default_rng(0).normal(size=(*VOLUME, 2)).astype(np.float32)
  t = time.perf_counter()
  predict(np.zeros((batch, patch, patch, patch, 2), np.float32))
  warm = time.perf_counter() - t
  t = time.perf_counter()
  out = tiler.sliding_window(
    predict,
    volume,
    (patch,) * 3,
    len(regions()),
    overlap=0.5,
    batch_size=batch,
    fixed_batch=False,
  )
  return {
    "warmup_s": warm,
    "volume_s": time.perf_counter() - t,
    "out_shape": list(out.shape),
    "onnxruntime": onnxruntime.__version__,
    "tiles_per_run": predict.max_batch,
  }


def monai_inference(model_name: str, patch: int, batch: int) -> dict:
  import torch
  from monai.inferers import sliding_window_inference

  config = brats_config(model_name, patch, batch)
  model = torch_model(model_name, config.model.features).eval()
  volume = np.random.default_rng(0).normal(size=(*VOLUME, 2)).astype(np.float32)
  x = torch.from_numpy(volume).permute(3, 0, 1, 2)[None].contiguous()

  def predictor(tiles):
    tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
    return torch.sigmoid(model(tiles[:, 0:1], tiles[:, 1:2]))

  with torch.inference_mode():
    t = time.perf_counter()
    predictor(torch.zeros(batch, 2, patch, patch, patch))
    warm = time.perf_counter() - t
    t = time.perf_counter()
    out = sliding_window_inference(
      x, (patch,) * 3, batch, predictor, overlap=0.5, mode="gaussian", sigma_scale=0.125
    )
    volume_s = time.perf_counter() - t
  return {"warmup_s": warm, "volume_s": volume_s, "out_shape": list(out.shape)}


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
  """FLOP/s of XLA's float32 matmul on this machine: the practical peak to compare to."""
  import jax
  import jax.numpy as jnp

  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - t)
  return 2 * n**3 / float(np.median(times))


def pipeline_rate(patch: int, batch: int, cases: int, batches: int) -> dict:
  """Patches/s out of the Grain pipeline on BraTS-sized phantom cases (cache built first)."""
  from absl import flags

  from resfuse_jax import data, train
  from resfuse_jax.data import brats, phantom, pipeline

  flags.FLAGS.mark_as_parsed()
  config = brats_config("resfuse", patch, batch)
  info = data.get_dataset("brats")
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    spec = phantom.PhantomSpec(num_cases=cases, shape=VOLUME, spacing=1.0, seed=0)
    files = brats.find_cases(phantom.write_phantom(Path(tmp) / "brats", spec))
    config.data.cache_dir = str(Path(tmp) / "cache")
    prepared, ids, _ = data.prepare(config.data, files, workers=2, progress=False)
    loaded = data.load_cases(prepared, ids)
    for workers in (0, 2):
      it = iter(
        pipeline.train_dataset(
          loaded,
          patch_size=(patch,) * 3,
          batch_size=batch,
          regions=info.regions,
          fg_fraction=1 / 3,
          seed=0,
          crop_shape=train.crop_shape(config),  # the margin nnU-Net's augmentation needs
          workers=workers,
        )
      )
      next(it)
      t = time.perf_counter()
      for _ in range(batches):
        next(it)
      out[f"patches_per_s_{workers}_workers"] = batches * batch / (time.perf_counter() - t)
  return out


def jax_augment(model_name: str, patch: int, batch: int, steps: int) -> dict:
  """The step with nnU-Net's augmentation on the device (crops in), without, and it alone."""
  from benchmarks import pipeline_throughput

  return pipeline_throughput.step_rates(brats_config(model_name, patch, batch), steps)


WORKERS = {
  "jax_step": jax_step,
  "jax_augment": jax_augment,
  "torch_step": torch_step,
  "jax_inference": jax_inference,
  "onnx_export": onnx_export,
  "onnxruntime_inference": onnxruntime_inference,
  "monai_inference": monai_inference,
}


def worker_command(kind: str, conv_impl: str | None = None, **kwargs) -> list[str]:
  """The command line of one measurement's process (run with the repository root as cwd)."""
  cmd = [sys.executable, "-m", "benchmarks.suite", "--worker", kind, "--kwargs", json.dumps(kwargs)]
  return cmd + (["--conv-impl", conv_impl] if conv_impl else [])


def run_worker(kind: str, conv_impl: str | None = None, **kwargs) -> dict:
  """Runs one measurement in a fresh process; returns its dict plus peak RSS.

  ``conv_impl`` (JAX workers only) becomes the worker config's ``model.conv_impl``.
  """
  cmd = worker_command(kind, conv_impl, **kwargs)
  label = f"{kind} {kwargs}" + (f" conv={conv_impl}" if conv_impl else "")
  print(f"... {label}", flush=True)
  t = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{label} failed:\n{proc.stderr[-4000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"    {time.perf_counter() - t:.0f}s: {summary(result)}", flush=True)
  return {**kwargs, **({"conv_impl": conv_impl} if conv_impl else {}), **result}


def summary(r: dict) -> str:
  if "step_times_s" in r:
    return f"step {np.median(r['step_times_s']):.2f}s, peak {r['peak_rss_mb']:.0f} MB"
  if "augment_s" in r:
    return f"augmentation {r['augment_s']:.2f}s = {r['augment_share_of_step']:.1%} of the step"
  if "volume_s" not in r:
    return f"exported in {r['export_s']:.1f}s"
  return f"volume {r['volume_s']:.1f}s"


def step_row(r: dict) -> dict:
  s = float(np.median(r["step_times_s"]))
  return {**r, "step_s": s, "voxels_per_s": r["batch"] * r["patch"] ** 3 / s}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--name", default="cpu", help="results file name under benchmarks/results/")
  p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
  p.add_argument("--patch", type=int, default=128, help="the default patch edge (configs/brats)")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--scale-patches", default="64,96", help="more patch edges for the scaling rows")
  p.add_argument("--scale-batches", default="1,4", help="more batch sizes (at the smallest patch)")
  p.add_argument("--cases", type=int, default=2, help="phantom cases for the pipeline rate")
  p.add_argument(
    "--before",
    action="store_true",
    help="also time resfuse with XLA's 3D conv (the pre-rewrite code)",
  )
  p.add_argument(
    "--only",
    choices=["inference"],
    help="run this section alone and merge it into an existing results/<name>.json",
  )
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--kwargs", help=argparse.SUPPRESS)
  p.add_argument("--conv-impl", help=argparse.SUPPRESS)  # a JAX worker's model.conv_impl
  args = p.parse_args(argv)
  if args.worker:
    kwargs = json.loads(args.kwargs)
    if args.conv_impl:
      kwargs["conv_impl"] = args.conv_impl
    result = WORKERS[args.worker](**kwargs)
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
    return result

  import jax
  import torch

  res = {
    "name": args.name,
    "device": str(jax.devices()[0]),
    "cpu_count": os.cpu_count(),
    "versions": {"jax": jax.__version__, "torch": torch.__version__},
    "command": "python -m benchmarks.suite " + " ".join(sys.argv[1:] if argv is None else argv),
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }
  if args.only == "inference":
    return merge_section(args.name, "inference", inference_rows(args.patch), res)
  res["matmul_flops_per_s"] = matmul_rate()
  b, patch, steps = args.batch, args.patch, args.steps
  impls = ["auto", "xla"] if args.before else ["auto"]

  steps_rows = []
  for model in ("resfuse", "resunet"):
    for impl in impls if model == "resfuse" else ["auto"]:
      r = run_worker("jax_step", impl, model_name=model, patch=patch, batch=b, steps=steps)
      steps_rows.append(step_row({"framework": "jax", **r}))
    r = run_worker("torch_step", model_name=model, patch=patch, batch=b, steps=steps)
    steps_rows.append(step_row({"framework": "torch", **r}))
  scale = sorted({int(s) for s in args.scale_patches.split(",") if s})
  small = min([patch, *scale])
  scale_rows = []
  for framework in ("jax", "torch"):
    for s in scale:
      r = run_worker(f"{framework}_step", model_name="resfuse", patch=s, batch=b, steps=steps)
      scale_rows.append(step_row({"framework": framework, **r}))
    for bs in (int(x) for x in args.scale_batches.split(",") if x):
      r = run_worker(f"{framework}_step", model_name="resfuse", patch=small, batch=bs, steps=steps)
      scale_rows.append(step_row({"framework": framework, **r}))
  res["train_step"] = steps_rows
  res["scaling"] = scale_rows
  res["inference"] = inference_rows(patch)
  print("... pipeline", flush=True)
  res["pipeline"] = pipeline_rate(patch, b, args.cases, batches=10)
  res["augmentation"] = run_worker(
    "jax_augment", model_name="resfuse", patch=patch, batch=b, steps=steps
  )
  res["ratios"] = ratios(res)
  return write_results(args.name, res)


def inference_rows(patch: int, batch: int = 4) -> list[dict]:
  """One whole volume by each framework, one after another in this run."""
  kw = {"model_name": "resfuse", "patch": patch, "batch": batch}
  rows = [{"framework": "jax", **run_worker("jax_inference", **kw)}]
  with tempfile.TemporaryDirectory() as tmp:
    path = str(Path(tmp) / "model.onnx")
    export = run_worker("onnx_export", **kw, path=path)
    row = run_worker("onnxruntime_inference", **kw, path=path)
    row.pop("path")
    rows.append({"framework": "onnxruntime", **row, "export_s": export["export_s"]})
  rows.append({"framework": "monai", **run_worker("monai_inference", **kw)})
  return rows


def merge_section(name: str, section: str, rows: list, header: dict) -> dict:
  """Replaces one section of results/<name>.json (its command and date kept beside it)."""
  path = ROOT / "benchmarks" / "results" / f"{name}.json"
  if not path.is_file():
    raise SystemExit(f"--only={section} merges into {path}, which does not exist: run the suite")
  res = json.loads(path.read_text())
  res[section] = rows
  res.setdefault("sections", {})[section] = {k: header[k] for k in ("command", "date", "versions")}
  res["ratios"] = ratios(res)
  return write_results(name, res)


def write_results(name: str, res: dict) -> dict:
  out = ROOT / "benchmarks" / "results"
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(res, indent=2))
  table = markdown(res)
  (out / f"{name}.md").write_text(table)
  print(table)
  return res


def find(rows, **match) -> dict:
  hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
  if len(hits) != 1:
    raise KeyError(f"expected one row matching {match}, found {len(hits)}")
  return hits[0]


def ratios(res: dict) -> dict:
  rows = res["train_step"]
  out = {}
  for model in ("resfuse", "resunet"):
    ours = find(rows, framework="jax", model_name=model, conv_impl="auto")
    ref = find(rows, framework="torch", model_name=model)
    if ours["params"] != ref["params"]:
      raise AssertionError(f"{model}: {ours['params']} parameters in JAX, {ref['params']} in torch")
    out[f"{model}_torch_over_jax_step"] = ref["step_s"] / ours["step_s"]
    out[f"{model}_flops_fraction_of_matmul"] = (
      ours["flops"] / ours["step_s"] / res["matmul_flops_per_s"]
    )
    out[f"{model}_peak_rss_torch_over_jax"] = ref["peak_rss_mb"] / ours["peak_rss_mb"]
  fuse = find(rows, framework="jax", model_name="resfuse", conv_impl="auto")
  unet = find(rows, framework="jax", model_name="resunet", conv_impl="auto")
  out["resfuse_over_resunet_step_jax"] = fuse["step_s"] / unet["step_s"]
  t_fuse = find(rows, framework="torch", model_name="resfuse")
  t_unet = find(rows, framework="torch", model_name="resunet")
  out["resfuse_over_resunet_step_torch"] = t_fuse["step_s"] / t_unet["step_s"]
  inf = {r["framework"]: r for r in res["inference"]}
  out["monai_over_jax_inference"] = inf["monai"]["volume_s"] / inf["jax"]["volume_s"]
  if "onnxruntime" in inf:
    ort_row = inf["onnxruntime"]
    out["monai_over_onnxruntime_inference"] = inf["monai"]["volume_s"] / ort_row["volume_s"]
    out["onnxruntime_over_jax_inference"] = inf["jax"]["volume_s"] / ort_row["volume_s"]
    out["peak_rss_monai_over_onnxruntime"] = inf["monai"]["peak_rss_mb"] / ort_row["peak_rss_mb"]
  consumed = fuse["batch"] / fuse["step_s"]
  out["pipeline_over_step_consumption"] = max(res["pipeline"].values()) / consumed
  if "augmentation" in res:
    aug = res["augmentation"]
    out["augment_share_of_step"] = aug["augment_share_of_step"]
    out["pipeline_over_augmented_step_consumption"] = (
      max(res["pipeline"].values()) / aug["step_patches_per_s"]
    )
  for impl in ("xla",):
    try:
      before = find(rows, framework="jax", model_name="resfuse", conv_impl=impl)
    except KeyError:
      continue
    out[f"resfuse_{impl}_conv_over_auto_step"] = before["step_s"] / fuse["step_s"]
  return out


def markdown(res: dict) -> str:
  lines = [
    f"# {res['name']}: {res['device']}, {res['cpu_count']} CPUs, jax {res['versions']['jax']}, "
    f"torch {res['versions']['torch']} ({res['date']})",
    "",
    f"`{res['command']}`; XLA f32 matmul: {res['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s",
    "",
    "## Training step (median after warm-up)",
    "",
    "| model | framework | conv | patch | batch | params | step s | voxels/s | GFLOP/s | peak RSS MB |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in res["train_step"] + res["scaling"]:
    gflops = f"{r['flops'] / r['step_s'] / 1e9:.1f}" if "flops" in r else ""
    lines.append(
      f"| {r['model_name']} | {r['framework']} | {r.get('conv_impl', '')} | {r['patch']}³ | "
      f"{r['batch']} | {r['params']:,} | {r['step_s']:.2f} | {r['voxels_per_s']:,.0f} | "
      f"{gflops} | {r['peak_rss_mb']:,.0f} |"
    )
  lines += ["", "## Whole-volume inference (240×240×155, 2 sequences, 50% overlap, Gaussian)", ""]
  if "inference" in res.get("sections", {}):
    sec = res["sections"]["inference"]
    lines += [f"Measured apart from the rest: `{sec['command']}` ({sec['date']}).", ""]
  lines += ["| framework | volume s | warm-up s | peak RSS MB |", "|---|---|---|---|"]
  for r in res["inference"]:
    lines.append(
      f"| {r['framework']} | {r['volume_s']:.1f} | {r['warmup_s']:.1f} | {r['peak_rss_mb']:,.0f} |"
    )
  lines += ["", "## Data pipeline", "", "| workers | patches/s |", "|---|---|"]
  for k, v in res["pipeline"].items():
    lines.append(f"| {k.split('_')[-2]} | {v:.2f} |")
  if "augmentation" in res:
    a = res["augmentation"]
    lines += [
      "",
      "## Device-side augmentation (nnU-Net's set, configs/brats.py)",
      "",
      f"step with augmentation {a['step_s_augmented']:.2f} s, without {a['step_s_plain']:.2f} s; "
      f"the augmentation alone {a['augment_s']:.2f} s ({a['augment_share_of_step']:.1%})",
    ]
  lines += ["", "## Ratios (targets: issue 7)", "", "| ratio | value |", "|---|---|"]
  lines += [f"| {k} | {v:.3f} |" for k, v in res["ratios"].items()]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
