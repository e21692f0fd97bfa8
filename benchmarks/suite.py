"""Every speed measurement of issue 7, side by side in one run: ours (JAX) vs PyTorch/MONAI.

  pip install -e '.[bench]'
  python -m benchmarks.suite --name=cpu            # ~1 h on 2 CPU cores
  python -m benchmarks.suite --name=cpu --before   # adds XLA's 3D conv (the code before the rewrites)

Run from the repository root. Writes benchmarks/results/<name>.json and <name>.md.
A list of measurements run by the harness (measure.py) that the GPU check also runs.
Each model measurement runs in a fresh process (its peak RSS is that process's alone);
times are medians over --steps steps after a warm-up step, so compilation is
reported apart from them. The conv implementation of a JAX measurement is set in
its config (``model.conv_impl``), not through the environment.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import measure, workloads

MODULE = "benchmarks.suite"
ROOT = measure.ROOT
RESULTS = measure.RESULTS
BRATS_CONFIG = ROOT / "configs" / "brats.py"
VOLUME = (240, 240, 155)  # one BraTS case


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


# --- workers: each in a fresh process (measure.run_isolated), arguments as JSON ------------------


def jax_step(model_name, patch, batch, steps, conv_impl=None) -> dict:
  return workloads.jax_step(brats_config(model_name, patch, batch, conv_impl), steps)


def jax_augment(model_name, patch, batch, steps) -> dict:
  """The step with nnU-Net's augmentation on the device (crops in), without, and it alone."""
  from benchmarks import pipeline_throughput

  return pipeline_throughput.step_rates(brats_config(model_name, patch, batch), steps)


def torch_step(model_name, patch, batch, steps) -> dict:
  return workloads.torch_step(brats_config(model_name, patch, batch), steps)


def jax_inference(model_name, patch, batch, conv_impl=None, out=None) -> dict:
  config = brats_config(model_name, patch, batch, conv_impl)
  return workloads.jax_volume(config, VOLUME, batch, out=out)


def onnx_export(model_name, patch, batch, path) -> dict:
  return workloads.onnx_export(brats_config(model_name, patch, batch), path)


def onnxruntime_inference(model_name, patch, batch, path, out=None) -> dict:
  config = brats_config(model_name, patch, batch)
  return workloads.onnxruntime_volume(config, VOLUME, batch, path, out=out)


def openvino_inference(model_name, patch, batch, path, precision="f32", out=None) -> dict:
  config = brats_config(model_name, patch, batch)
  return workloads.openvino_volume(config, VOLUME, batch, path, precision, out=out)


def monai_inference(model_name, patch, batch) -> dict:
  return workloads.monai_volume(brats_config(model_name, patch, batch), VOLUME, batch)


WORKERS = {
  "jax_step": jax_step,
  "jax_augment": jax_augment,
  "torch_step": torch_step,
  "jax_inference": jax_inference,
  "onnx_export": onnx_export,
  "onnxruntime_inference": onnxruntime_inference,
  "openvino_inference": openvino_inference,
  "monai_inference": monai_inference,
}


def isolated(name: str, kind: str, **kwargs) -> measure.Measurement:
  return measure.Measurement(name, lambda: measure.run_isolated(MODULE, kind, **kwargs))


# --- the list ------------------------------------------------------------------------------------


