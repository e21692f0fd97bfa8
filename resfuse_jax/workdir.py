"""The workdir W: the one module that names its files, holds its lock and says what a run is.

Every command asks ``Workdir`` for W's paths (train writes them, evaluate, predict,
export and compare read them), so each file name of W is spelled here only. Besides
the names it owns three rules:

- the lock: one training run (or comparison) per folder, held for the whole run;
- resume: which settings may differ from ``W/config.json`` when a run continues
  (``RUNTIME_ONLY``, ``resume_conflicts``), and what an older ``config.json`` ran at
  for keys added since (``config_lib.fill_defaults`` with ``ADDED_LATER``);
- the same run: a finished W is reused (``compare``) only for a config that differs
  from its own in runtime-only settings at most (``Workdir.finished_run``).

A cross-validation (``main --folds=all``) is a W holding ``folds.json`` and one
ordinary workdir per fold, ``W/fold_<k>/``, each resumable on its own; W itself holds
the shared config and the pooled out-of-fold results in the files a single run's W
has (``results.json``, ``metrics.csv``, ``postprocessing.json``), so every reader of
a W's results reads both alike.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import ml_collections
from absl import logging

from resfuse_jax import checkpointing, config_lib, data, files, validation
from resfuse_jax.errors import CheckpointError, ConfigError, DataError

CONFIG = "config.json"  # the resolved config; an export folder holds one too
SPLITS = "splits.json"
FOLDS = "folds.json"  # a cross-validation's W: {"num_folds", "folds"} (W/fold_<k>/ each a W)
FOLD_PREFIX = "fold_"
PLAN = "plan.json"  # the training geometry planned for this run (main --plan), as applied
RESULTS = "results.json"
METRICS = "metrics.csv"  # one row per validation case
METRICS_POSTPROCESSED = "metrics_postprocessed.csv"
POSTPROCESSING = "postprocessing.json"  # the rules chosen on validation; exports carry it
VALIDATION_MASKS = "validation_masks.npz"  # the final validation's masks (pooling folds)
BAD_CASES = "bad_cases.json"  # also what predict writes beside its outputs
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
REPORT = "report.md"
FIGURES = "figures"
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", "sweep.png"
SWEEP_FILES = (SWEEP_JSON, SWEEP_MD, SWEEP_PNG)

# Settings that change neither the parameters nor the data: a resumed run may differ in them.
RUNTIME_ONLY = {
  "model": {"conv_impl", "downsample", "upsample", "conv_layout"},
  "data": {
    "workers", "prefetch", "read_threads", "preprocess_workers", "cache_dir", "on_bad_case",
    "max_voxels", "max_bytes", "spacing_range", "resident_memory_fraction",
  },
}  # fmt: skip
# The sections that say which model trains on which data: a resume may not change them.
RUN_IDENTITY = ("model", "data")
# Per dataset, keys added after runs were written: a saved config without one ran at this value
# (keys of ``config_lib.base_config`` need no entry: ``fill_defaults`` knows them).
ADDED_LATER = {
  "phantom": {"data": {knob: 0.0 for knob in data.PHANTOM_KNOBS}},
  "breast": {"data": {"post_phase": 1}},  # the first post-contrast phase, _0001
  "manifest": {"data": {"manifest": "", "label_names": "lesion"}},  # label_names: the SEG
}


def parse_folds(spec: str, num_folds: int, flag: str = "--folds") -> list[int]:
  """``all`` or ``0,2,...`` -> the fold indices, each in [0, num_folds)."""
  if spec.strip() == "all":
    return list(range(num_folds))
  try:
    folds = sorted({int(k) for k in spec.split(",") if k.strip()})
  except ValueError:
    raise ConfigError(f"{flag} must be 'all' or fold numbers such as 0,1,2; got {spec!r}") from None
  wrong = [k for k in folds if not 0 <= k < num_folds]
  if not folds or wrong:
    raise ConfigError(
      f"{flag}={spec}: folds must be 0 .. {num_folds - 1} (data.num_folds={num_folds})"
    )
  return folds


def read_config(path: str | Path) -> ml_collections.ConfigDict:
  """``config.json`` of a training workdir or an export folder, with newer keys filled in."""
  config_path = Path(path) / CONFIG
  if not config_path.is_file():
    raise CheckpointError(
      f"{path} is neither a training workdir nor an export: {config_path} is missing"
    )
  config = config_lib.fill_defaults(_read_json(config_path, "it describes this run"), ADDED_LATER)
  validation.check(config, where=str(config_path))
  return config


def _read_json(path: Path, why: str) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); {why}") from None


def _plain(config) -> dict:
  """A config as JSON would store it (tuples as lists)."""
  as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  return json.loads(json.dumps(as_dict))


def differences(saved: dict, config, sections=None) -> list[str]:
  """``section.key: saved -> new`` for every setting (not runtime-only) that differs.

  ``saved`` is a ``config.json`` as read (older ones are filled, ``ADDED_LATER``);
  ``sections``: the top-level keys to compare (default all; a scalar such as ``seed``
  compares as itself).
  """
  old = _plain(config_lib.fill_defaults(saved, ADDED_LATER))
  new = _plain(config)
  out = []
  for section in sorted(sections or set(old) | set(new)):
    old_s, new_s = old.get(section, "(unset)"), new.get(section, "(unset)")
    if not (isinstance(old_s, dict) and isinstance(new_s, dict)):
      if old_s != new_s:
        out.append(f"{section}: {old_s!r} -> {new_s!r}")
      continue
    for key in sorted((set(old_s) | set(new_s)) - RUNTIME_ONLY.get(section, set())):
      before, after = old_s.get(key, "(unset)"), new_s.get(key, "(unset)")
      if before != after:
        out.append(f"{section}.{key}: {before!r} -> {after!r}")
  return out


def resume_conflicts(saved: dict, config) -> list[str]:
  """The model and data settings in which ``config`` differs from a saved run's."""
  return differences(saved, config, RUN_IDENTITY)


