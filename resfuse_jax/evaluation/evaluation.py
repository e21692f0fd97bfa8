"""The one evaluation path: training's validation and ``python -m resfuse_jax.evaluate``.

Both call ``evaluate_cases`` and end with ``finalize.finalize``. Training owns the
results in W; ``evaluate_workdir`` writes its own folder (``Workdir.eval_dir``) and
never touches what training wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from resfuse_jax import data, files
from resfuse_jax.errors import CheckpointError
from resfuse_jax.evaluation import grids, metrics, postprocess_selection, report
from resfuse_jax.evaluation.finalize import finalize
from resfuse_jax.inference import outputs, postprocess, tiler
from resfuse_jax.inference.predictor import Predictor
from resfuse_jax.task import Task
from resfuse_jax.workdir import Workdir, read_config

CaseHook = Callable[[data.Case, np.ndarray, np.ndarray, dict], None]


def evaluate_cases(
  predict: Callable[[np.ndarray], np.ndarray],
  cases: list[data.Case],
  config: ml_collections.ConfigDict,
  *,
  batch_size: int | None = None,
  tta: bool = False,
  lesion_wise: bool = False,
  on_case: CaseHook | None = None,
  rules: list[postprocess.Rule] | None = None,
  grid: str = grids.ORIGINAL,
  collect: list[postprocess_selection.CaseMasks] | None = None,
) -> metrics.RegionMetrics:
  """Sliding-window prediction of whole volumes, post-processed, scored per case.

  Args:
    predict: window function, [N, d, h, w, 2] tiles -> [N, d, h, w, R] probabilities.
    cases: labelled cases on their preprocessed grid.
    config: the run's config (window, overlap, thresholds, component filter, regions).
    tta: average the 8 mirrored predictions.
    lesion_wise: add BraTS 2023 lesion-wise Dice and HD95 (rules in mm: 3 mm, 50 mm³).
    on_case: called with (case, probabilities [D, H, W, R], masks [D, H, W, R], metrics row);
      probabilities and masks on the preprocessed grid (what figures overlay).
    rules: post-processing per region (default none); masks are nested either way, as the
      label map ``predict`` writes reads them.
    grid: where the scores are computed (``grids``): ``original`` (default: each case's
      source grid and label file, the numbers to report) or ``resampled`` (the
      preprocessed grid: a cheap progress signal during training).
    collect: receives every case's cropped thresholded masks and reference on ``grid``
      (what the post-processing is chosen on).
  """
  dataset = Task.from_config(config).dataset
  settings = postprocess.settings_from_config(config.eval)
  limits = data.input_limits(config.data)
  acc = metrics.RegionMetrics(dataset.region_names, lesion_wise=lesion_wise)
  for case in cases:
    if case.label is None:
      raise data.DataError(f"case {case.case_id} has no label: it cannot be evaluated")
    probs = tiler.predict_volume(
      predict, case, config, batch_size, mirror_axes=(0, 1, 2) if tta else ()
    )
    thresholded = postprocess.threshold(probs, **settings)
    scored = grids.case_masks(case, thresholded, dataset.regions, grid, limits)
    pred = postprocess.apply_rules(scored.pred, rules, scored.spacing)
    row = acc.add(case.case_id, pred, scored.ref, scored.spacing)
    if collect is not None:
      collect.append(scored)
    if on_case is not None:
      on_case(case, probs, postprocess.apply_rules(thresholded, rules, case.spacing), row)
  return acc


def figure_writer(folder: Path, predictor: Predictor) -> CaseHook:
  """``folder/<case>.png`` per evaluated case: scans, prediction, reference, fusion heat."""
  from resfuse_jax import visualize  # matplotlib only when figures are asked for

  def write(case, probs, masks, row):
    del probs, row
    visualize.case_figure(
      files.under(folder, f"{files.check_name(case.case_id, str(folder))}.png"),
      case.case_id,
      case.pre,
      case.post,
      postprocess.masks_to_labels(masks, predictor.dataset.regions),
      np.asarray(case.label),
      predictor.fusion_heat(case),
      brats_colours=predictor.dataset.brats_like,
    )

  return write


def validate_predictor(
  predictor: Predictor,
  val_ids: list[str],
  tta: bool,
  figures_dir: Path | None,
  cache_dir: str | Path | None,
) -> tuple[metrics.RegionMetrics, list[postprocess_selection.CaseMasks]]:
  """Scores ``predictor`` on the cases ``val_ids`` on their original grids; returns the
  metrics and every case's masks (what ``finalize`` chooses the post-processing on).

  The preprocessed cache (and a phantom whose files are missing) goes to the running
  user's cache (``cache_dir``, else ``$RESFUSE_CACHE``, else the default), never where the
  model's ``config.json`` says (``data.confined_to_user_cache``).
  """
  config, task = predictor.config, predictor.task
  data_config = data.confined_to_user_cache(config.data, cache_dir)
  cache, _, _ = data.prepare(data_config, progress=False)
  cases = data.load_cases(cache, val_ids)
  figure = figure_writer(figures_dir, predictor) if figures_dir is not None else None
  collected: list[postprocess_selection.CaseMasks] = []

  def log_case(case, probs, masks, row):
    if figure is not None:
      figure(case, probs, masks, row)
    dice = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("dice_"))
    logging.info("%s: %s", case.case_id, dice)

  acc = evaluate_cases(
    predictor.window_fn(),
    cases,
    config,
    tta=tta,
    lesion_wise=task.dataset.brats_like,
    on_case=log_case,
    grid=grids.ORIGINAL,
    collect=collected,
  )
  return acc, collected


def evaluate_workdir(
  workdir: str | Path,
  step: int | None = None,
  tta: bool = False,
  figures: bool = True,
  cache_dir: str | Path | None = None,
) -> tuple[Path, dict]:
  """Evaluates a trained workdir on every case of its validation fold.

  Every score is computed on each case's original grid against its source label file
  (``grids``). Writes ``W/eval-<step>[-tta]/`` (``Workdir.eval_dir``) through ``finalize``: results
  (training's keys plus standard deviations, the TTA flag, for BraTS regions lesion-wise
  metrics, and ``postprocessed``: the same after the rules chosen on these cases), those
  rules, per-case rows before and after them; then the paper-layout report and a figure
  per case. Returns (that folder, results). Where the cache goes: `validate_predictor`.
  """
  w = Workdir(workdir)
  predictor = Predictor.load(w.path, step)
  task = predictor.task
  val_ids = w.read_splits()["val"]
  out = w.eval_dir(predictor.step, tta)  # made once the cases are read (figures make theirs)
  acc, collected = validate_predictor(
    predictor, val_ids, tta, out.figures_dir if figures else None, cache_dir
  )
  out.make()
  results = finalize(
    out, task, predictor.step, predictor.num_params, acc, collected, extra={"tta": tta}
  )
  files.write_text(out.report_file, report.results_markdown([results], task.region_names))
  return out.path, results


def pool_folds(workdirs: list[str | Path], output: str | Path) -> dict:
  """Post-processing chosen on the validation cases of several folds together.

  Reads each workdir's ``validation_masks.npz`` (saved by its final validation) and
  writes the choice to ``output``; ``predict --postprocess=OUTPUT`` applies it.
  """
  if not workdirs:
    raise CheckpointError("give the workdirs of the folds to pool")
  outputs.refuse_overlaps([("--output", output)], protected=[("--pool_folds", w) for w in workdirs])
  tasks = [Task.from_config(read_config(w)) for w in workdirs]
  names = {t.dataset.name for t in tasks}
  if len(names) > 1:
    raise CheckpointError(f"the workdirs were trained on different datasets: {sorted(names)}")
  dataset = tasks[0].dataset
  record = postprocess_selection.determine_from_workdirs(
    workdirs, dataset.region_names, dataset.brats_like
  )
  files.write_json(output, record)
  return record