def measurements(args, tmp: str) -> list[measure.Measurement]:
  """The suite's measurements in order; names group them into the results' sections."""
  b, patch, steps = args.batch, args.patch, args.steps
  out = [measure.Measurement("matmul", workloads.matmul_rate)]
  for model in ("resfuse", "resunet"):
    for impl in ["auto", "xla"] if args.before and model == "resfuse" else ["auto"]:
      kw = {"model_name": model, "patch": patch, "batch": b, "steps": steps, "conv_impl": impl}
      out.append(isolated(f"train_step/jax/{model}/{impl}", "jax_step", **kw))
    kw = {"model_name": model, "patch": patch, "batch": b, "steps": steps}
    out.append(isolated(f"train_step/torch/{model}", "torch_step", **kw))
  scale = sorted({int(s) for s in args.scale_patches.split(",") if s})
  shapes = [(s, b) for s in scale]
  shapes += [(min([patch, *scale]), int(x)) for x in args.scale_batches.split(",") if x]
  for framework in ("jax", "torch"):
    for p, bs in shapes:
      kw = {"model_name": "resfuse", "patch": p, "batch": bs, "steps": steps}
      out.append(isolated(f"scaling/{framework}/{p}/{bs}", f"{framework}_step", **kw))
  out += inference_measurements(patch, str(Path(tmp) / "model.onnx"))
  config = brats_config("resfuse", patch, b)
  pipeline = (config, VOLUME, args.cases, (0, 2), 10)
  out.append(measure.Measurement("pipeline", lambda: workloads.phantom_pipeline(*pipeline)))
  kw = {"model_name": "resfuse", "patch": patch, "batch": b, "steps": steps}
  return out + [isolated("augmentation", "jax_augment", **kw)]


def inference_measurements(patch: int, onnx_path: str, batch: int = 4) -> list:
  """One whole volume by each framework, one after another in this run.

  The JAX, onnxruntime and OpenVINO runs (one model, one initialisation) leave their
  probabilities beside ``onnx_path`` for `agreement`; MONAI runs the PyTorch twin, whose
  weights are its own, so it has no agreement row.
  """
  kw = {"model_name": "resfuse", "patch": patch, "batch": batch}
  folder = Path(onnx_path).parent
  out = {"out": str(folder / "jax.npy")}
  todo = [
    isolated("inference/jax", "jax_inference", **kw, **out),
    isolated("inference/onnx_export", "onnx_export", **kw, path=onnx_path),
    isolated(
      "inference/onnxruntime", "onnxruntime_inference", **kw, path=onnx_path,
      out=str(folder / "onnxruntime.npy"),
    ),
  ]  # fmt: skip
  for precision in openvino_precisions():
    todo.append(
      isolated(
        f"inference/openvino_{precision}", "openvino_inference", **kw, path=onnx_path,
        precision=precision, out=str(folder / f"openvino_{precision}.npy"),
      )
    )  # fmt: skip
  return todo + [isolated("inference/monai", "monai_inference", **kw)]


def openvino_precisions() -> list[str]:
  """f32, and bf16 where this CPU has it (OpenVINO's own capability list); `skipped`
  says why a row is left out."""
  from resfuse_jax.inference import openvino_runtime

  if not openvino_runtime.available():
    return []
  return ["f32", "bf16"] if openvino_runtime.cpu()["bf16"] else ["f32"]


def skipped() -> dict[str, str]:
  """{row: why} for the inference rows this machine cannot measure, so that a missing row
  is explained in the results (`finish` records it beside the ratios) instead of silent."""
  from resfuse_jax.inference import openvino_runtime

  if not openvino_runtime.available():
    return {"openvino": f"not measured: openvino is not installed: {openvino_runtime.INSTALL_HINT}"}
  here = openvino_runtime.cpu()
  if here["bf16"]:
    return {}
  caps = ", ".join(here["capabilities"])
  why = f"this CPU ({here['name']}) has no BF16 (OpenVINO OPTIMIZATION_CAPABILITIES: [{caps}])"
  return {"openvino_bf16": f"not measured: {why}"}


def agreement(results: dict[str, dict]) -> None:
  """Each backend's probabilities against JAX's: max |Δprob| and the share of equal labels
  (probability > 0.5 per region), added to its record; the files are removed."""
  reference_path = results["inference/jax"].get("out")
  if not reference_path:
    return
  reference = np.load(reference_path)  # a recorded output that is missing is an error
  for name, record in results.items():
    path = record.get("out")
    if name == "inference/jax" or not path:
      continue
    probs = np.load(path)
    record["max_abs_prob_diff_vs_jax"] = float(np.abs(probs - reference).max())
    record["labels_equal_vs_jax"] = float(np.mean((probs > 0.5) == (reference > 0.5)))
  for record in results.values():
    if record.get("out"):
      Path(record.pop("out")).unlink(missing_ok=True)


