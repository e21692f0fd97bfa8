"""Per-backend defaults for the settings whose best value depends on the hardware.

Each is a config field whose value ``auto`` is resolved here, outside traced
code, for the backend JAX runs on. The CPU column is measured (BUILD_NOTES.md
§6, benchmarks/results/cpu.md); so is the GPU column, on one H200 in two runs of
``benchmarks/gpu_check.sh`` (benchmarks/results/gpu.md, BUILD_NOTES.md "Issue 27"):
bf16 step 50.0 ms vs 62.3 ms in f32; ``conv_layout=nhwc`` 40.5 ms vs 50.0/50.2 ms for
XLA's default/NCHW; depth-to-space 11x faster than transposed convs (583 ms) and
space-to-depth no slower than strided convs (50.9 ms); whole-volume tiling on the
device 168 ms vs 1,141-1,400 ms on the host, measured at 4 windows per call.
Also here: the process-wide settings every command applies before JAX starts
(`apply_conv_layout`) and XLA's persistent compilation cache (`use_compilation_cache`).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import jax
from absl import logging

from resfuse_jax.errors import ConfigError

# field -> its allowed values (besides "auto")
CHOICES = {
  "conv_impl": ("xla", "planes"),  # model.conv_impl: XLA's 3D conv | 2D convs over depth planes
  "downsample": ("space_to_depth", "strided"),  # model.downsample: stride-2 3x3x3 convs
  "upsample": ("depth_to_space", "transpose"),  # model.upsample: k2 s2 transposed convs
  "conv_layout": ("default", "nhwc", "nchw"),  # model.conv_layout: XLA GPU conv layout flag
  "compute_dtype": ("float32", "bfloat16"),  # train.compute_dtype: activations and matmuls
  "tiling": ("host", "device"),  # where the sliding window cuts and blends (inference.tiler)
  # data.resident=auto: "device" = the training set resident where it fits (train.inputs)
  "resident": ("host", "device"),
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
    # The CPU's "device" is the host's own RAM and its step takes seconds: the Grain
    # pipeline keeps up there (benchmarks/results/resident_data.md), and the quick start's
    # Dice stays the host pipeline's until `compare --seeds` says otherwise.
    "resident": "host",
  },
  "gpu": {  # measured on an H200: the module docstring
    "conv_impl": "xla",
    "downsample": "space_to_depth",
    "upsample": "depth_to_space",
    "conv_layout": "nhwc",
    "compute_dtype": "bfloat16",
    "tiling": "device",
    "eval_batch_size": 4,
    "resident": "device",  # issue 28: the host pipeline delivers 94-98 crops/s on 16 cores
  },
}

LAYOUT_FLAGS = {"nhwc": "--xla_gpu_force_conv_nhwc=true", "nchw": "--xla_gpu_force_conv_nchw=true"}
_LAYOUT_NAMES = tuple(f.split("=")[0] for f in LAYOUT_FLAGS.values())


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


def gpu_may_start() -> bool:
  """Whether JAX could start a GPU backend in this process, asked before it starts.

  True when a CUDA/ROCm plugin is installed and ``JAX_PLATFORMS`` does not rule it out;
  a CPU-only install never gets GPU flags (they would change its compilation cache keys).
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and not re.search(r"cuda|gpu|rocm", platforms):
    return False
  plugins = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
  try:
    import jax_plugins  # namespace package of the older plugin wheels

    plugins |= {p.name for p in Path(next(iter(jax_plugins.__path__))).iterdir()}
  except (ImportError, StopIteration, OSError):
    pass
  return any("cuda" in p or "rocm" in p for p in plugins)


def _backends_started() -> bool:
  from jax._src import xla_bridge  # no public API says whether the backends have started

  return xla_bridge.backends_are_initialized()


def apply_conv_layout(layout: str) -> None:
  """Sets XLA's GPU convolution layout flag; only possible before JAX starts its backends.

  ``auto`` takes the GPU column (nhwc) where a GPU may start, and is a no-op once JAX
  has started; ``default`` removes any layout flag, leaving XLA's own heuristic (which
  measured as NCHW on an H200); ``nhwc``/``nchw`` force it, and refuse once JAX started.
  """
  if layout not in ("auto", *CHOICES["conv_layout"]):
    raise ConfigError(
      f"model.conv_layout must be one of auto, {', '.join(CHOICES['conv_layout'])}; got {layout!r}"
    )
  flags = os.environ.get("XLA_FLAGS", "")
  if layout == "auto":
    if _backends_started() or not gpu_may_start() or any(f in flags for f in _LAYOUT_NAMES):
      return
    layout = DEFAULTS["gpu"]["conv_layout"]
  wanted = LAYOUT_FLAGS.get(layout)
  kept = [f for f in flags.split() if not f.startswith(_LAYOUT_NAMES)]
  new = " ".join(kept + ([wanted] if wanted else []))
  if new.split() == flags.split():
    return
  if _backends_started():
    if wanted is None:
      raise ConfigError(
        f"model.conv_layout=default must be set before JAX starts: run without "
        f"{' '.join(f for f in flags.split() if f.startswith(_LAYOUT_NAMES))} in XLA_FLAGS"
      )
    raise ConfigError(
      f"model.conv_layout={layout} must be set before JAX starts: run with XLA_FLAGS={wanted} instead"
    )
  os.environ["XLA_FLAGS"] = new


# jax_threefry_partitionable per platform. On CPU, partitionable threefry (JAX's default since
# 0.5) makes XLA's compile of the random draws 4x slower: the smoke model's jitted init
# 13.7 s vs 3.1 s, a smoke `main` run 33 s vs 21 s (BUILD_NOTES "Issue 27"); with one CPU
# device it buys nothing. On a GPU it avoids replicated random draws across a mesh and is
# kept until the GPU check (variant/threefry_partitionable=false) measures the other side.
PARTITIONABLE_THREEFRY = {"cpu": False, "gpu": True}


def apply_rng_default() -> bool:
  """Sets ``jax_threefry_partitionable`` for the platform JAX is about to use (before any
  tracing; an explicit ``JAX_THREEFRY_PARTITIONABLE`` wins). Both settings draw the same
  values on any number of devices; they draw different values from each other, so a run
  resumed on the other kind of machine continues with other augmentation draws."""
  if "JAX_THREEFRY_PARTITIONABLE" in os.environ:
    return bool(jax.config.jax_threefry_partitionable)
  value = PARTITIONABLE_THREEFRY["gpu" if gpu_may_start() else "cpu"]
  jax.config.update("jax_threefry_partitionable", value)
  return value


def use_compilation_cache(folder: str | os.PathLike | None) -> str | None:
  """Turns XLA's persistent compilation cache on in ``folder`` (None: off); returns it.

  A compiled program (the step's 40-50 s on a GPU) is then loaded, not recompiled, by
  the next process that builds the same program: a resumed run, evaluate, predict. The
  key is the program's fingerprint with the compiler and its flags, so a stale entry is
  never used; an unreadable folder only costs the compile (JAX warns and goes on).
  """
  if folder is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  folder = str(Path(folder).expanduser())
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", folder)
  logging.info("XLA compilation cache: %s (off with --compilation_cache=off)", folder)
  return folder


def device_memory_bytes(device=None) -> int:
  """What one device can hold: XLA's ``bytes_limit`` on an accelerator, the host's
  available RAM on a CPU (whose memory_stats say nothing)."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