class Results:
  """A folder of results: training's W, or evaluate's ``W/eval-<step>[-tta]/``."""

  def __init__(self, path: str | Path):
    self.path = Path(path)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({str(self.path)!r})"

  results_file = property(lambda self: self.path / RESULTS)
  metrics_file = property(lambda self: self.path / METRICS)
  metrics_postprocessed_file = property(lambda self: self.path / METRICS_POSTPROCESSED)
  postprocessing_file = property(lambda self: self.path / POSTPROCESSING)
  validation_masks_file = property(lambda self: self.path / VALIDATION_MASKS)
  report_file = property(lambda self: self.path / REPORT)
  figures_dir = property(lambda self: self.path / FIGURES)

  def make(self) -> Results:
    files.make_dirs(self.path)
    return self

  def write_results(self, results: dict) -> None:
    files.write_json(self.results_file, results)

  def read_results(self) -> dict | None:
    """``results.json``, or None when the folder holds none."""
    if not self.results_file.is_file():
      return None
    return _read_json(self.results_file, "it holds this run's results")


class Workdir(Results):
  """A training workdir: its config, splits, checkpoints, lock and results."""

  config_file = property(lambda self: self.path / CONFIG)
  splits_file = property(lambda self: self.path / SPLITS)
  plan_file = property(lambda self: self.path / PLAN)
  folds_file = property(lambda self: self.path / FOLDS)
  checkpoints_dir = property(lambda self: self.path / CHECKPOINTS)
  bad_cases_file = property(lambda self: self.path / BAD_CASES)
  comparison_json = property(lambda self: self.path / COMPARISON_JSON)
  comparison_md = property(lambda self: self.path / COMPARISON_MD)

  def sweep_file(self, name: str) -> Path:
    if name not in SWEEP_FILES:
      raise ValueError(f"{name!r} is not one of a sweep's files {SWEEP_FILES}")
    return self.path / name

  def eval_dir(self, step: int, tta: bool) -> Results:
    """Where ``evaluate`` writes: its own folder, never training's files."""
    return Results(self.path / f"eval-{int(step)}{'-tta' if tta else ''}")

  def folds_eval_dir(self, tta: bool) -> Results:
    """Where ``evaluate`` of a cross-validation writes the pooled folds: never training's files."""
    return Results(self.path / f"eval-folds{'-tta' if tta else ''}")

  @contextlib.contextmanager
  def lock(self, what: str = "training run") -> Iterator[Path]:
    """Holds ``W/.lock`` for the block; a second holder fails at once naming the first."""
    with files.exclusive_lock(files.make_dirs(self.path) / LOCK, what) as path:
      yield path

  def read_config(self) -> ml_collections.ConfigDict:
    return read_config(self.path)

  def fold(self, k: int) -> Workdir:
    """``W/fold_<k>/``: fold k of a cross-validation, an ordinary workdir."""
    return Workdir(self.path / f"{FOLD_PREFIX}{int(k)}")

  def is_cross_validation(self) -> bool:
    return self.folds_file.is_file()

  def write_folds(self, num_folds: int, folds: list[int]) -> None:
    files.write_json(self.folds_file, {"num_folds": int(num_folds), "folds": sorted(folds)})

  def read_folds(self) -> dict:
    """``folds.json``: ``{"num_folds": n, "folds": [k, ...]}`` (the folds this W trains)."""
    if not self.is_cross_validation():
      raise CheckpointError(f"{self.path} is not a cross-validation: {FOLDS} is missing")
    record = _read_json(self.folds_file, "it names the folds of this cross-validation")
    if not isinstance(record.get("folds"), list) or not isinstance(record.get("num_folds"), int):
      raise CheckpointError(f"{self.folds_file} must hold 'num_folds' and a list of 'folds'")
    return record

  def finished_folds(self) -> list[int]:
    """The folds of this cross-validation whose training finished (their results.json)."""
    return [k for k in self.read_folds()["folds"] if self.fold(k).results_file.is_file()]

  def has_checkpoint(self) -> bool:
    """Whether W (or, for a cross-validation, one of its folds) holds a finished checkpoint."""
    if self.is_cross_validation():
      return any(self.fold(k).has_checkpoint() for k in self.read_folds()["folds"])
    if not self.checkpoints_dir.is_dir() or not any(self.checkpoints_dir.iterdir()):
      return False
    return bool(checkpointing.checkpoint_steps(self.checkpoints_dir))

  def claim(self, config: ml_collections.ConfigDict, cross_validation: bool = False) -> None:
    """Refuses a rerun whose model or data differ from a trained W's config, then writes it.

    A single run and a cross-validation never share a W (``cross_validation``: this
    claim is a cross-validation's).

    Checked before anything is written, so a refused run leaves the workdir as it was.
    A W without a checkpoint (a first run that failed before its first save, e.g. on a
    wrong data root) holds nothing to mix with: it takes the new settings, and the
    splits it made from the old data are dropped.
    """
    if self.is_cross_validation() and not cross_validation:
      raise CheckpointError(
        f"{self.path} holds a cross-validation ({FOLDS}, {FOLD_PREFIX}<k>/): rerun it with "
        "--folds, give one fold's folder as --workdir, or use a new --workdir"
      )
    if cross_validation and not self.is_cross_validation() and self.has_checkpoint():
      raise CheckpointError(
        f"{self.path} holds a single training run; a cross-validation needs a new --workdir"
      )
    if self.config_file.exists():
      saved = _read_json(self.config_file, "it describes this workdir's run")
      conflicts = resume_conflicts(saved, config)
      if conflicts and not self.has_checkpoint():
        logging.info(
          "%s has no checkpoint: its settings are replaced (%s)", self.path, "; ".join(conflicts)
        )
        for stale in (self.splits_file, self.bad_cases_file):
          stale.unlink(missing_ok=True)
      elif conflicts:
        raise CheckpointError(
          f"{self.path} holds a run of another model or data; resuming it with this config "
          f"would mix the two. Differences from {self.config_file}: {'; '.join(conflicts[:6])}"
          + (f" (and {len(conflicts) - 6} more)" if len(conflicts) > 6 else "")
          + ". Use a new --workdir, or the workdir's own settings"
        )
    files.write_json(self.config_file, config.to_dict())

  def finished_run(self, config: ml_collections.ConfigDict) -> dict | None:
    """The results of this W when it holds a finished run of ``config``, else None.

    The same run: ``train.steps`` reached and no setting but runtime-only ones differs.
    """
    results = self.read_results()
    if results is None or not self.metrics_file.is_file() or not self.config_file.is_file():
      return None
    saved = _read_json(self.config_file, "it describes this workdir's run")
    if results.get("steps") != config.train.steps or differences(saved, config):
      return None
    return results

  def splits(self, case_ids: list[str], data_config) -> dict:
    """``splits.json`` of a resumed run (a fold never changes under a checkpoint), or new."""
    if self.splits_file.exists():
      splits = _read_json(self.splits_file, "it names this run's training and validation cases")
      missing = sorted(set(splits["train"] + splits["val"]) - set(case_ids))
      if missing:
        raise DataError(
          f"{self.splits_file} names cases no longer found under data.root: {missing[:5]}"
        )
      return splits
    return data.make_splits(
      case_ids, data_config.fold, data_config.num_folds, data_config.split_seed
    )

  def read_splits(self) -> dict:
    if not self.splits_file.is_file():
      raise CheckpointError(f"{self.path} has no {SPLITS}: not a training workdir")
    return _read_json(self.splits_file, "it names this run's validation cases")

  def write_plan(self, record: dict) -> None:
    files.write_json(self.plan_file, record)

  def write_splits(self, splits: dict, bad_cases: list[dict]) -> None:
    files.write_json(self.splits_file, splits)
    if bad_cases:
      files.write_json(self.bad_cases_file, bad_cases)
