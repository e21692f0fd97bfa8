"""The folds of a cross-validation as one predictor: the mean of their region probabilities.

A cross-validation W (``main --folds=all``: ``W/fold_<k>/``) or its ensemble export E
(``export --workdir=W``: ``E/fold_<k>/``) predicts with every finished fold, or with
those ``--folds`` names. Each member computes its own whole-volume probabilities
[D, H, W, R] (its own tiling, TTA and window function) on the one preprocessed case;
the ensemble averages them, then thresholds and applies the post-processing chosen on
the pooled out-of-fold predictions (W's or E's ``postprocessing.json``). Averaging the
stitched volumes equals averaging per window: the Gaussian blend and the mirroring are
linear in the window probabilities (`MeanWindow` is that per-window form).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from resfuse_jax import data, workdir
from resfuse_jax.errors import CheckpointError, ConfigError
from resfuse_jax.inference import integrity, runtimes
from resfuse_jax.inference.postprocess import Rule
from resfuse_jax.inference.predictor import Predictor, chosen_rules
from resfuse_jax.task import Task


def is_ensemble(path: str | Path) -> bool:
  """A cross-validation W (``folds.json``) or an ensemble export (``serving.ensembles``)."""
  return workdir.Workdir(path).is_cross_validation() or integrity.is_ensemble_export(path)


def _listed(folds) -> str:
  return ", ".join(str(k) for k in folds)


def _export_members(path: Path, folds: str | None) -> list[tuple[int, Path]]:
  """The members of an ensemble export, verified (`integrity.verify_ensemble`)."""
  meta = integrity.verify_ensemble(path)
  held = {int(k): path / folder for k, folder in meta["members"].items()}
  if folds is None:
    return sorted(held.items())
  chosen = workdir.parse_folds(folds, int(meta["num_folds"]))
  missing = [k for k in chosen if k not in held]
  if missing:
    raise ConfigError(
      f"--folds={folds}: the ensemble export {path} holds folds {_listed(sorted(held))}, "
      f"not {_listed(missing)}"
    )
  return [(k, held[k]) for k in chosen]


def _workdir_members(path: Path, folds: str | None) -> list[tuple[int, Path]]:
  """The finished folds of a cross-validation W (those named, each required finished)."""
  w = workdir.Workdir(path)
  trained, finished = w.read_folds()["folds"], w.finished_folds()
  if folds is None:
    if not finished:
      raise CheckpointError(
        f"{path} holds no finished fold: none of {_listed(w.fold(k).path.name for k in trained)} "
        f"has {workdir.RESULTS} yet; finish training them first (main --workdir={path} --folds=all)"
      )
    return [(k, w.fold(k).path) for k in finished]
  chosen = workdir.parse_folds(folds, int(w.read_folds()["num_folds"]))
  absent = [k for k in chosen if k not in trained]
  if absent:
    raise ConfigError(
      f"--folds={folds}: {path} trains folds {_listed(trained)}, not {_listed(absent)}"
    )
  unfinished = [k for k in chosen if k not in finished]
  if unfinished:
    raise CheckpointError(
      f"--folds={folds}: fold {_listed(unfinished)} of {path} has not finished training "
      f"({w.fold(unfinished[0]).results_file} is missing); finish it first or leave it out "
      "of --folds"
    )
  return [(k, w.fold(k).path) for k in chosen]


def members(path: str | Path, folds: str | None = None) -> list[tuple[int, Path]]:
  """(fold, folder) of each member: ``folds`` (``all`` or ``0,1``; None: every finished fold
  of W, every member of an export). Reads no parameters."""
  path = Path(path)
  if integrity.is_ensemble_export(path):
    return _export_members(path, folds)
  if not workdir.Workdir(path).is_cross_validation():
    raise ConfigError(
      f"--folds needs a cross-validation (a workdir with {workdir.FOLDS}: main --folds=all) "
      f"or its ensemble export; {path} holds one model"
    )
  return _workdir_members(path, folds)


def check_agreement(config, chosen: list[tuple[int, Path]], source: Path) -> None:
  """Refuses members trained with other model or data settings than the shared config's
  (``data.fold`` aside): their probabilities would be on another grid or of another task."""
  for k, folder in chosen:
    own = workdir.read_config(folder).to_dict()
    found = workdir.differences(own, config, workdir.RUN_IDENTITY)
    found = [d for d in found if not d.startswith("data.fold:")]
    if found:
      raise CheckpointError(
        f"{folder} (fold {k}) differs from {source / workdir.CONFIG} in {'; '.join(found[:4])}; "
        "its probabilities cannot be averaged with the other folds'"
      )


class MeanWindow:
  """[N, d, h, w, 2] tiles -> the members' mean [N, d, h, w, R] probabilities (host tiling)."""

  def __init__(self, windows: list[Callable[[np.ndarray], np.ndarray]]):
    self.windows = windows
    self.fixed_batch = any(getattr(w, "fixed_batch", True) for w in windows)

  def __call__(self, tiles: np.ndarray) -> np.ndarray:
    total = np.asarray(self.windows[0](tiles), np.float32).copy()
    for window in self.windows[1:]:
      total += np.asarray(window(tiles), np.float32)
    return total / len(self.windows)


