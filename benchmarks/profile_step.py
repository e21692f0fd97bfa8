"""Where a training step's time goes: XLA ops of one traced step, grouped by kind.

  python -m benchmarks.profile_step [--model resfuse] [--patch 64] [--batch 2] [--top 15]

Traces one step (after a warm-up step) with the JAX profiler and sums the time of
every XLA op event, grouped into convolution / dot / fusion / copy / other, and
prints the most expensive ops with their HLO names. Writes
benchmarks/results/profile_<model>_<patch>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from benchmarks import suite

ROOT = Path(__file__).resolve().parents[1]

# First match wins: a collective or a convolution fused with its bias stays what it is.
KINDS = (
  ("collective", ("all-reduce", "all-gather", "reduce-scatter", "collective", "all-to-all")),
  ("convolution", ("conv", "cudnn")),
  ("dot", ("dot", "gemm", "cublas")),
  ("transpose/copy", ("transpose", "copy", "bitcast")),
  ("reduce", ("reduce",)),
  ("pad/slice/concatenate", ("pad", "slice", "concatenate", "dynamic-update")),
  ("fusion", ("fusion",)),
  ("command buffer", ("command_buffer",)),  # XLA GPU: a CUDA graph of fusions, timed as one op
)


def kind_of(name: str) -> str:
  """An HLO op's kind from its name (``loop_add_fusion.3``, ``cudnn-conv.1``, ``copy.7``)."""
  base = name.split("(")[0].lower()
  for kind, keys in KINDS:
    if any(k in base for k in keys):
      return kind
  return "other"


def op_events(xspace: bytes, device_only: bool = False) -> list[tuple[str, float]]:
  """(op name, seconds) of every XLA op a traced step executed.

  ``device_only``: when the trace has accelerator planes (``/device:GPU:0``), only their
  op events, from the "XLA Ops" line where there is one (its kernels' stream lines
  repeat the same ops); the host's events are launches there, not compute.
  """
  planes = list(jax.profiler.ProfileData.from_serialized_xspace(xspace).planes)
  devices = [p for p in planes if p.name.startswith("/device:") and _device_ops(p)]
  if device_only and devices:
    return [e for p in devices for e in _device_ops(p)]
  events = []
  for plane in planes:
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        if "hlo_op" in stats or "hlo_module" in stats:
          events.append((str(stats.get("hlo_op", ev.name)), ev.duration_ns / 1e9))
  return events


def trace_lines(xspace: bytes) -> dict[str, int]:
  """Events per plane/line of a trace: how to read its op events on an unfamiliar backend."""
  planes = jax.profiler.ProfileData.from_serialized_xspace(xspace).planes
  return {f"{p.name}/{line.name}": len(list(line.events)) for p in planes for line in p.lines}


def _device_ops(plane) -> list[tuple[str, float]]:
  lines = list(plane.lines)
  ops_lines = [line for line in lines if line.name == "XLA Ops"]
  out = []
  for line in ops_lines or lines:
    for ev in line.events:
      stats = dict(ev.stats)
      if "hlo_op" in stats or ops_lines:
        out.append((str(stats.get("hlo_op", ev.name)), ev.duration_ns / 1e9))
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="resfuse")
  p.add_argument("--patch", type=int, default=64)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--top", type=int, default=15)
  args = p.parse_args()
  from benchmarks import workloads

  config = suite.brats_config(args.model, args.patch, args.batch)
  r = workloads.step_profile(config, warmup=1, top=args.top)
  print(
    f"{args.model} {args.patch}^3 batch {args.batch}: step {r['ms']:.0f} ms wall, ops {r['ops_ms']:.0f} ms"
  )
  for kind, ms in r["by_kind_ms"].items():
    print(f"  {kind:22s} {ms:9.1f} ms  {100 * r['by_kind_share'][kind]:5.1f}%")
  print("top ops:")
  for name, ms in r["top_ops_ms"]:
    print(f"  {ms:9.2f} ms  {name}")
  out = ROOT / "benchmarks" / "results" / f"profile_{args.model}_{args.patch}.json"
  out.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
  main()
