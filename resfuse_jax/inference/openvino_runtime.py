"""``model.onnx`` run by OpenVINO as the sliding window's window function (issue 31).

Only the window function changes between backends (as for `onnx_runtime`). On the CPU
the benchmarks run on, OpenVINO ran one 128³ window of ResFuse 16-256 in 1.85 s against
onnxruntime's 3.25 s (f32, 2 threads; max |Δprob| 9e-4). Precision is f32 unless asked:
OpenVINO's own default on a CPU with BF16 is bf16, which moved probabilities by up to
0.024 in that probe, so bf16 is opt-in and gated by the agreement measured at export
(`precision`).

The compiled model is cached in the user's cache (``<cache>/openvino/``, never beside a
possibly read-only ``model.onnx``), keyed by the graph's SHA-256, the OpenVINO version,
the CPU and the compile properties; a later process imports it instead of compiling.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging as std_logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import logging

from resfuse_jax import data, files
from resfuse_jax.errors import CheckpointError, ConfigError
from resfuse_jax.inference import onnx_runtime, openvino_norms

FILE = onnx_runtime.FILE
INSTALL_HINT = "pip install 'resfuse-jax[deploy]' (openvino)"
PRECISIONS = ("f32", "bf16")
DEVICE = "CPU"


def available() -> bool:
  return importlib.util.find_spec("openvino") is not None


def require() -> None:
  """The one-line error when the runtime is missing."""
  if not available():
    raise ConfigError(f"the openvino backend needs openvino: {INSTALL_HINT}")


def _openvino():
  """The ``openvino`` module, imported without its telemetry.

  Importing ``openvino`` imports its model converter, which (with ``openvino-telemetry``
  installed, as the wheel requires) writes a client ID under ``~/intel`` and forks a
  process to send usage events: a network call from a medical tool, and a fork in a
  multithreaded JAX process. Blocking that one import makes OpenVINO use its own stub;
  nothing else changes. A process that imported either first keeps its choice. The
  converter also removes absl's log handler from the root logger: it is put back.
  """
  if "openvino" not in sys.modules:
    sys.modules.setdefault("openvino_telemetry", None)
  handlers = list(std_logging.getLogger().handlers)
  import openvino

  root = std_logging.getLogger()
  for handler in handlers:
    if handler not in root.handlers:
      root.addHandler(handler)
  return openvino


@functools.lru_cache(maxsize=1)
def core():
  return _openvino().Core()


def version() -> str:
  return _openvino().get_version()


@functools.lru_cache(maxsize=1)
def cpu() -> dict:
  """This CPU as OpenVINO sees it: ``name`` (FULL_DEVICE_NAME), ``capabilities``
  (OPTIMIZATION_CAPABILITIES) and ``bf16`` (whether BF16 is among them)."""
  caps = [str(c) for c in core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]
  name = str(core().get_property(DEVICE, "FULL_DEVICE_NAME"))
  return {"name": name, "capabilities": caps, "bf16": "BF16" in caps}


def cache_folder() -> Path:
  """``$RESFUSE_CACHE/openvino`` (default ``~/.cache/resfuse_jax/openvino``)."""
  return data.default_cache_dir() / "openvino"


def compile_properties(precision: str, threads: int = 0, streams: int = 0) -> dict:
  """OpenVINO's compile properties; 0 threads or streams leave OpenVINO's own default."""
  if precision not in PRECISIONS:
    raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
  for name, value in (("threads", threads), ("streams", streams)):
    if int(value) < 0:
      raise ConfigError(f"--{name} must be >= 0 (0: OpenVINO's default); got {value}")
  props = {"INFERENCE_PRECISION_HINT": precision}
  if threads:
    props["INFERENCE_NUM_THREADS"] = int(threads)
  if streams:
    props["NUM_STREAMS"] = int(streams)
  return props


def cache_key(graph_sha256: str, props: dict) -> str:
  """What a compiled model depends on: the graph, OpenVINO, the CPU, the properties."""
  here = cpu()
  key = {
    "graph": graph_sha256,
    "openvino": version(),
    "cpu": here["name"],
    "capabilities": here["capabilities"],
    "properties": {k: str(v) for k, v in props.items()},
    "norms": openvino_norms.VERSION,
  }
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_cached(folder: Path, key: str, props: dict):
  """The compiled model cached under ``key`` in ``folder``; None when there is none or
  it does not import (a damaged or foreign blob is recompiled, not trusted)."""
  blob, record = folder / f"{key}.blob", folder / f"{key}.json"
  if not (blob.is_file() and record.is_file()):
    return None
  try:
    recorded = json.loads(record.read_text())["sha256"]
    content = blob.read_bytes()
    if hashlib.sha256(content).hexdigest() != recorded:
      raise ValueError("the blob does not match its recorded SHA-256")
    return core().import_model(content, DEVICE, props)
  except Exception as e:  # OpenVINO raises untyped errors: any of them means recompile
    logging.warning("OpenVINO: ignoring the cached %s (%s); compiling again", blob, _first_line(e))
    return None


def store(folder: Path, key: str, compiled) -> Path | None:
  """Writes ``compiled`` to the cache (blob, then its record); None if the cache cannot
  take it (a read-only home: prediction goes on, compiling each time)."""
  blob = folder / f"{key}.blob"
  try:
    stream = compiled.export_model()
    content = stream.getvalue() if hasattr(stream, "getvalue") else bytes(stream)
    files.write_bytes(blob, content)
    files.write_json(folder / f"{key}.json", {"sha256": hashlib.sha256(content).hexdigest()})
  except Exception as e:  # a full or read-only cache, an export OpenVINO refuses: not fatal
    logging.warning("OpenVINO: cannot cache the compiled model in %s (%s)", folder, e)
    return None
  return blob


class OpenVinoWindow:
  """[n, d, h, w, 2] tiles (pre, post; NDHWC) -> [n, d, h, w, R] probabilities, any ``n``."""

  fixed_batch = False  # the graph's batch is symbolic: the last batch is sent as it is

  def __init__(
    self,
    path: str | Path,
    sha256: str | None = None,
    precision: str = "f32",
    regions: int | None = None,
    threads: int = 0,
    streams: int = 0,
    max_batch: int | None = None,
    cache: bool = True,
  ):
    """``sha256``: the digest ``export.json`` recorded (a file that differs is refused).

    ``precision``: ``f32`` (INFERENCE_PRECISION_HINT f32) or ``bf16`` (only on a CPU with
    BF16; `precision.check_bf16` decides whether it may be used). ``threads``:
    INFERENCE_NUM_THREADS, ``streams``: NUM_STREAMS (0: OpenVINO's defaults); with more
    than one stream the windows of a call run as parallel requests. ``max_batch``:
    windows per request (None: 1, as onnxruntime's CPU default). ``cache``: import the
    compiled model from (and write it to) `cache_folder`.
    """
    require()
    path = Path(path)
    if not path.is_file():
      raise CheckpointError(f"{path} is missing: this export has no ONNX model")
    digest = files.sha256(path)
    if sha256 is not None and digest != sha256:
      raise CheckpointError(
        f"{path} does not match the SHA-256 recorded in export.json: the file is damaged or "
        "was replaced; export the model again"
      )
    props = compile_properties(precision, threads, streams)
    if precision == "bf16" and not cpu()["bf16"]:
      raise ConfigError(
        f"--precision=bf16: this CPU ({cpu()['name']}) has no BF16 (OpenVINO lists "
        f"{', '.join(cpu()['capabilities'])}); predict in f32"
      )
    self.path, self.regions, self.precision = path, regions, precision
    self.backend = "openvino" if precision == "f32" else f"openvino {precision}"
    self.max_batch = int(max_batch or 1)
    self.compiled, self.cached = self._compiled(digest, props, cache)
    self.output = self.compiled.output(onnx_runtime.OUTPUTS[1])
    self._check_channels(self.output.get_partial_shape()[1])
    requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    self.request = self.compiled.create_infer_request()
    self.queue = None
    if requests > 1:
      self.queue = _openvino().AsyncInferQueue(self.compiled, requests)
    self.windows_per_call = self.max_batch * requests  # what a call keeps busy

  def _compiled(self, digest: str, props: dict, cache: bool):
    """(compiled model, how: ``loaded`` from the cache, ``compiled``, ``uncached``)."""
    folder, key = cache_folder(), cache_key(digest, props)
    start = time.perf_counter()
    if cache:
      compiled = load_cached(folder, key, props)
      if compiled is not None:
        took = time.perf_counter() - start
        logging.info("OpenVINO: loaded the compiled %s from %s in %.1f s", FILE, folder, took)
        return compiled, "loaded"
    try:
      compiled = core().compile_model(self._graph(), DEVICE, props)
    except Exception as e:  # OpenVINO raises untyped errors for a bad model file
      raise CheckpointError(f"OpenVINO cannot load {self.path}: {_first_line(e)}") from e
    took = time.perf_counter() - start
    stored = store(folder, key, compiled) if cache else None
    where = f", cached in {folder}" if stored else ""
    logging.info("OpenVINO: compiled %s (%s) in %.1f s%s", self.path, props, took, where)
    return compiled, "compiled" if stored else "uncached"

  def _graph(self):
    """The model to compile: ``model.onnx`` with its large instance norms staged
    (`openvino_norms`), read from memory; the file as it is where onnx is not installed."""
    try:
      import onnx  # noqa: F401  (the deploy extra brings it with openvino)
    except ImportError:
      logging.warning(
        "OpenVINO: onnx is not installed, so %s runs as exported; its instance norms over "
        "large windows are then ~1e-3 less accurate (%s)", self.path, onnx_runtime.INSTALL_HINT
      )  # fmt: skip
      return str(self.path)
    graph, staged = openvino_norms.rewrite(self.path.read_bytes())
    if not staged:
      return str(self.path)
    logging.info("OpenVINO: %d instance norms of %s staged for accurate sums", staged, self.path)
    # Read from a file: from memory, OpenVINO's ONNX reader drops an input the graph does not
    # use (ResUNet's pre), and the window feeds both.
    with tempfile.TemporaryDirectory(prefix="resfuse-openvino-") as folder:
      staged_path = Path(folder) / FILE
      staged_path.write_bytes(graph)
      return core().read_model(str(staged_path))

  def _check_channels(self, dim) -> None:
    channels = dim.get_length() if dim.is_static else None
    if self.regions is not None and channels is not None and channels != self.regions:
      raise CheckpointError(
        f"{self.path} outputs {channels} channels, the config has {self.regions} regions: "
        "the ONNX model is of another model; export the model again"
      )

  @staticmethod
  def _feeds(part: np.ndarray) -> dict:
    return {n: np.ascontiguousarray(part[:, i : i + 1]) for i, n in enumerate(onnx_runtime.INPUTS)}

  def __call__(self, tiles: np.ndarray) -> np.ndarray:
    x = np.moveaxis(np.asarray(tiles, np.float32), -1, 1)  # [n, 2, d, h, w]
    parts = [x[i : i + self.max_batch] for i in range(0, len(x), self.max_batch)]
    if self.queue is None or len(parts) == 1:
      out = [self.request.infer(self._feeds(p))[self.output] for p in parts]
    else:
      out = [None] * len(parts)

      def done(request, i):
        out[i] = np.array(request.get_tensor(self.output).data)  # a copy: the request is reused

      self.queue.set_callback(done)
      for i, part in enumerate(parts):
        self.queue.start_async(self._feeds(part), i)
      self.queue.wait_all()
    return np.moveaxis(np.concatenate(out) if len(out) > 1 else out[0], 1, -1)