class EnsemblePredictor:
  """Several folds' `Predictor` s behind `Predictor`'s interface (what ``prediction`` and
  ``evaluation`` use): ``config``, ``task``, ``rules``, ``probabilities``, ``window_fn``...

  ``config``: the shared config (W's or E's ``config.json``: preprocessing, thresholds,
  regions); ``rules``: the post-processing applied to the mean; the members' own rules are
  not applied.
  """

  def __init__(
    self,
    config,
    members_: list[tuple[int, Predictor]],
    rules: list[Rule] | None = None,
    task: Task | None = None,
  ):
    if not members_:
      raise ValueError("an ensemble needs at least one member")
    self.config = config
    self.task = task if task is not None else Task.from_config(config)
    self.dataset, self.model = self.task.dataset, self.task.model
    self.folds = [k for k, _ in members_]
    self.members = [m for _, m in members_]
    self.rules = rules
    self.backend = "+".join(sorted({m.backend for m in self.members}))
    self.backend_note = "; ".join(
      dict.fromkeys(m.backend_note for m in self.members if m.backend_note)
    )
    self.steps = [m.step for m in self.members]
    self.step = max(self.steps)  # the newest member's: each fold has its own (``steps``)

  @classmethod
  def load(
    cls,
    path: str | Path,
    folds: str | None = None,
    backend: str = "auto",
    postprocessing: str = "auto",
    settings: runtimes.WindowSettings | None = None,
    graphs: runtimes.GraphSource | None = None,
  ) -> EnsemblePredictor:
    """``path``: a cross-validation W or its ensemble export; ``folds``: see `members`.

    ``backend``: `runtimes.choose` per member; ``auto`` runs a runtime (OpenVINO first)
    only when it would for every member (each export member has ``model.onnx``, or
    ``graphs`` builds each fold's), JAX otherwise. ``settings``, ``graphs``: as for one
    `Predictor`. ``postprocessing``: ``auto`` is the choice on the pooled out-of-fold
    predictions (``path/postprocessing.json``), as for one model.
    """
    path = Path(path)
    chosen = members(path, folds)  # an export is verified here, before anything is read
    config = workdir.read_config(path)
    check_agreement(config, chosen, path)
    task = Task.from_config(config)
    rules = chosen_rules(workdir.Workdir(path), task, postprocessing)
    resolved = {runtimes.choose(backend, folder, graphs)[0] for _, folder in chosen}
    same = backend if len(resolved) == 1 else "jax"  # each member resolves it alike
    loaded = [
      (k, Predictor.load(folder, None, same, "auto", settings, graphs)) for k, folder in chosen
    ]
    ensemble = cls(config, loaded, rules, task)
    if len(resolved) > 1:
      ensemble.backend_note = f"{backend}: the folds differ ({', '.join(sorted(resolved))})"
    return ensemble

  @property
  def num_params(self) -> int:
    """Every member's parameters: what the ensemble runs per window."""
    return sum(m.num_params for m in self.members)

  def parameter_digests(self) -> dict[str, str]:
    """Each fold's `Predictor.parameters_sha256`, keyed ``fold_<k>_parameters_sha256``."""
    return {
      f"{workdir.FOLD_PREFIX}{k}_parameters_sha256": m.parameters_sha256()
      for k, m in zip(self.folds, self.members)
    }

  def describe(self) -> str:
    """``ensemble of 2 folds: 0, 1; steps 600, 600; jax``: what a command's line reports."""
    n = len(self.folds)
    steps = f"step{'s' * (n > 1)} {_listed(self.steps)}"
    return f"ensemble of {n} fold{'s' * (n > 1)}: {_listed(self.folds)}; {steps}; {self.backend}"

  def window_fn(self) -> MeanWindow:
    return MeanWindow([m.window_fn() for m in self.members])

  def probabilities(self, case: data.Case, tta: bool = False, placement: str = "auto"):
    """[D, H, W, R]: the mean of the members' probabilities on the case's grid.

    A member whose probabilities are not finite (damaged parameters) is named and refused.
    """
    total = None
    for k, member in zip(self.folds, self.members):
      probs = np.asarray(member.probabilities(case, tta, placement), np.float32)
      if not np.isfinite(probs).all():
        raise CheckpointError(
          f"fold {k} of the ensemble (checkpoint step {member.step}) gave non-finite "
          f"probabilities for case {case.case_id}: its parameters are damaged (leave it out "
          "with --folds)"
        )
      total = probs.copy() if total is None else np.add(total, probs, out=total)
    return total / len(self.members)

  def fusion_heat(self, case: data.Case) -> np.ndarray | None:
    """[D, H, W]: the members' mean fusion heat map; None if the model sows none."""
    heats = [m.fusion_heat(case) for m in self.members]
    if any(h is None for h in heats):
      return None
    return np.mean(heats, axis=0)
