"""The dataset fingerprint the planner reads: per case, what the source files are like.

Per case (canonical RAS voxel order, before any resampling): spacing, shape, shape after
cropping to the non-zero box of pre ∪ post (preprocessing's crop), per sequence the
intensity percentiles (0.5, 50, 99.5), mean and std over the labelled foreground (the
head when a case has no foreground), and each label value's share of the cropped box.
Computed by the preprocessing workers (`data.workers`) into one JSON per case under
`data.fingerprint_dir` (beside the preprocessed caches), and reused while the case's
source files keep their size and mtime (nnU-Net's ``dataset_fingerprint.json``, per case
so an added case costs one read).

Numpy only: the worker processes import this module, never JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from resfuse_jax import data
from resfuse_jax import files as file_io
from resfuse_jax.data import cache
from resfuse_jax.data import workers as workers_lib
from resfuse_jax.data.preprocessing import canonical_affine, nonzero_box, read_checked

VERSION = 1
PERCENTILES = (0.5, 50.0, 99.5)  # nnU-Net's intensity fingerprint
SPACING_TOLERANCE = 1e-2  # relative: header spacing vs the affine's, pre vs post vs label
SEQUENCES = ("pre", "post")


def _intensity(volume: np.ndarray, mask: np.ndarray) -> dict:
  values = volume[mask].astype(np.float64)
  p = np.percentile(values, PERCENTILES)
  return {
    "mean": float(values.mean()),
    "std": float(values.std()),
    **{f"p{q:g}": float(v) for q, v in zip(PERCENTILES, p)},
  }


def _affine_spacing(img) -> np.ndarray:
  return np.linalg.norm(canonical_affine(img)[:3, :3], axis=0)


def check_spacing(case_id: str, path, header_spacing, img) -> None:
  """The header's voxel spacing must be what the affine says (else which one to resample by?)."""
  header = np.asarray(header_spacing, np.float64)
  affine = _affine_spacing(img)
  if not np.allclose(header, affine, rtol=SPACING_TOLERANCE):
    raise data.DataError(
      f"case {case_id}: inconsistent spacing in {path}: its header says "
      f"{[round(float(s), 4) for s in header]} mm, its affine {[round(float(s), 4) for s in affine]} "
      "mm (canonical axis order); fix the header (pixdim) or the affine"
    )


def case_record(files: data.CaseFiles, label_values, limits: data.InputLimits) -> dict:
  """One case's fingerprint (a ``DataError`` naming the case for a bad one)."""
  pre, post, label, pre_img, spacing = read_checked(
    files, label_values, data.PrepSettings(), limits
  )
  check_spacing(files.case_id, files.pre, spacing, pre_img)
  box = nonzero_box(pre, post)
  crop = tuple(slice(a, b) for a, b in box)
  head = (pre[crop] != 0) | (post[crop] != 0)
  fractions, mask = {}, head
  if label is not None:
    cut = label[crop]
    fractions = {str(v): float(np.mean(cut == v)) for v in label_values}
    mask = cut > 0 if (cut > 0).any() else head
  return {
    "version": VERSION,
    "case_id": files.case_id,
    "sources": cache.source_stamp(files),
    "spacing": [float(s) for s in spacing],
    "shape": list(pre.shape),
    "cropped_shape": [b - a for a, b in box],
    "intensity": {k: _intensity(v[crop], mask) for k, v in zip(SEQUENCES, (pre, post))},
    "class_fractions": fractions,
  }


def write_case_record(files: data.CaseFiles, out_dir: Path, label_values, limits) -> str:
  """The worker's job: one case's record into ``out_dir/<case_id>.json`` (atomic)."""
  record = case_record(files, label_values, limits)
  file_io.write_json(_record_path(out_dir, files.case_id), record)
  return files.case_id


def _record_path(out_dir: Path, case_id: str) -> Path:
  return file_io.under(out_dir, file_io.check_name(case_id, f"fingerprint in {out_dir}") + ".json")


def _cached_record(out_dir: Path, files: data.CaseFiles) -> dict | None:
  """The stored record when it is readable, this version's, and of the same source files."""
  path = _record_path(out_dir, files.case_id)
  try:
    record = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  fresh = isinstance(record, dict) and record.get("version") == VERSION
  return record if fresh and record.get("sources") == cache.source_stamp(files) else None


