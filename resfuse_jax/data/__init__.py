"""Datasets by name: find the case files, read them, split them into folds."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from resfuse_jax.data import brats, phantom
from resfuse_jax.data.common import Case, CaseFiles, DataError
from resfuse_jax.data.preprocessing import read_case

__all__ = [
  "Case",
  "CaseFiles",
  "DataError",
  "DatasetInfo",
  "dataset_info",
  "find_cases",
  "read_cases",
  "make_splits",
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


def find_cases(cfg: Any) -> list[CaseFiles]:
  """Lists the case files of ``cfg.name``; writes the phantom first when needed."""
  if cfg.name == "phantom":
    spec = phantom.PhantomSpec(
      num_cases=cfg.phantom_cases, shape=tuple(cfg.phantom_shape), seed=cfg.phantom_seed
    )
    root = phantom.write_phantom(phantom_root(cfg), spec)
    return brats.find_cases(root)  # read back through the real BraTS reader
  if cfg.name == "brats":
    return brats.find_cases(cfg.root)
  dataset_info(cfg.name)  # raises listing the known names
  raise AssertionError("unreachable")


def read_cases(files: list[CaseFiles], info: DatasetInfo) -> list[Case]:
  return [read_case(f, info.label_values) for f in files]


def make_splits(case_ids: list[str], fold: int, num_folds: int, seed: int = 12345) -> dict:
  """Deterministic k-fold split (nnU-Net's habit: shuffled once with a fixed seed)."""
  if not 0 <= fold < num_folds:
    raise ValueError(f"data.fold={fold} must be in [0, {num_folds})")
  if len(case_ids) < num_folds:
    raise DataError(f"{len(case_ids)} cases cannot be split into {num_folds} folds")
  ids = sorted(case_ids)
  order = np.random.default_rng(seed).permutation(len(ids))
  val = sorted(ids[i] for i in np.array_split(order, num_folds)[fold])
  train = [c for c in ids if c not in set(val)]
  return {"fold": fold, "num_folds": num_folds, "train": train, "val": val}
