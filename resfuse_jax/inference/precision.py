"""bf16 windows only where they were measured to agree with f32 (issue 31).

``export`` runs the workdir's validation cases through OpenVINO at f32 and at bf16 on
the exporting machine (`measure`) and records only aggregate numbers in
``export.json`` (`KEY`, sealed with the rest): the share of voxels whose label changed,
each region's Dice change, the largest probability change, the CPU and OpenVINO. No
case identifier, image or per-case value is recorded. ``predict --precision=bf16``
reads them (`check_bf16`): refused beyond `MAX_CHANGED_SHARE` or `MAX_DICE_CHANGE`,
allowed with a note when this CPU is not the one measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from resfuse_jax import data
from resfuse_jax.errors import ConfigError
from resfuse_jax.inference import postprocess, tiler

KEY = "bf16_agreement"  # export.json's record
MAX_CHANGED_SHARE = 0.001  # of all voxels of the cases measured
MAX_DICE_CHANGE = 0.005  # |mean Dice at bf16 - mean Dice at f32|, per region
AGAIN = "export the model again on a CPU with BF16, with openvino installed"


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
  """2|P∩R| / (|P| + |R|) of two [D, H, W] masks; 1 when both are empty."""
  total = int(pred.sum()) + int(ref.sum())
  return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


def case_masks(probs: np.ndarray, config, rules, spacing) -> np.ndarray:
  """[D, H, W, R] probabilities -> the region masks predict writes (thresholds, nesting,
  post-processing rules), on the case's preprocessed grid."""
  settings = postprocess.settings_from_config(config.eval)
  return postprocess.probabilities_to_masks(probs, **settings, rules=rules, spacing=spacing)


def measure(
  windows: dict[str, Callable[[np.ndarray], np.ndarray]],
  cases: Sequence[data.Case],
  config,
  regions: dict[str, tuple[int, ...]],
  rules: list | None,
) -> dict:
  """Aggregate agreement of ``windows['bf16']`` with ``windows['f32']`` on labelled cases.

  Each case runs through the predictor's tiler ([D, H, W, 2] -> [D, H, W, R]) and its
  thresholds and rules; returns the changed-label share over all voxels, the per-region
  mean Dice (against the case's label) at each precision and their change, and the
  largest |Δprob|. Nothing per case is returned.
  """
  names = list(regions)
  changed = voxels = 0
  largest = 0.0
  scores = {p: np.zeros(len(names)) for p in ("f32", "bf16")}
  for case in cases:
    probs = {p: tiler.predict_volume(windows[p], case, config) for p in scores}
    largest = max(largest, float(np.abs(probs["bf16"] - probs["f32"]).max()))
    truth = postprocess.region_masks(case.label, regions)
    masks = {p: case_masks(probs[p], config, rules, case.spacing) for p in scores}
    labels = {p: postprocess.masks_to_labels(masks[p], regions) for p in scores}
    changed += int((labels["f32"] != labels["bf16"]).sum())
    voxels += labels["f32"].size
    for p in scores:
      scores[p] += [dice(masks[p][..., r], truth[..., r]) for r in range(len(names))]
  mean = {p: scores[p] / max(len(cases), 1) for p in scores}
  return {
    "cases": len(cases),
    "voxels": voxels,
    "changed_label_share": changed / max(voxels, 1),
    "dice_f32": dict(zip(names, map(float, mean["f32"]))),
    "dice_bf16": dict(zip(names, map(float, mean["bf16"]))),
    "dice_change": dict(zip(names, map(float, mean["bf16"] - mean["f32"]))),
    "max_abs_prob_change": largest,
    "bounds": {"changed_label_share": MAX_CHANGED_SHARE, "dice_change": MAX_DICE_CHANGE},
  }


def problems(record: dict) -> list[str]:
  """What puts a measured record beyond the bounds (empty: within them)."""
  out = []
  share = float(record["changed_label_share"])
  if share > MAX_CHANGED_SHARE:
    out.append(f"changed the label of {share:.3%} of voxels (bound {MAX_CHANGED_SHARE:.1%})")
  for name, change in record["dice_change"].items():
    if abs(float(change)) > MAX_DICE_CHANGE:
      out.append(f"moved {name}'s Dice by {float(change):+.4f} (bound {MAX_DICE_CHANGE})")
  return out


def summary(record: dict | None) -> str:
  """One phrase on a record: what export prints, what predict notes."""
  if not record:
    return "bf16 not measured"
  if not record.get("measured"):
    return f"bf16 not measured: {record.get('reason', 'no reason recorded')}"
  changes = ", ".join(f"{n} {float(c):+.4f}" for n, c in record["dice_change"].items())
  verdict = "refused" if problems(record) else "allowed"
  return (
    f"bf16 {verdict}: on {record['cases']} validation case(s) on {record['cpu']}, "
    f"{float(record['changed_label_share']):.3%} of voxels changed label, Dice change {changes}"
  )


def check_bf16(meta: dict, where: str | Path, this_cpu: dict) -> str:
  """The note to log when ``predict --precision=bf16`` may run on ``this_cpu``
  (`openvino_runtime.cpu`); a ``ConfigError`` with the numbers when it may not.

  ``meta``: the export's verified ``export.json``; ``where``: the export, for messages.
  """
  record = meta.get(KEY)
  head = f"--precision=bf16 with {where}"
  if not isinstance(record, dict):
    raise ConfigError(f"{head}: its export.json records no bf16 agreement check; {AGAIN}")
  if not record.get("measured"):
    raise ConfigError(f"{head}: {summary(record)}; {AGAIN}")
  found = problems(record)
  if found:
    raise ConfigError(
      f"{head} refused: at export, on {record['cases']} validation case(s), bf16 "
      f"{' and '.join(found)}; predict in f32 (the default)"
    )
  note = summary(record)
  if this_cpu["name"] != record["cpu"]:
    note += f"; measured on {record['cpu']}, this CPU is {this_cpu['name']}"
  return note
