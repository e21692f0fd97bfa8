"""Per-backend defaults for the settings whose best value depends on the hardware.

Each is a config field whose value ``auto`` is resolved here, outside traced
code, for the backend JAX runs on. The CPU column is measured (BUILD_NOTES.md
§6, benchmarks/results/cpu.md). The GPU column has NOT been measured yet: it is
the choice that avoids XLA's known GPU pitfalls (conv_transpose and strided-conv
backward passes, jax#31662), with cuDNN's 3D convolutions and bf16 compute.
``python -m benchmarks.gpu_check`` times every alternative on a GPU and prints
the column it measured; copy that here (BUILD_NOTES.md §8 has the procedure).
"""

from __future__ import annotations

import os

import jax

from resfuse_jax.errors import ConfigError

# field -> its allowed values (besides "auto")
CHOICES = {
  "conv_impl": ("xla", "planes"),  # model.conv_impl: XLA's 3D conv | 2D convs over depth planes
  "downsample": ("space_to_depth", "strided"),  # model.downsample: stride-2 3x3x3 convs
  "upsample": ("depth_to_space", "transpose"),  # model.upsample: k2 s2 transposed convs
  "conv_layout": ("default", "nhwc", "nchw"),  # model.conv_layout: XLA GPU conv layout flag
  "compute_dtype": ("float32", "bfloat16"),  # train.compute_dtype: activations and matmuls
  "tiling": ("host", "device"),  # where the sliding window cuts and blends (inference.tiler)
}

DEFAULTS = {
  "cpu": {
    "conv_impl": "planes",
    "downsample": "space_to_depth",
    "upsample": "depth_to_space",
    "conv_layout": "default",
    "compute_dtype": "float32",
    "tiling": "host",
    "eval_batch_size": 4,
  },
  "gpu": {  # unmeasured: see the module docstring
    "conv_impl": "xla",
    "downsample": "space_to_depth",
    "upsample": "depth_to_space",
    "conv_layout": "default",
    "compute_dtype": "bfloat16",
    "tiling": "host",  # the device tiler measured 10x faster on an H200: issue 27 decides
    "eval_batch_size": 8,
  },
}

LAYOUT_FLAGS = {"nhwc": "--xla_gpu_force_conv_nhwc=true", "nchw": "--xla_gpu_force_conv_nchw=true"}


def platform(backend: str | None = None) -> str:
  """'cpu' or 'gpu' (every accelerator takes the GPU column)."""
  return "cpu" if (backend or jax.default_backend()) == "cpu" else "gpu"


def resolve(field: str, value, backend: str | None = None, where: str = ""):
  """A config value, with ``auto`` (or 0 for eval_batch_size) replaced by the backend's default."""
  where = where or field
  if field == "eval_batch_size":
    if int(value) < 0:
      raise ConfigError(f"{where} must be > 0, or 0 for the backend's default; got {value}")
    return int(value) or DEFAULTS[platform(backend)][field]
  if value == "auto":
    return DEFAULTS[platform(backend)][field]
  if value not in CHOICES[field]:
    raise ConfigError(f"{where} must be one of auto, {', '.join(CHOICES[field])}; got {value!r}")
  return value


def apply_conv_layout(layout: str) -> None:
  """Sets XLA's GPU convolution layout flag; only possible before JAX starts its backends.

  ``default`` and ``auto`` leave XLA's own heuristic (NHWC for bf16 on tensor cores).
  """
  if layout not in ("auto", *CHOICES["conv_layout"]):
    raise ConfigError(
      f"model.conv_layout must be one of auto, {', '.join(CHOICES['conv_layout'])}; got {layout!r}"
    )
  flag = LAYOUT_FLAGS.get(layout)
  if flag is None or flag in os.environ.get("XLA_FLAGS", ""):
    return
  from jax._src import xla_bridge  # no public API says whether the backends have started

  if xla_bridge.backends_are_initialized():
    raise ConfigError(
      f"model.conv_layout={layout} must be set before JAX starts: run with XLA_FLAGS={flag} instead"
    )
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
