"""ONNX routes for the window function, side by side in one run (issue 25, point 1).

  python -m benchmarks.onnx_routes --features=16,32,64,128,256 --window=64 --volume=96,96,96

Compares, on ONE ResFuse with the same random parameters, whole-volume sliding-window
time under onnxruntime and OpenVINO (f32), interleaved, best of ``--repeats``:
- ``hand``: the hand-written graph this replaced (`serving/onnx_graph.py` at ``--hand_rev``,
  read with ``git show``, so the comparison stays reproducible after its deletion);
- ``traced``: `onnx_graph.to_onnx` as exported (textbook conv plan, InstanceNorm fused);
- ``traced_rewrites``: the same traced with the training plan's space-to-depth /
  depth-to-space rewrites;
- ``traced_unfused``: the textbook plan with InstanceNorm left as its primitives.
Writes ``benchmarks/results/onnx_routes_<window>.json`` (``--output``): times, ratios to ``hand``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HAND_REV = "438a2b5"  # the last commit with the hand-written graph
REGIONS = 3


def hand_module(rev: str):
  source = subprocess.run(
    ["git", "show", f"{rev}:resfuse_jax/serving/onnx_graph.py"],
    cwd=ROOT,
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  path = Path(tempfile.mkdtemp()) / "hand_onnx_graph.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location("hand_onnx_graph", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def export_routes(features, window, rev: str, folder: Path, names=None) -> dict:
  """Route name -> (path of model.onnx, export seconds, node count)."""
  import jax
  import jax.numpy as jnp

  from resfuse_jax.models import convolution
  from resfuse_jax.models.resfuse import ResFuse
  from resfuse_jax.serving import onnx_graph

  model = ResFuse(tuple(features), REGIONS)
  dummy = jnp.zeros((1, *window, 1))
  params = jax.jit(model.init)(jax.random.key(0), dummy, dummy)["params"]
  rewrites = convolution.ConvPlan("xla", "space_to_depth", "depth_to_space")
  routes = {
    "hand": lambda: hand_module(rev).to_onnx(model, params, window),
    "traced": lambda: onnx_graph.to_onnx(model, params, window),
    "traced_rewrites": lambda: onnx_graph.to_onnx(model, params, window, plan=rewrites),
    "traced_unfused": lambda: onnx_graph.to_onnx(model, params, window, fuse_norms=False),
  }
  out = {}
  for name, export in routes.items():
    if names and name not in names:
      continue
    t = time.perf_counter()
    proto = export()
    seconds = time.perf_counter() - t
    path = folder / f"{name}.onnx"
    path.write_bytes(proto.SerializeToString())
    out[name] = (path, seconds, len(proto.graph.node))
  return out


def openvino_window(path: Path):
  """The package's OpenVINO window (f32, one window per request, imported without telemetry)."""
  from resfuse_jax.inference import openvino_runtime

  return openvino_runtime.OpenVinoWindow(path, cache=False)


def measure(routes: dict, window, volume_shape, repeats: int) -> dict:
  from resfuse_jax.inference import onnx_runtime, tiler

  volume = np.random.default_rng(0).normal(size=(*volume_shape, 2)).astype(np.float32)
  windows = {}
  for name, (path, _, _) in routes.items():
    windows[(name, "onnxruntime")] = onnx_runtime.OnnxWindow(path)
    windows[(name, "openvino")] = openvino_window(path)
  times = {key: [] for key in windows}
  outputs = {}
  for predict in windows.values():  # warm-up (first-run allocations), not timed
    predict(volume[None, : window[0], : window[1], : window[2]])
  for _ in range(repeats):  # interleaved: every route and runtime once per round
    for key, predict in windows.items():
      t = time.perf_counter()
      outputs[key] = tiler.sliding_window(
        predict, volume, window, overlap=0.5, batch_size=1, fixed_batch=False
      )
      times[key].append(time.perf_counter() - t)
  reference = outputs[("hand", "onnxruntime")]
  rows = {}
  for (name, runtime), seconds in times.items():
    best = min(seconds)
    hand = min(times[("hand", runtime)])
    rows[f"{name}/{runtime}"] = {
      "best_s": best,
      "all_s": seconds,
      "over_hand": best / hand,
      "max_abs_prob_diff_vs_hand_ort": float(np.abs(outputs[(name, runtime)] - reference).max()),
    }
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--features", default="16,32,64,128,256")
  parser.add_argument("--window", type=int, default=64)
  parser.add_argument("--volume", default="96,96,96")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--hand_rev", default=HAND_REV)
  parser.add_argument("--routes", default="", help="comma-separated subset (default: all)")
  parser.add_argument("--output", default="", help="default results/onnx_routes_<window>.json")
  args = parser.parse_args(argv)
  features = [int(f) for f in args.features.split(",")]
  window = (args.window,) * 3
  volume = tuple(int(v) for v in args.volume.split(","))
  with tempfile.TemporaryDirectory() as folder:
    names = [n for n in args.routes.split(",") if n]
    routes = export_routes(features, window, args.hand_rev, Path(folder), names)
    rows = measure(routes, window, volume, args.repeats)
  result = {
    "command": " ".join(["python -m benchmarks.onnx_routes", *(argv or sys.argv[1:])]),
    "features": features,
    "window": list(window),
    "volume": list(volume),
    "repeats": args.repeats,
    "exports": {n: {"export_s": s, "nodes": k} for n, (_, s, k) in routes.items()},
    "runs": rows,
  }
  output = Path(args.output or ROOT / f"benchmarks/results/onnx_routes_{args.window}.json")
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(result, indent=2) + "\n")
  for key, row in rows.items():
    print(f"{key:32s} best {row['best_s']:8.3f} s  x{row['over_hand']:.3f} of hand")
  print(json.dumps(result["exports"]))


if __name__ == "__main__":
  main()
