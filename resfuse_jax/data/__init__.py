"""Datasets by name: find the case files, preprocess them into the cache, split them.

Imports nothing of models, training or evaluation (an import-linter contract).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from resfuse_jax import files as file_io
from resfuse_jax.data import cache
from resfuse_jax.data.common import Case, CaseFiles, DataError, InputLimits, require_scan
from resfuse_jax.data.datasets import (
  Dataset,
  default_cache_dir,
  find_input_cases,
  get_dataset,
  holds_phantom,
  names,
  phantom_name,
)
from resfuse_jax.data.phantom import KNOBS as PHANTOM_KNOBS
from resfuse_jax.data.preprocessing import PrepSettings, check_case_id, preprocess_case
from resfuse_jax.errors import ConfigError

__all__ = [
  "PHANTOM_KNOBS",
  "Case",
  "CaseFiles",
  "DataError",
  "Dataset",
  "PrepSettings",
  "InputLimits",
  "input_limits",
  "get_dataset",
  "names",
  "find_cases",
  "find_input_cases",
  "prep_settings",
  "cache_dir",
  "fingerprint_dir",
  "user_cache_root",
  "confined_to_user_cache",
  "default_cache_dir",
  "prepare",
  "load_cases",
  "read_cases",
  "make_splits",
  "preprocess_case",
  "check_case_id",
  "require_scan",
]


def find_cases(cfg: Any, require_label: bool = True) -> list[CaseFiles]:
  """Lists the case files of the dataset ``cfg.name`` (writing the phantom first)."""
  return get_dataset(cfg.name).find_cases(cfg, require_label)


def prep_settings(cfg: Any) -> PrepSettings:
  """``data.target_spacing``, ``normalization`` and ``affine_tolerance`` (a complete config)."""
  spacing = cfg.target_spacing
  return PrepSettings(
    target_spacing=None if spacing is None else tuple(float(s) for s in spacing),
    normalization=cfg.normalization,
    affine_tolerance=cfg.affine_tolerance,
  )


def input_limits(cfg: Any) -> InputLimits:
  """``data.max_voxels`` / ``max_bytes`` / ``spacing_range``."""
  return InputLimits.from_config(cfg)


def cache_dir(cfg: Any) -> Path:
  """``<cache root>/<dataset tag>-<hash of the preprocessing settings>``."""
  tag = get_dataset(cfg.name).cache_tag(cfg)
  return _cache_root(cfg) / f"{tag}-{cache.settings_key(tag, prep_settings(cfg))}"


def _cache_root(cfg: Any) -> Path:
  return Path(cfg.cache_dir or default_cache_dir() / "preprocessed")


def fingerprint_dir(cfg: Any) -> Path:
  """``<cache root>/<dataset tag>-fingerprint``: the planner's per-case statistics, beside the
  preprocessed caches (read from the source files, so no preprocessing setting keys it)."""
  return _cache_root(cfg) / f"{get_dataset(cfg.name).cache_tag(cfg)}-fingerprint"


def user_cache_root(flag: str | Path | None = None) -> Path:
  """The running user's cache: ``--cache_dir``, else ``$RESFUSE_CACHE``, else the default."""
  return Path(flag) if flag else default_cache_dir()


def confined_to_user_cache(cfg: Any, cache_root: str | Path | None = None) -> Any:
  """A copy of a ``data`` config read from a workdir or an export, writing only to the user's cache.

  ``data.cache_dir`` written in the file is replaced by ``user_cache_root(cache_root)``;
  a phantom is read where the file says only if a complete phantom of the same spec is
  there, else it is regenerated (deterministic from its spec) in that cache. Sources
  (``data.root`` of a real dataset, a manifest) are only read.
  """
  root = user_cache_root(cache_root)
  out = cfg.copy_and_resolve_references()
  out.cache_dir = str(root / "preprocessed")
  if cfg.name == "phantom" and not holds_phantom(cfg.root, cfg):
    out.root = str(root / phantom_name(cfg))
  return out


def prepare(
  cfg: Any,
  files: list[CaseFiles] | None = None,
  workers: int | None = None,
  progress: bool = True,
  verify: bool = False,
) -> tuple[Path, list[str], list[dict]]:
  """Builds or reuses the preprocessed cache; returns (cache folder, good ids, bad cases).

  Each cached case's hashes are checked the first time this process opens it; ``verify``
  checks them again (damaged cases are rebuilt, with a warning). Bad cases
  (``data.on_bad_case='skip'``) are returned; the caller lists them (W's bad-case list).
  """
  dataset = get_dataset(cfg.name)
  files = find_cases(cfg) if files is None else files
  out = cache_dir(cfg)
  good, bad = cache.build(
    files,
    out,
    prep_settings(cfg),
    dataset.regions,
    dataset.label_values,
    workers=cfg.preprocess_workers if workers is None else workers,
    on_bad_case=cfg.on_bad_case,
    progress=progress,
    limits=input_limits(cfg),
    verify=verify,
  )
  if bad:
    logging.warning(
      "Skipped %d bad case(s) of %d (data.on_bad_case='skip'); first: %s",
      len(bad),
      len(files),
      bad[0]["error"],
    )
  if not good:
    raise DataError(f"every case under {cfg.root!r} was bad; see the errors above")
  return out, good, bad


def read_cases(
  files: list[CaseFiles],
  dataset: Dataset,
  settings: PrepSettings | None = None,
  limits: InputLimits | None = None,
) -> list[Case]:
  """Preprocesses cases in memory, without the cache (small data, tests)."""
  settings, limits = settings or PrepSettings(), limits or InputLimits()
  return [preprocess_case(f, dataset.label_values, settings, limits) for f in files]


def load_cases(out_dir: Path, case_ids: list[str]) -> list[Case]:
  where = f"case folder in {out_dir}"
  return [cache.load_case(file_io.under(out_dir, file_io.check_name(c, where))) for c in case_ids]


def make_splits(case_ids: list[str], fold: int, num_folds: int, seed: int = 12345) -> dict:
  """Deterministic k-fold split (nnU-Net's habit: shuffled once with a fixed seed).

  ``fold=-1`` trains on every case; validation then runs on the training cases.
  """
  ids = sorted(case_ids)
  if fold == -1:
    return {"fold": -1, "num_folds": num_folds, "train": ids, "val": ids}
  if not 0 <= fold < num_folds:
    raise ConfigError(f"data.fold={fold} must be -1 (all cases) or in [0, {num_folds})")
  if len(ids) < num_folds:
    raise DataError(f"{len(ids)} cases cannot be split into {num_folds} folds")
  order = np.random.default_rng(seed).permutation(len(ids))
  val = sorted(ids[i] for i in np.array_split(order, num_folds)[fold])
  train = [c for c in ids if c not in set(val)]
  return {"fold": fold, "num_folds": num_folds, "train": train, "val": val}