def sections(results: dict[str, dict]) -> dict:
  """{name: record} -> the results file's sections (rows as the recorded files hold them)."""

  def rows(prefix):
    return [
      step_row({"framework": name.split("/")[1], **r})
      for name, r in results.items()
      if name.startswith(prefix)
    ]

  out = {"train_step": rows("train_step/"), "scaling": rows("scaling/")}
  if "matmul" in results:
    out["matmul_flops_per_s"] = results["matmul"]["flops_per_s"]
  if "inference/jax" in results:
    out["inference"] = inference_rows(results)
  for name in ("pipeline", "augmentation"):
    if name in results:
      out[name] = {k: v for k, v in results[name].items() if k != "wall_s"}
  return out


def inference_rows(results: dict[str, dict]) -> list[dict]:
  agreement(results)
  ort = {k: v for k, v in results["inference/onnxruntime"].items() if k != "path"}
  ort["export_s"] = results["inference/onnx_export"]["export_s"]
  rows = [{"framework": "jax", **results["inference/jax"]}, {"framework": "onnxruntime", **ort}]
  for name, record in results.items():
    if name.startswith("inference/openvino_"):
      framework = name.split("/")[1].replace("_f32", "")  # openvino (f32), openvino_bf16
      rows.append({"framework": framework, **{k: v for k, v in record.items() if k != "path"}})
  return rows + [{"framework": "monai", **results["inference/monai"]}]


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
    "--before", action="store_true", help="also time resfuse with XLA's 3D conv (pre-rewrite)"
  )
  p.add_argument(
    "--only",
    choices=["inference"],
    help="run this section alone and merge it into an existing results/<name>.json",
  )
  measure.add_worker_flags(p)
  args = p.parse_args(argv)
  if args.worker:
    return measure.run_worker(WORKERS, args.worker, args.kwargs)
  command = f"python -m {MODULE} " + " ".join(sys.argv[1:] if argv is None else argv)
  res = {"name": args.name, **measure.environment(command)}
  with tempfile.TemporaryDirectory() as tmp:  # sections() reads the probabilities left here
    todo = measurements(args, tmp)
    results, failed = measure.run_measurements(todo, only=[f"{args.only}/"] if args.only else ())
    if failed:
      errors = {k: r["error"] for k, r in results.items() if "error" in r}
      raise SystemExit(f"the suite wrote nothing: {errors}")
    values = sections(results)
  return finish(args.name, values, res, args.only)


def finish(name: str, values: dict, header: dict, only: str | None = None) -> dict:
  """Writes results/<name>.json and .md: the whole run, or ``only`` its section merged in."""
  if only:
    res = measure.merge_section(RESULTS / f"{name}.json", only, values[only], header)
  else:
    res = {**header, **values}
  res["ratios"] = ratios(res)
  res["skipped"] = skipped()  # this machine's: a merged section is measured here too
  return measure.write_report(RESULTS, name, res, markdown)


def find(rows, **match) -> dict:
  hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
  if len(hits) != 1:
    raise KeyError(f"expected one row matching {match}, found {len(hits)}")
  return hits[0]


def ratios(res: dict) -> dict:
  """The issue's targets: ours against the references measured in the same run."""
  rows, out = res["train_step"], {}
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
  return out | inference_ratios(res["inference"]) | data_ratios(res, fuse)


def inference_ratios(rows: list[dict]) -> dict:
  inf = {r["framework"]: r for r in rows}
  out = {"monai_over_jax_inference": inf["monai"]["volume_s"] / inf["jax"]["volume_s"]}
  if "onnxruntime" in inf:
    ort_row = inf["onnxruntime"]
    out["monai_over_onnxruntime_inference"] = inf["monai"]["volume_s"] / ort_row["volume_s"]
    out["onnxruntime_over_jax_inference"] = inf["jax"]["volume_s"] / ort_row["volume_s"]
    out["peak_rss_monai_over_onnxruntime"] = inf["monai"]["peak_rss_mb"] / ort_row["peak_rss_mb"]
  for name in ("openvino", "openvino_bf16"):
    if name in inf:
      row = inf[name]
      out[f"monai_over_{name}_inference"] = inf["monai"]["volume_s"] / row["volume_s"]
      out[f"peak_rss_monai_over_{name}"] = inf["monai"]["peak_rss_mb"] / row["peak_rss_mb"]
  return out


