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
  serving without this package's model code (``jax.export.deserialize``);
- ``model.onnx``: the same window function as an ONNX graph translated from the traced
  model (`serving.onnx_graph`: ``pre, post [n, 1, d, h, w] -> logits, probabilities
  [n, R, d, h, w]``), for onnxruntime, OpenVINO, Triton, C++ or .NET without JAX;
  ``export.json``'s ``deploy`` section holds the settings around it (preprocessing,
  window, thresholds, labels, post-processing rules) as data, and its
  ``bf16_agreement`` section what OpenVINO's bf16 did to the validation cases' labels
  on the exporting machine (`serving.agreement`; numbers only), which
  ``predict --precision=bf16`` is allowed or refused by.

The folder is written under a temporary name and renamed when complete, so a
killed export never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
from absl import logging

from resfuse_jax import checkpointing, data, files
from resfuse_jax.errors import CheckpointError, ConfigError, OutputError, UserError
from resfuse_jax.inference import integrity, onnx_runtime, outputs, postprocess, precision, tiler
from resfuse_jax.inference.predictor import Predictor, window_probabilities
from resfuse_jax.serving import agreement
from resfuse_jax.workdir import CONFIG, POSTPROCESSING, Workdir

PLATFORMS = ("cpu", "cuda")
ONNX_MODES = ("auto", "yes", "no")


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


def deployment(predictor: Predictor, rules: list | None) -> dict:
  """The settings a deployer reproduces around ``model.onnx``, as data: the algorithms are
  this package's (`data.preprocessing`, `inference.tiler`, `inference.postprocess`)."""
  config, dataset = predictor.config, predictor.dataset
  window = [int(w) for w in config.data.patch_size]
  names = list(dataset.region_names)
  thresholds = postprocess.settings_from_config(config.eval)
  return {
    "model_file": onnx_runtime.FILE,
    "inputs": {n: ["n", 1, *window] for n in onnx_runtime.INPUTS},
    "outputs": {n: ["n", len(names), *window] for n in onnx_runtime.OUTPUTS},
    "layout": "NCDHW, float32; axes (d, h, w) of the RAS+ canonical, cropped, resampled scan",
    "preprocessing": data.prep_settings(config.data).as_dict(),
    "sliding_window": {
      "window": window,
      "overlap": float(config.eval.overlap),
      "gaussian_sigma_scale": tiler.SIGMA_SCALE,
    },
    "labels": {
      "regions": {n: list(v) for n, v in dataset.regions.items()},
      "thresholds": thresholds["thresholds"] or [0.5] * len(names),
      "min_component_voxels": thresholds["min_component_voxels"],
      "paint_order": postprocess.region_label_values(dataset.regions),
    },
    "postprocessing": (
      {"file": POSTPROCESSING, "rules": {n: r.to_dict() for n, r in zip(names, rules)}}
      if rules
      else None
    ),
  }


def write_onnx(folder: Path, predictor: Predictor, mode: str, deploy: dict) -> dict:
  """Writes ``folder/model.onnx`` when ``mode`` and the model allow; returns its record.

  ``auto``: writes it when ``onnx`` is installed and the model translates (every
  registered model does), else records why not; ``yes``: either missing is an error; ``no``: nothing.
  """
  if mode not in ONNX_MODES:
    raise ConfigError(f"--onnx must be one of {', '.join(ONNX_MODES)}; got {mode!r}")
  if mode == "no":
    return {"written": False, "reason": "export --onnx=no"}
  if importlib.util.find_spec("onnx") is None:
    if mode == "yes":
      raise ConfigError(f"--onnx=yes needs the onnx package: {onnx_runtime.INSTALL_HINT}")
    return {
      "written": False,
      "reason": f"the onnx package is not installed: {onnx_runtime.INSTALL_HINT}, then export "
      "again",
    }
  from resfuse_jax.serving import onnx_graph

  config = predictor.config
  name = config.model.variant
  window = tuple(int(w) for w in config.data.patch_size)
  metadata = {
    "resfuse_jax.step": str(predictor.step),
    "resfuse_jax.model": name,
    "resfuse_jax.regions": json.dumps(list(predictor.dataset.region_names)),
    "resfuse_jax.window": json.dumps(list(window)),
    "resfuse_jax.deploy": json.dumps(deploy),
  }
  try:
    proto = onnx_graph.to_onnx(predictor.model, predictor.params, window, name, metadata)
  except onnx_graph.NotExportable as e:
    if mode == "yes":
      raise
    logging.warning("no %s: %s", onnx_runtime.FILE, e)
    return {"written": False, "reason": str(e)}
  path = folder / onnx_runtime.FILE
  files.write_bytes(path, proto.SerializeToString())
  return {
    "written": True,
    "file": onnx_runtime.FILE,
    "sha256": files.sha256(path),
    "opset": onnx_graph.OPSET,
    "ir_version": onnx_graph.IR_VERSION,
    "inputs": {n: ["n", 1, *window] for n in onnx_runtime.INPUTS},
    "outputs": {n: ["n", len(predictor.dataset.regions), *window] for n in onnx_runtime.OUTPUTS},
    "dtype": "float32",
  }


