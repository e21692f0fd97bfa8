"""OpenVINO's CPU settings around the tiler, measured (issue 31, point 3).

  python -m benchmarks.openvino_settings [--volume=192,192,160] [--patch=128]

One ResFuse 16–256 graph (``onnx_export``'s, random initialisation), one volume of
noise, each setting in a fresh process (compiled without the model cache): windows per
inference request (``windows_per_call``: OpenVINO batches them), streams (requests in
flight: ``NUM_STREAMS``), threads (``INFERENCE_NUM_THREADS``, 0 = all cores), and how
much of the volume's time the host spends outside the runtime (cutting, Gaussian
blending: what overlapping stitching with inference could at most save). Writes
results/openvino_settings.json and .md; the default is the fastest row.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import measure, suite, workloads

MODULE = "benchmarks.openvino_settings"
RESULTS = Path(__file__).parent / "results"
SETTINGS = {"windows_per_request": (1, 2), "streams": (1, 2), "threads": (0,)}


def one_setting(volume, patch, path, windows_per_request, streams, threads) -> dict:
  """Worker: one volume with one setting; the time inside the runtime summed apart."""
  from resfuse_jax.inference import openvino_runtime, tiler

  config = suite.brats_config("resfuse", patch, 4)
  t = time.perf_counter()
  window = openvino_runtime.OpenVinoWindow(
    path, threads=threads, streams=streams, max_batch=windows_per_request, cache=False
  )
  batch = max(4, window.windows_per_call)
  window(np.zeros((batch, *config.data.patch_size, 2), np.float32))
  compile_s, inside = time.perf_counter() - t, []

  def timed(tiles):
    start = time.perf_counter()
    out = window(tiles)
    inside.append(time.perf_counter() - start)
    return out

  data = workloads.random_volume(tuple(volume))
  t = time.perf_counter()
  tiler.sliding_window(timed, data, tuple(config.data.patch_size), overlap=0.5, batch_size=batch)
  volume_s = time.perf_counter() - t
  return {
    "compile_s": compile_s,
    "volume_s": volume_s,
    "runtime_s": sum(inside),
    "host_share": 1 - sum(inside) / volume_s,
    "windows_per_call": batch,
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--volume", default="192,192,160", help="volume shape (8 windows at 128³)")
  p.add_argument("--patch", type=int, default=128)
  measure.add_worker_flags(p)
  args = p.parse_args(argv)
  if args.worker:
    return measure.run_worker({"one_setting": one_setting}, args.worker, args.kwargs)
  volume = [int(v) for v in args.volume.split(",")]
  command = f"python -m {MODULE} " + " ".join(sys.argv[1:] if argv is None else argv)
  res = {"name": "openvino_settings", **measure.environment(command), "volume": volume}
  with tempfile.TemporaryDirectory() as tmp:
    path = str(Path(tmp) / "model.onnx")
    suite.onnx_export("resfuse", args.patch, 4, path)
    rows = []
    for wpr, streams, threads in itertools.product(*SETTINGS.values()):
      kw = {"volume": volume, "patch": args.patch, "path": path}
      setting = {"windows_per_request": wpr, "streams": streams, "threads": threads}
      rows.append(measure.run_isolated(MODULE, "one_setting", **kw, **setting))
  for row in rows:
    row.pop("path", None)
  res["rows"] = rows
  res["fastest"] = min(rows, key=lambda r: r["volume_s"])
  return measure.write_report(RESULTS, "openvino_settings", res, markdown)


def markdown(res: dict) -> str:
  lines = [f"# OpenVINO settings: {measure.header_line(res)}", "", f"`{res['command']}`", ""]
  lines += [f"Volume {'×'.join(map(str, res['volume']))}, ResFuse 16–256, 128³ windows.", ""]
  cols = ["windows/request", "streams", "threads", "windows/call", "volume s", "runtime s"]
  lines += measure.table(
    cols + ["host share", "compile s", "peak RSS MB"],
    (
      [r["windows_per_request"], r["streams"], r["threads"], r["windows_per_call"],
       f"{r['volume_s']:.1f}", f"{r['runtime_s']:.1f}", f"{r['host_share']:.1%}",
       f"{r['compile_s']:.1f}", f"{r['peak_rss_mb']:,.0f}"]
      for r in res["rows"]
    ),
  )  # fmt: skip
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
