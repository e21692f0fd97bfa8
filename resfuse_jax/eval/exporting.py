"""Inference-only export of a trained workdir (``python -m resfuse_jax.export``).

``E/`` holds everything prediction needs and nothing of training:

- ``config.json``: the model and the preprocessing settings (spacing, normalisation,
  crop, regions, thresholds) the model was trained with;
- ``export.json``: step, source workdir, regions and label values, parameter count,
  library versions and the serving signature;
- ``params/``: the parameters as an Orbax checkpoint (no optimiser state);
- ``postprocessing.json``: the post-processing chosen on validation, when the workdir has
  one (``predict --model=E`` applies it by default);
- ``serving/window.jax_export``: a serialized ``jax.export`` of the window function
  ``tiles [n, d, h, w, 2] float32 (pre, post) -> region probabilities [n, d, h, w, R]``
  with the parameters embedded and a symbolic batch ``n``, lowered for CPU and CUDA, for
  serving without this package's model code (``jax.export.deserialize``).

The folder is written under a temporary name and renamed when complete, so a
killed export never leaves a folder that looks finished.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import flax
import jax
import jax.numpy as jnp

from resfuse_jax import checkpointing, files
from resfuse_jax.errors import CheckpointError, UserError
from resfuse_jax.eval import postprocess, postprocess_selection
from resfuse_jax.eval.predictor import Predictor, window_probabilities

PLATFORMS = ("cpu", "cuda")


def serving_function(predictor: Predictor) -> jax.export.Exported:
  """The window function with the parameters embedded, batch dimension symbolic."""
  (n,) = jax.export.symbolic_shape("n")
  patch = tuple(predictor.config.data.patch_size)
  params, model = predictor.params, predictor.model
  forward = jax.jit(lambda tiles: window_probabilities(model, params, tiles))
  return jax.export.export(forward, platforms=PLATFORMS)(
    jax.ShapeDtypeStruct((n, *patch, 2), jnp.float32)
  )


def load_serving(path: str | Path) -> jax.export.Exported:
  """The serialized window function of an export; ``load_serving(E).call(tiles)`` runs it."""
  return jax.export.deserialize(
    bytearray((Path(path) / checkpointing.EXPORT_SERVING_FILE).read_bytes())
  )


def _metadata(predictor: Predictor, workdir: Path) -> dict:
  config, regions = predictor.config, predictor.dataset.regions
  patch = ", ".join(map(str, config.data.patch_size))
  return {
    "format": checkpointing.EXPORT_FORMAT,
    "step": predictor.step,
    "source_workdir": str(workdir.absolute()),
    "model": config.model.name,
    "variant": config.model.get("variant", config.model.name),
    "dataset": config.data.name,
    "regions": list(regions),
    "label_values": postprocess.region_label_values(regions),
    "params": predictor.num_params,
    "serving": {
      "file": checkpointing.EXPORT_SERVING_FILE,
      "input": f"float32[n, {patch}, 2] (pre, post)",
      "output": f"float32[n, {patch}, {len(regions)}] region probabilities",
      "platforms": list(PLATFORMS),
    },
    "versions": {"jax": jax.__version__, "flax": flax.__version__},
  }


def export_model(workdir: str | Path, output: str | Path, step: int | None = None) -> Path:
  """Writes the export folder ``output`` (which must not exist) from ``workdir``."""
  workdir, output = Path(workdir), Path(output)
  if output.exists():
    raise CheckpointError(f"--output={output} already exists; remove it or choose another path")
  predictor = Predictor.load(workdir, step)
  tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
  files.make_dirs(tmp)
  try:
    files.write_json(tmp / "config.json", predictor.config.to_dict())
    chosen = workdir / postprocess_selection.FILE
    if chosen.is_file():  # the post-processing chosen on validation travels with the model
      files.write_bytes(tmp / postprocess_selection.FILE, chosen.read_bytes())
    digests = checkpointing.save_export_params(tmp, predictor.params)
    serving = tmp / checkpointing.EXPORT_SERVING_FILE
    serving.parent.mkdir()
    serving.write_bytes(serving_function(predictor).serialize())
    files.write_json(
      tmp / "export.json", {**_metadata(predictor, workdir), "param_digests": digests}
    )
    tmp.rename(output)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, UserError):
      raise
    raise files.output_error(output, e) from e
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return output