def _metadata(predictor: Predictor, workdir: Path | None) -> dict:
  config, regions = predictor.config, predictor.dataset.regions
  patch = ", ".join(map(str, config.data.patch_size))
  return {
    "format": checkpointing.EXPORT_FORMAT,
    "step": predictor.step,
    "source_workdir": None if workdir is None else str(workdir.absolute()),
    "model": config.model.name,
    "variant": config.model.variant,
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


@contextlib.contextmanager
def atomic_folder(output: Path) -> Iterator[Path]:
  """Yields a temporary folder beside ``output``, renamed to ``output`` when the block ends.

  On any failure the temporary is removed: a killed or failed export never leaves a
  folder under the final name, nor one that looks finished.
  """
  tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
  files.remove_orphaned_tmp_dirs(output.parent, ".*.tmp-*")  # a killed export's leftovers
  files.make_owned_tmp_dir(tmp)
  try:
    yield tmp
    (tmp / files.TMP_OWNER).unlink()  # the record of who writes it, not part of E
    tmp.rename(output)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, UserError):
      raise
    raise files.output_error(output, e) from e
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    reason = files.disk_full_reason(e)
    if reason is not None:  # tensorstore's RESOURCE_EXHAUSTED is not an OSError
      raise OutputError(f"cannot write the export {output}: {reason}; nothing was left") from None
    raise


def export_model(
  workdir: str | Path,
  output: str | Path,
  step: int | None = None,
  onnx: str = "auto",
  agreement_cases: int = agreement.DEFAULT_CASES,
) -> Path:
  """Writes the export folder ``output`` (which must not exist) from ``workdir``.

  ``onnx``: whether to write ``model.onnx`` (`write_onnx`); ``agreement_cases``: the
  validation cases the bf16 agreement check runs (`agreement.bf16_agreement`; 0: none).
  """
  outputs.refuse_overlaps(output_folders=[("--output", output)], protected=[("--workdir", workdir)])
  if Path(output).exists():
    raise CheckpointError(f"--output={output} already exists; remove it or choose another path")
  if onnx not in ONNX_MODES:
    raise ConfigError(f"--onnx must be one of {', '.join(ONNX_MODES)}; got {onnx!r}")
  loaded = Predictor.load(workdir, step)
  return write_export(loaded, output, onnx, Path(workdir), agreement_cases)


def write_export(
  predictor: Predictor,
  output: str | Path,
  onnx: str = "auto",
  workdir: Path | None = None,
  agreement_cases: int = agreement.DEFAULT_CASES,
) -> Path:
  """Writes the export folder ``output`` of a loaded ``predictor``; ``workdir``: its source,
  whose chosen post-processing travels with it and whose validation cases the bf16
  agreement check runs (``agreement_cases`` of them)."""
  output = Path(output)
  if workdir is not None:
    outputs.refuse_overlaps(
      output_folders=[("--output", output)], protected=[("--workdir", workdir)]
    )
  if output.exists():
    raise CheckpointError(f"--output={output} already exists; remove it or choose another path")
  with atomic_folder(output) as tmp:
    files.write_json(tmp / CONFIG, predictor.config.to_dict())
    chosen = None if workdir is None else Workdir(workdir).postprocessing_file
    if chosen is not None and chosen.is_file():  # the rules chosen on validation travel along
      files.write_bytes(tmp / POSTPROCESSING, chosen.read_bytes())
    digests = checkpointing.save_export_params(tmp, predictor.params)
    serving = tmp / checkpointing.EXPORT_SERVING_FILE
    serving.parent.mkdir()
    serving.write_bytes(serving_function(predictor).serialize())
    deploy = deployment(predictor, predictor.rules)
    onnx_record = write_onnx(tmp, predictor, onnx, deploy)
    if onnx_record["written"]:
      graph, sha = tmp / onnx_runtime.FILE, onnx_record["sha256"]
      bf16 = agreement.bf16_agreement(predictor, graph, sha, workdir, agreement_cases)
    else:
      bf16 = {"measured": False, "reason": f"no {onnx_runtime.FILE}: {onnx_record['reason']}"}
    meta = _metadata(predictor, workdir)
    record = {**meta, "onnx": onnx_record, "deploy": deploy, "param_digests": digests}
    record[precision.KEY] = bf16
    files.write_json(tmp / integrity.EXPORT_JSON, integrity.seal(record, tmp))
  return output