def data_ratios(res: dict, fuse: dict) -> dict:
  consumed = fuse["batch"] / fuse["step_s"]  # patches/s the step takes
  out = {"pipeline_over_step_consumption": max(res["pipeline"].values()) / consumed}
  if "augmentation" in res:
    aug = res["augmentation"]
    out["augment_share_of_step"] = aug["augment_share_of_step"]
    out["pipeline_over_augmented_step_consumption"] = (
      max(res["pipeline"].values()) / aug["step_patches_per_s"]
    )
  rows = res["train_step"]
  for impl in ("xla",):
    try:
      before = find(rows, framework="jax", model_name="resfuse", conv_impl=impl)
    except KeyError:
      continue
    out[f"resfuse_{impl}_conv_over_auto_step"] = before["step_s"] / fuse["step_s"]
  return out


def markdown(res: dict) -> str:
  lines = [f"# {res['name']}: {measure.header_line(res)}", ""]
  lines += [f"`{res['command']}`; XLA f32 matmul: {res['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s"]
  lines += ["", "## Training step (median after warm-up)", ""]
  columns = "model framework conv patch batch params".split() + ["step s", "voxels/s", "GFLOP/s"]
  lines += measure.table(columns + ["peak RSS MB"], map(step_cells, res["train_step"] + res["scaling"]))  # fmt: skip
  lines += ["", "## Whole-volume inference (240×240×155, 2 sequences, 50% overlap, Gaussian)", ""]
  if "inference" in res.get("sections", {}):
    sec = res["sections"]["inference"]
    lines += [f"Measured apart from the rest: `{sec['command']}` ({sec['date']}).", ""]
  lines += measure.table(
    ["framework", "volume s", "warm-up s", "peak RSS MB", "max |Δprob| vs JAX", "labels = JAX"],
    ([r["framework"], f"{r['volume_s']:.1f}", f"{r['warmup_s']:.1f}", f"{r['peak_rss_mb']:,.0f}",
      _agree(r, "max_abs_prob_diff_vs_jax", "{:.2e}"), _agree(r, "labels_equal_vs_jax", "{:.4%}")]
     for r in res["inference"]),
  )  # fmt: skip
  if res.get("skipped"):
    lines += [""] + [f"- {row}: {why}" for row, why in res["skipped"].items()]
  lines += ["", "## Data pipeline", ""]
  lines += measure.table(
    ["workers", "patches/s"], ([k.split("_")[-2], f"{v:.2f}"] for k, v in res["pipeline"].items())
  )
  if "augmentation" in res:
    a = res["augmentation"]
    lines += [
      "",
      "## Device-side augmentation (nnU-Net's set, configs/brats.py)",
      "",
      f"step with augmentation {a['step_s_augmented']:.2f} s, without {a['step_s_plain']:.2f} s; "
      f"the augmentation alone {a['augment_s']:.2f} s ({a['augment_share_of_step']:.1%})",
    ]
  lines += ["", "## Ratios (targets: issue 7)", ""]
  lines += measure.table(["ratio", "value"], ([k, f"{v:.3f}"] for k, v in res["ratios"].items()))
  return "\n".join(lines) + "\n"


def step_cells(r: dict) -> list:
  gflops = f"{r['flops'] / r['step_s'] / 1e9:.1f}" if "flops" in r else ""
  return [
    r["model_name"], r["framework"], r.get("conv_impl", ""), f"{r['patch']}³", r["batch"],
    f"{r['params']:,}", f"{r['step_s']:.2f}", f"{r['voxels_per_s']:,.0f}", gflops,
    f"{r['peak_rss_mb']:,.0f}",
  ]  # fmt: skip


def _agree(row: dict, key: str, fmt: str) -> str:
  return fmt.format(row[key]) if key in row else ""


if __name__ == "__main__":
  main()
