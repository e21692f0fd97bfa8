"""Datasets by name: find the case files, preprocess them into the cache, split them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from resfuse_jax.data import brats, breast, cache, manifest, phantom
from resfuse_jax.data.common import Case, CaseFiles, DataError
from resfuse_jax.data.preprocessing import PrepSettings, preprocess_case

__all__ = [
  "Case",
  "CaseFiles",
  "DataError",
  "DatasetInfo",
  "PrepSettings",
  "dataset_info",
  "find_cases",
  "prep_settings",
  "cache_dir",
  "prepare",
  "load_cases",
  "read_cases",
  "make_splits",
  "preprocess_case",
]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  regions: dict[str, tuple[int, ...]]  # region name -> label values it covers
  label_values: tuple[int, ...]

  @property
  def region_names(self) -> list[str]:
    return list(self.regions)


_INFO = {
  "phantom": DatasetInfo("phantom", brats.REGIONS, brats.LABELS),
  "brats": DatasetInfo("brats", brats.REGIONS, brats.LABELS),
  "breast": DatasetInfo("breast", breast.REGIONS, breast.LABELS),
  "manifest": DatasetInfo("manifest", breast.REGIONS, breast.LABELS),
}


def dataset_info(name: str) -> DatasetInfo:
  if name not in _INFO:
    raise ValueError(f"Unknown data.name {name!r}; known datasets: {', '.join(sorted(_INFO))}")
  return _INFO[name]


def default_cache_dir() -> Path:
  return Path(os.environ.get("RESFUSE_CACHE", Path.home() / ".cache" / "resfuse_jax"))


def phantom_root(cfg: Any) -> Path:
  """The phantom's folder: ``data.root`` or a cache folder named by its spec."""
  if cfg.root:
    return Path(cfg.root)
  shape = "x".join(str(s) for s in cfg.phantom_shape)
  return default_cache_dir() / f"phantom-seed{cfg.phantom_seed}-n{cfg.phantom_cases}-{shape}"


def find_cases(cfg: Any, require_label: bool = True) -> list[CaseFiles]:
  """Lists the case files of ``cfg.name``; writes the phantom first when needed."""
  if cfg.name == "phantom":
    spec = phantom.PhantomSpec(
      num_cases=cfg.phantom_cases, shape=tuple(cfg.phantom_shape), seed=cfg.phantom_seed
    )
    root = phantom.write_phantom(phantom_root(cfg), spec)
    return brats.find_cases(root, require_label)  # read back through the real BraTS reader
  if cfg.name == "brats":
    return brats.find_cases(cfg.root, require_label)
  if cfg.name == "breast":
    return breast.find_cases(cfg.root, cfg.get("post_phase", 1), require_label)
  if cfg.name == "manifest":
    return manifest.find_cases(cfg.get("manifest", ""), require_label)
  dataset_info(cfg.name)  # raises listing the known names
  raise AssertionError("unreachable")


def prep_settings(cfg: Any) -> PrepSettings:
  spacing = cfg.get("target_spacing", None)
  return PrepSettings(
    target_spacing=None if spacing is None else tuple(float(s) for s in spacing),
    normalization=cfg.get("normalization", "zscore"),
    affine_tolerance=cfg.get("affine_tolerance", 1e-3),
  )


def cache_dir(cfg: Any) -> Path:
  root = Path(cfg.get("cache_dir", "") or default_cache_dir() / "preprocessed")
  tag = cfg.name
  if cfg.name == "phantom":
    tag = phantom_root(cfg).name
  elif cfg.name == "breast":
    tag = f"breast-phase{cfg.get('post_phase', 1)}"
  return root / f"{tag}-{cache.settings_key(tag, prep_settings(cfg))}"


def prepare(
  cfg: Any, files: list[CaseFiles] | None = None, workers: int | None = None, progress: bool = True
) -> tuple[Path, list[str], list[dict]]:
  """Builds or reuses the preprocessed cache; returns (cache folder, good ids, bad cases)."""
  files = find_cases(cfg) if files is None else files
  info = dataset_info(cfg.name)
  out = cache_dir(cfg)
  good, bad = cache.build(
    files,
    out,
    prep_settings(cfg),
    info.regions,
    info.label_values,
    workers=cfg.get("preprocess_workers", 1) if workers is None else workers,
    on_bad_case=cfg.get("on_bad_case", "error"),
    progress=progress,
  )
  if bad:
    logging.warning(
      "Skipped %d bad case(s) of %d (data.on_bad_case='skip'); first: %s",
      len(bad),
      len(files),
      bad[0]["error"],
    )
  if not good:
    raise DataError(f"every case under {cfg.get('root', '')!r} was bad; see the errors above")
  return out, good, bad


def read_cases(
  files: list[CaseFiles], info: DatasetInfo, settings: PrepSettings | None = None
) -> list[Case]:
  """Preprocesses cases in memory, without the cache (small data, tests)."""
  return [preprocess_case(f, info.label_values, settings or PrepSettings()) for f in files]


def load_cases(out_dir: Path, case_ids: list[str]) -> list[Case]:
  return [cache.load_case(Path(out_dir) / cid) for cid in case_ids]


def make_splits(case_ids: list[str], fold: int, num_folds: int, seed: int = 12345) -> dict:
  """Deterministic k-fold split (nnU-Net's habit: shuffled once with a fixed seed).

  ``fold=-1`` trains on every case; validation then runs on the training cases.
  """
  ids = sorted(case_ids)
  if fold == -1:
    return {"fold": -1, "num_folds": num_folds, "train": ids, "val": ids}
  if not 0 <= fold < num_folds:
    raise ValueError(f"data.fold={fold} must be -1 (all cases) or in [0, {num_folds})")
  if len(ids) < num_folds:
    raise DataError(f"{len(ids)} cases cannot be split into {num_folds} folds")
  order = np.random.default_rng(seed).permutation(len(ids))
  val = sorted(ids[i] for i in np.array_split(order, num_folds)[fold])
  train = [c for c in ids if c not in set(val)]
  return {"fold": fold, "num_folds": num_folds, "train": train, "val": val}