@dataclasses.dataclass(frozen=True)
class DatasetFingerprint:
  """Every good case's record; the arrays are [N, 3] in canonical voxel order."""

  records: tuple[dict, ...]
  bad_cases: tuple[dict, ...] = ()

  @property
  def case_ids(self) -> list[str]:
    return [r["case_id"] for r in self.records]

  def _array(self, key: str, dtype) -> np.ndarray:
    return np.array([r[key] for r in self.records], dtype)

  @property
  def spacings(self) -> np.ndarray:
    return self._array("spacing", np.float64)

  @property
  def cropped_shapes(self) -> np.ndarray:
    return self._array("cropped_shape", np.int64)

  def summary(self) -> dict:
    """What plan.json shows of the data: medians over cases, per sequence and class."""
    per_sequence = {
      s: {
        k: float(np.median([r["intensity"][s][k] for r in self.records]))
        for k in self.records[0]["intensity"][s]
      }
      for s in SEQUENCES
    }
    classes = sorted({c for r in self.records for c in r["class_fractions"]}, key=int)
    return {
      "cases": len(self.records),
      "median_spacing": np.median(self.spacings, axis=0).tolist(),
      "min_spacing": self.spacings.min(axis=0).tolist(),
      "max_spacing": self.spacings.max(axis=0).tolist(),
      "median_cropped_shape": np.median(self.cropped_shapes, axis=0).tolist(),
      "intensity_median_over_cases": per_sequence,
      "class_fractions_mean": {
        c: float(np.mean([r["class_fractions"].get(c, 0.0) for r in self.records])) for c in classes
      },
      "bad_cases": [b["case_id"] for b in self.bad_cases],
    }


def check_record(record: Any, where: str) -> dict:
  """A record whose spacing and shapes are usable, else a ``DataError`` naming the case."""
  cid = record.get("case_id", "?") if isinstance(record, dict) else "?"
  try:
    spacing = [float(s) for s in record["spacing"]]
    shapes = [[int(n) for n in record[k]] for k in ("shape", "cropped_shape")]
  except (KeyError, TypeError, ValueError) as e:
    raise data.DataError(f"case {cid}: unreadable fingerprint ({where}): {e!r}") from None
  if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
    raise data.DataError(
      f"case {cid}: unreadable spacing {record['spacing']!r} in its fingerprint ({where}); "
      "expected 3 positive numbers in mm"
    )
  if any(len(s) != 3 or min(s) < 1 for s in shapes):
    raise data.DataError(f"case {cid}: unreadable shapes {shapes} in its fingerprint ({where})")
  return record


def fingerprint(cfg: Any, workers: int | None = None, progress: bool = False) -> DatasetFingerprint:
  """The fingerprint of the dataset ``cfg`` (a ``data`` config): cached records, the rest
  computed by ``data.preprocess_workers`` processes. Bad cases follow ``data.on_bad_case``."""
  dataset = data.get_dataset(cfg.name)
  listed = data.find_cases(cfg)
  out_dir = file_io.make_dirs(data.fingerprint_dir(cfg))
  todo = [f for f in listed if _cached_record(out_dir, f) is None]
  bad: list[dict] = []

  def record(error: data.DataError, f: data.CaseFiles) -> None:
    if cfg.on_bad_case != "skip":
      raise error
    bad.append({"case_id": f.case_id, "error": str(error)})

  if todo:
    logging.info("fingerprinting %d of %d cases into %s", len(todo), len(listed), out_dir)
    args = (out_dir, dataset.label_values, data.input_limits(cfg))
    workers = cfg.preprocess_workers if workers is None else workers
    _run(todo, args, record, workers)
  skipped = {b["case_id"] for b in bad}
  records = []
  for f in listed:
    if f.case_id not in skipped:
      where = str(_record_path(out_dir, f.case_id))
      records.append(check_record(_cached_record(out_dir, f) or {"case_id": f.case_id}, where))
  if not records:
    raise data.DataError(f"every case under {cfg.root or cfg.get('manifest')!r} was bad")
  for b in bad:
    logging.warning("fingerprint: skipped %s", b["error"])
  return DatasetFingerprint(tuple(records), tuple(bad))


def _run(todo, args, record, workers: int) -> None:
  if workers > 1:
    workers_lib.run_in_processes(write_case_record, todo, args, record, workers, lambda it: it)
    return
  for f in todo:
    try:
      write_case_record(f, *args)
    except data.DataError as e:
      record(e, f)
