"""Why the training step is slow on XLA CPU: forward, input-gradient and weight-gradient
convolutions of every level's shape, ours (both `convolution.conv3d` implementations) against
PyTorch's Conv3d (oneDNN), in one run.

  python -m benchmarks.conv_kernels [--batch 4] [--shapes 128x16,64x32,32x64,16x128,8x256]

Shapes are edge x channels of the default BraTS model's levels at patch 128³; batch 4 is
ResFuse's 2B (both branches stacked). Writes benchmarks/results/conv_kernels.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from resfuse_jax.models import convolution

ROOT = Path(__file__).resolve().parents[1]

PAD = ((1, 1),) * 3


def best_of(fn, reps: int = 3) -> float:
  fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def jax_times(impl: str, x, w) -> dict[str, float]:
  conv = lambda x, w: convolution.conv3d(x, w, PAD, impl)  # noqa: E731
  dy = jnp.ones(x.shape[:-1] + (w.shape[-1],), x.dtype)
  fwd = jax.jit(conv)
  dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return {
    "fwd": best_of(lambda: jax.block_until_ready(fwd(x, w))),
    "dx": best_of(lambda: jax.block_until_ready(dx(x, w, dy))),
    "dw": best_of(lambda: jax.block_until_ready(dw(x, w, dy))),
  }


def torch_times(x: np.ndarray, c_out: int) -> dict[str, float]:
  import torch

  fmt = torch.channels_last_3d
  conv = torch.nn.Conv3d(x.shape[-1], c_out, 3, padding=1).to(memory_format=fmt)
  xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous(memory_format=fmt)
  with torch.no_grad():
    dy = torch.ones_like(conv(xt))

  def fwd():
    with torch.no_grad():
      conv(xt)

  def grad(inputs):
    xt.requires_grad_(inputs)
    conv.weight.requires_grad_(not inputs)
    conv.bias.requires_grad_(not inputs)
    y = conv(xt)
    torch.autograd.grad(y, [xt] if inputs else [conv.weight], dy)

  out = {"fwd": best_of(fwd)}
  out["dx"] = best_of(lambda: grad(True))  # includes a forward: an upper bound
  out["dw"] = best_of(lambda: grad(False))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--shapes", default="128x16,64x32,32x64,16x128,8x256")
  args = p.parse_args()
  rows = []
  for shape in args.shapes.split(","):
    edge, c = (int(v) for v in shape.split("x"))
    x = np.random.default_rng(0).normal(size=(args.batch, edge, edge, edge, c)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(3, 3, 3, c, c)).astype(np.float32) * 0.1
    flops = 2 * 27 * c * c * args.batch * edge**3
    for impl, times in (
      ("jax planes", jax_times("planes", jnp.asarray(x), jnp.asarray(w))),
      ("jax xla", jax_times("xla", jnp.asarray(x), jnp.asarray(w))),
      ("torch", torch_times(x, c)),
    ):
      row = {"edge": edge, "channels": c, "impl": impl, **times}
      row.update({f"{k}_gflops": flops / v / 1e9 for k, v in times.items()})
      rows.append(row)
      print(
        f"{edge}³ x {c:3d} {impl:10s} "
        + " ".join(f"{k} {times[k] * 1e3:7.1f} ms ({row[k + '_gflops']:5.1f} GF/s)" for k in times),
        flush=True,
      )
  out = ROOT / "benchmarks" / "results"
  out.mkdir(parents=True, exist_ok=True)
  (out / "conv_kernels.json").write_text(json.dumps({"batch": args.batch, "rows": rows}, indent=2))
  lines = [
    f"# One 3x3x3 conv, batch {args.batch}: ms (GFLOP/s)",
    "",
    "| shape | impl | forward | input grad | weight grad |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    cells = [f"{r[k] * 1e3:.0f} ({r[k + '_gflops']:.0f})" for k in ("fwd", "dx", "dw")]
    lines.append(f"| {r['edge']}³×{r['channels']} | {r['impl']} | " + " | ".join(cells) + " |")
  (out / "conv_kernels.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
