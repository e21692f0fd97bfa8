"""An export's ``model.onnx`` run by onnxruntime as the sliding window's window function.

Only the window function changes between backends: preprocessing, the Gaussian
sliding window, test-time mirroring, thresholds, nesting and post-processing are the
JAX backend's code (`sliding_window`, `postprocess`). onnxruntime's CPU kernels run
this U-Net's 3D convolutions 2-3x faster than XLA's CPU backend (BUILD_NOTES §11).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from resfuse_jax import files
from resfuse_jax.errors import CheckpointError, ConfigError

FILE = "model.onnx"
INPUTS = ("pre", "post")  # float32 [n, 1, d, h, w] each
OUTPUTS = ("logits", "probabilities")  # float32 [n, R, d, h, w]
INSTALL_HINT = "pip install 'resfuse-jax[deploy]' (onnx and onnxruntime)"


def export_hint() -> str:
  """How to get an export with ``model.onnx``: install the extra first when onnx is missing."""
  command = "python -m resfuse_jax.export --workdir=W --output=E --onnx=yes"
  if importlib.util.find_spec("onnx") is None:
    return f"{INSTALL_HINT}, then {command}"
  return f"{command} writes it"


def available() -> bool:
  return importlib.util.find_spec("onnxruntime") is not None


class OnnxWindow:
  """[n, d, h, w, 2] tiles (pre, post; NDHWC like the JAX backend) -> [n, d, h, w, R]
  probabilities, any ``n``: the sliding window sends a partial last batch as it is."""

  fixed_batch = False  # the graph's batch is symbolic: no padding tiles to compute
  backend = "onnxruntime"

  def __init__(
    self,
    path: str | Path,
    sha256: str | None = None,
    threads: int = 0,
    max_batch: int | None = None,
    regions: int | None = None,
  ):
    """``sha256``: the digest ``export.json`` recorded; a file that differs is refused.

    ``threads``: onnxruntime's intra-op threads (0: one per physical core).
    ``max_batch``: tiles per ``session.run``; None is 1 on the CPU execution provider,
    whose 3D kernels gain nothing from a batch while the activations' memory grows with
    it (measured at 128³: 4.2 s a tile and 2.2 GB at batch 1, 4.7 s and 5.3 GB at 2,
    BUILD_NOTES §11), and the whole batch on a GPU.
    ``regions``: the config's region count; a graph with another output channel count
    is refused (at load when its shape is static, else on the first window).
    """
    if not available():
      raise ConfigError(f"the onnxruntime backend needs onnxruntime: {INSTALL_HINT}")
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
      raise CheckpointError(f"{path} is missing: this export has no ONNX model")
    if sha256 is not None and files.sha256(path) != sha256:
      raise CheckpointError(
        f"{path} does not match the SHA-256 recorded in export.json: the file is damaged or "
        "was replaced; export the model again"
      )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    providers = [
      p
      for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
      if p in ort.get_available_providers()
    ]
    try:
      self.session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors for a bad model file
      raise CheckpointError(f"onnxruntime cannot load {path}: {e}") from e
    self.path, self.regions = path, regions
    self._check_channels(self._declared_channels())
    on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
    self.max_batch = max_batch or (1 if on_cpu else None)
    self.windows_per_call = self.max_batch or 0  # what a call takes at once (0: any)

  def _declared_channels(self) -> int | None:
    outputs = {o.name: o.shape for o in self.session.get_outputs()}
    if OUTPUTS[1] not in outputs:
      raise CheckpointError(f"{self.path} has no output {OUTPUTS[1]!r}; it has {sorted(outputs)}")
    shape = outputs[OUTPUTS[1]]
    return shape[1] if len(shape) == 5 and isinstance(shape[1], int) else None

  def _check_channels(self, channels: int | None) -> None:
    if self.regions is not None and channels is not None and channels != self.regions:
      raise CheckpointError(
        f"{self.path} outputs {channels} channels, the config has {self.regions} regions: "
        "the ONNX model is of another model; export the model again"
      )

  def __call__(self, tiles: np.ndarray) -> np.ndarray:
    x = np.moveaxis(np.asarray(tiles, np.float32), -1, 1)  # [n, 2, d, h, w]
    step = self.max_batch or len(x)
    out = []
    for i in range(0, len(x), step):
      part = x[i : i + step]
      feeds = {name: np.ascontiguousarray(part[:, i : i + 1]) for i, name in enumerate(INPUTS)}
      out.append(self.session.run([OUTPUTS[1]], feeds)[0])
      self._check_channels(out[-1].shape[1] if out[-1].ndim == 5 else -1)
    return np.moveaxis(np.concatenate(out) if len(out) > 1 else out[0], 1, -1)
