"""The export of a cross-validation: one ordinary export per fold, and the ensemble around them.

``export --workdir=W`` of a cross-validation W (``main --folds=all``) writes ``E/``:

- ``fold_<k>/``: the export of ``W/fold_<k>/`` (`exporting.write_export`: its config,
  parameters, serving function, ``model.onnx``, its own fold's post-processing), one per
  finished fold or per fold ``--folds`` names;
- ``config.json``: W's shared config (preprocessing, thresholds, regions);
- ``postprocessing.json``: W's, chosen on the pooled out-of-fold predictions: what
  ``predict --model=E`` applies to the mean of the members' probabilities;
- ``export.json``: format ``checkpointing.ENSEMBLE_FORMAT``, the members and how they
  combine, sealed (`integrity.seal`) with the digests of the two files above and of each
  member's ``export.json``, which in turn covers the member's files.

Like one model's export, E is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

import flax
import jax

from resfuse_jax import checkpointing, files, workdir
from resfuse_jax.errors import CheckpointError, ConfigError
from resfuse_jax.inference import integrity, outputs, postprocess
from resfuse_jax.inference.ensemble import EnsemblePredictor
from resfuse_jax.serving import agreement, exporting

COMBINE = (
  "mean of the members' region probabilities [D, H, W, R] (each member's own sliding "
  "window), then the thresholds of config.json and the rules of postprocessing.json"
)


def _record(ensemble_: EnsemblePredictor, source: Path, num_folds: int) -> dict:
  """``export.json``'s content before sealing: the members and what the ensemble is."""
  config, regions = ensemble_.config, ensemble_.dataset.regions
  return {
    "format": checkpointing.ENSEMBLE_FORMAT,
    "source_workdir": str(source.absolute()),
    "num_folds": int(num_folds),
    "members": {str(k): f"{workdir.FOLD_PREFIX}{k}" for k in ensemble_.folds},
    "steps": {str(k): int(s) for k, s in zip(ensemble_.folds, ensemble_.steps)},
    "combine": COMBINE,
    "model": config.model.name,
    "variant": config.model.variant,
    "dataset": config.data.name,
    "regions": list(regions),
    "label_values": postprocess.region_label_values(regions),
    "params": ensemble_.num_params,
    "versions": {"jax": jax.__version__, "flax": flax.__version__},
  }


def export_ensemble(
  source: str | Path,
  output: str | Path,
  folds: str | None = None,
  onnx: str = "auto",
  agreement_cases: int = agreement.DEFAULT_CASES,
) -> Path:
  """Writes the ensemble export ``output`` (which must not exist) of the cross-validation
  ``source``; ``folds``: ``all`` or ``0,1`` (default every finished fold); ``onnx``:
  each member's ``model.onnx`` (`exporting.write_onnx`); ``agreement_cases``: each
  member's bf16 agreement check, on its own fold's validation cases."""
  source, output = Path(source), Path(output)
  outputs.refuse_overlaps(output_folders=[("--output", output)], protected=[("--workdir", source)])
  if output.exists():
    raise CheckpointError(f"--output={output} already exists; remove it or choose another path")
  if onnx not in exporting.ONNX_MODES:
    raise ConfigError(f"--onnx must be one of {', '.join(exporting.ONNX_MODES)}; got {onnx!r}")
  if not workdir.Workdir(source).is_cross_validation():
    raise CheckpointError(f"{source} is not a cross-validation: {workdir.FOLDS} is missing")
  loaded = EnsemblePredictor.load(source, folds, backend="jax")
  num_folds = workdir.Workdir(source).read_folds()["num_folds"]
  chosen = workdir.Workdir(source).postprocessing_file
  with exporting.atomic_folder(output) as tmp:
    for k, member in zip(loaded.folds, loaded.members):
      fold = workdir.Workdir(source).fold(k)
      exporting.write_export(member, tmp / fold.path.name, onnx, fold.path, agreement_cases)
    files.write_bytes(tmp / workdir.CONFIG, workdir.Workdir(source).config_file.read_bytes())
    if chosen.is_file():
      files.write_bytes(tmp / workdir.POSTPROCESSING, chosen.read_bytes())
    record = _record(loaded, source, num_folds)
    covered = tuple(f"{name}/{integrity.EXPORT_JSON}" for name in record["members"].values())
    files.write_json(tmp / integrity.EXPORT_JSON, integrity.seal(record, tmp, covered))
  return output


def describe(path: str | Path) -> str:
  """One line on an ensemble export: its folds and whether each member has ``model.onnx``."""
  meta = integrity.verify_ensemble(path)
  folders = list(meta["members"].values())
  onnx = [checkpointing.export_metadata(Path(path, f))["onnx"] for f in folders]
  missing = [o.get("reason", "") for o in onnx if not o.get("written")]
  note = f"{len(missing)} without model.onnx ({missing[0]})" if missing else "each with model.onnx"
  n = len(folders)
  return f"an ensemble of {n} fold{'s' * (n != 1)} ({', '.join(meta['members'])}), {note}"
