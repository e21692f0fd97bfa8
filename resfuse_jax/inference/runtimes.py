"""Which runtime runs the windows (``predict --backend``), and its settings.

``auto`` on a CPU takes the first installed of `RUNTIMES` (OpenVINO, then onnxruntime:
fastest first, issue 31) when there is an ONNX graph to run: an export's ``model.onnx``,
or, for a training workdir, one built into the user's cache by the `GraphSource` the
command hands in (the builder is ``serving``'s, which inference may not import). On a
GPU ``auto`` stays JAX. Only the window function changes: tiling, TTA, thresholds and
post-processing are the same code for every backend.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

from resfuse_jax import backend as platforms
from resfuse_jax import checkpointing
from resfuse_jax.errors import ConfigError
from resfuse_jax.inference import onnx_runtime, openvino_runtime

BACKENDS = ("auto", "jax", "openvino", "onnxruntime")
RUNTIMES = ("openvino", "onnxruntime")  # auto's order on a CPU
_MODULES = {"openvino": openvino_runtime, "onnxruntime": onnx_runtime}
_HINTS = {"openvino": openvino_runtime.INSTALL_HINT, "onnxruntime": onnx_runtime.INSTALL_HINT}


@dataclasses.dataclass(frozen=True)
class WindowSettings:
  """The runtimes' knobs (``predict --precision --threads --streams --windows_per_call``).

  ``precision``: OpenVINO's f32 or bf16; ``threads``: intra-op threads (onnxruntime) or
  INFERENCE_NUM_THREADS (OpenVINO), 0 the runtime's default; ``streams``: OpenVINO's
  NUM_STREAMS, 0 its default; ``windows_per_call``: windows per runtime call, 0 the
  default (1 on a CPU). The defaults stay until measured otherwise.
  """

  precision: str = "f32"
  threads: int = 0
  streams: int = 0
  windows_per_call: int = 0

  def __post_init__(self):
    openvino_runtime.compile_properties(self.precision, self.threads, self.streams)
    if self.windows_per_call < 0:
      raise ConfigError(f"--windows_per_call must be >= 0; got {self.windows_per_call}")


class GraphSource(Protocol):
  """The ONNX graph of a training workdir's loaded checkpoint (``serving.onnx_cache``)."""

  def missing(self) -> str | None:
    """Why no graph can be built here (a package is missing); None if one can."""

  def __call__(self, predictor: Any, workdir: Path) -> tuple[Path, str]:
    """(``model.onnx``, its SHA-256) of ``predictor`` (JAX, parameters loaded)."""


def installed(runtime: str) -> bool:
  return _MODULES[runtime].available()


def _no_graph(path: Path, graphs: GraphSource | None) -> str | None:
  """Why ``path`` has no ONNX graph to run, as "<path> is ..."; None: it has, or one can
  be built."""
  if checkpointing.is_export(path):
    if (path / onnx_runtime.FILE).is_file():
      return None
    return f"{path} is an export without one ({onnx_runtime.export_hint()})"
  if graphs is None:
    return f"{path} is a training workdir, not an export"
  why = graphs.missing()
  if why is None:
    return None
  return f"{path} is a training workdir, and building its {onnx_runtime.FILE} needs {why}"


def choose(name: str, path: str | Path, graphs: GraphSource | None = None) -> tuple[str, str]:
  """(backend, why ``auto`` chose it; "" for a name) for ``predict --backend=name`` on
  ``path`` (a workdir or an export).

  ``graphs``: builds a training workdir's graph (None: a workdir runs JAX). A runtime
  asked for by name that cannot run is a one-line ``ConfigError``.
  """
  if name not in BACKENDS:
    raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}; got {name!r}")
  path = Path(path)
  if name == "jax":
    return "jax", ""
  if name == "auto":
    if platforms.platform() != "cpu":
      return "jax", "auto: JAX runs on a GPU"
    runtimes = [r for r in RUNTIMES if installed(r)]
    if not runtimes:
      return "jax", f"auto on CPU: neither {' nor '.join(RUNTIMES)} is installed"
    missing = _no_graph(path, graphs)
    if missing:
      return "jax", f"auto on CPU: no ONNX graph to run, {missing}"
    return runtimes[0], f"auto on CPU: the first installed of {', '.join(RUNTIMES)}"
  if not installed(name):
    raise ConfigError(f"--backend={name} needs {name}: {_HINTS[name]}")
  missing = _no_graph(path, graphs)
  if missing:
    raise ConfigError(f"--backend={name} needs an export with {onnx_runtime.FILE}; {missing}")
  return name, ""


def make_window(
  name: str, graph: Path, sha256: str | None, settings: WindowSettings, regions: int | None
):
  """The window function of runtime ``name`` on ``graph`` (its digest checked first)."""
  per_call = settings.windows_per_call or None
  if name == "openvino":
    return openvino_runtime.OpenVinoWindow(
      graph, sha256, settings.precision, regions, settings.threads, settings.streams, per_call
    )
  return onnx_runtime.OnnxWindow(
    graph, sha256, threads=settings.threads, max_batch=per_call, regions=regions
  )
