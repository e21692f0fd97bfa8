"""``predict --workdir=W`` on OpenVINO or onnxruntime: W's checkpoint as an ONNX graph,
built once into the user's cache (issue 31, part 4), never into W.

`WorkdirGraphs` is the `runtimes.GraphSource` the predict command hands to the
inference layer (which may not import this builder). An entry is
``<cache>/onnx/<key>/`` holding ``model.onnx`` (`exporting.write_onnx`, as an export
writes it) and ``graph.json`` (its SHA-256, the source, the build time). The key covers
everything the graph depends on: the parameters' digests, the config and deploy
settings, this package's model and translator code, and the jax/flax/onnx versions,
so a retrained, re-configured or upgraded model never meets a stale graph.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

import flax
import jax
from absl import logging

from resfuse_jax import checkpointing, data, files, models, task
from resfuse_jax.errors import OutputError
from resfuse_jax.inference import onnx_runtime
from resfuse_jax.serving import exporting

RECORD = "graph.json"


def code_digest() -> str:
  """SHA-256 of the code a graph is traced and translated by (models, task, serving/onnx_*)."""
  sources = sorted(Path(models.__file__).parent.glob("*.py"))
  sources += sorted(Path(__file__).parent.glob("onnx_*.py")) + [Path(task.__file__)]
  digest = hashlib.sha256()
  for path in sources:
    digest.update(path.name.encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()


def graph_key(predictor, deploy: dict) -> str:
  """The cache key of ``predictor``'s graph (parameters loaded)."""
  import onnx

  key = {
    "params": checkpointing.array_digests(predictor.params, "params"),
    "config": predictor.config.to_dict(),
    "deploy": deploy,
    "code": code_digest(),
    "versions": {"jax": jax.__version__, "flax": flax.__version__, "onnx": onnx.__version__},
  }
  return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def cached(folder: Path) -> tuple[Path, str] | None:
  """(``model.onnx``, SHA-256) of a complete cache entry whose file matches its record."""
  graph, record = folder / onnx_runtime.FILE, folder / RECORD
  try:
    digest = json.loads(record.read_text())["sha256"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  if not graph.is_file() or files.sha256(graph) != digest:
    logging.warning("ignoring the damaged ONNX graph cache %s; building it again", folder)
    return None
  return graph, digest


class WorkdirGraphs:
  """Builds (once) and finds a training workdir's ONNX graph in ``<cache>/onnx/``."""

  def __init__(self, root: str | Path | None = None):
    self.root = Path(root) if root else data.default_cache_dir() / "onnx"

  def missing(self) -> str | None:
    if importlib.util.find_spec("onnx") is None:
      return f"the onnx package: {onnx_runtime.INSTALL_HINT}"
    return None

  def __call__(self, predictor, workdir: Path) -> tuple[Path, str]:
    deploy = exporting.deployment(predictor, predictor.rules)
    folder = self.root / graph_key(predictor, deploy)[:32]
    found = cached(folder)
    if found is not None:
      logging.info("ONNX graph of %s step %d: %s (cached)", workdir, predictor.step, found[0])
      return found
    start = time.perf_counter()
    try:
      with exporting.atomic_folder(folder) as tmp:
        self._write(tmp, predictor, deploy, workdir)
    except OutputError as e:
      found = cached(folder)  # another process built it first
      if found is not None:
        return found
      logging.warning("cannot cache the ONNX graph in %s (%s); building it for this run", folder, e)
      folder = Path(tempfile.mkdtemp(prefix="resfuse-onnx-"))
      atexit.register(shutil.rmtree, folder, ignore_errors=True)
      self._write(folder, predictor, deploy, workdir)
    took = time.perf_counter() - start
    logging.info(
      "built the ONNX graph of %s step %d in %.1f s: %s",
      workdir,
      predictor.step,
      took,
      folder / onnx_runtime.FILE,
    )
    return folder / onnx_runtime.FILE, json.loads((folder / RECORD).read_text())["sha256"]

  @staticmethod
  def _write(folder: Path, predictor, deploy: dict, workdir: Path) -> None:
    start = time.perf_counter()
    record = exporting.write_onnx(folder, predictor, "yes", deploy)
    files.write_json(
      folder / RECORD,
      {
        "sha256": record["sha256"],
        "source_workdir": str(Path(workdir).absolute()),
        "step": int(predictor.step),
        "build_s": round(time.perf_counter() - start, 3),
      },
    )
