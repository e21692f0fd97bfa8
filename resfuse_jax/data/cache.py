"""The preprocessed cache: each case decoded once into memory-mappable ``.npy`` files.

Layout: ``<cache_root>/<dataset>-<key>/<case_id>/{pre,post,label}.npy``,
``fg_<region>.npy`` (foreground voxel locations for patch sampling) and
``meta.json`` (sources, crop box, spacings, normalisation statistics). ``key``
hashes the preprocessing settings, so changing them builds a new cache beside
the old one. Each case is written into a temporary folder and renamed into
place, so an interrupted build leaves only complete cases and resumes from
there; a case whose source files changed (size or mtime) is rebuilt.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from resfuse_jax.data import foreground
from resfuse_jax.data.common import Case, CaseFiles, DataError
from resfuse_jax.data.preprocessing import PrepSettings, preprocess_case
from resfuse_jax.errors import ConfigError

VERSION = 1
STALE_TMP_S = 3600.0


def settings_key(dataset: str, settings: PrepSettings) -> str:
  blob = json.dumps({"version": VERSION, "dataset": dataset, **settings.as_dict()}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _source_stamp(files: CaseFiles) -> dict:
  out = {}
  for kind in ("pre", "post", "label"):
    path = getattr(files, kind)
    if path is None:
      out[kind] = None
    else:
      st = os.stat(path)
      out[kind] = {
        "path": str(Path(path).absolute()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
      }
  return out


def is_complete(case_dir: Path, files: CaseFiles) -> bool:
  meta_path = case_dir / "meta.json"
  if not meta_path.is_file():
    return False
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, json.JSONDecodeError):
    return False
  return meta.get("version") == VERSION and meta.get("sources") == _source_stamp(files)


def write_case(
  files: CaseFiles, out_dir: Path, settings: PrepSettings, regions: dict, label_values: tuple
) -> str:
  """Preprocesses one case into ``out_dir/<case_id>`` atomically; returns the case id."""
  case = preprocess_case(files, label_values, settings)
  tmp = out_dir / f".tmp-{files.case_id}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True)
  try:
    np.save(tmp / "pre.npy", case.pre)
    np.save(tmp / "post.npy", case.post)
    fg_files = {}
    if case.label is not None:
      np.save(tmp / "label.npy", case.label)
      locations = foreground.region_locations(case.label, regions)
      for r, (name, loc) in enumerate(zip(regions, locations)):
        fg_files[name] = f"fg_{r}.npy"
        np.save(tmp / fg_files[name], loc)
    meta = {
      "version": VERSION,
      "case_id": case.case_id,
      "sources": _source_stamp(files),
      "affine": case.affine.tolist(),
      "shape": list(case.shape),
      "crop": [list(b) for b in case.crop],
      "spacing": list(case.spacing),
      "original_spacing": list(case.original_spacing),
      "normalization": case.normalization,
      "fg_locations": fg_files,
      "has_label": case.label is not None,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    final = out_dir / files.case_id
    if final.exists():  # stale (sources changed): move aside, then drop
      trash = out_dir / f".old-{files.case_id}-{uuid.uuid4().hex[:8]}"
      final.rename(trash)
      shutil.rmtree(trash, ignore_errors=True)
    try:
      tmp.rename(final)
    except OSError:  # another process finished the same case first
      if not is_complete(final, files):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return files.case_id


def _progress(iterable, total: int, desc: str, enabled: bool):
  if not enabled:
    return iterable
  from tqdm import tqdm

  return tqdm(iterable, total=total, desc=desc, unit="case", file=sys.stderr)


def build(
  files: list[CaseFiles],
  out_dir: Path,
  settings: PrepSettings,
  regions: dict,
  label_values: tuple,
  *,
  workers: int = 1,
  on_bad_case: str = "error",
  progress: bool = True,
) -> tuple[list[str], list[dict]]:
  """Brings ``out_dir`` up to date for ``files``; returns (good case ids, bad cases).

  ``on_bad_case='error'`` raises the first bad case's ``DataError``; ``'skip'``
  leaves bad cases out and reports them as ``{'case_id', 'error'}``.
  """
  if on_bad_case not in ("error", "skip"):
    raise ConfigError(f"data.on_bad_case must be 'error' or 'skip', got {on_bad_case!r}")
  out_dir.mkdir(parents=True, exist_ok=True)
  for leftover in out_dir.glob(".tmp-*"):  # a killed build's: never used; an hour old so that
    if time.time() - leftover.stat().st_mtime > STALE_TMP_S:  # a concurrent build's survives
      shutil.rmtree(leftover, ignore_errors=True)
  todo = [f for f in files if not is_complete(out_dir / f.case_id, f)]
  bad: list[dict] = []
  if todo:
    args = (out_dir, settings, regions, label_values)
    desc = f"preprocessing {len(todo)} cases -> {out_dir}"

    def record(error: DataError, f: CaseFiles) -> None:
      if on_bad_case == "error":
        raise error
      bad.append({"case_id": f.case_id, "error": str(error)})

    if workers > 1:
      ctx = multiprocessing.get_context("spawn")  # JAX may be loaded: never fork it
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(write_case, f, *args): f for f in todo}
        try:
          for fut in _progress(concurrent.futures.as_completed(futures), len(todo), desc, progress):
            try:
              fut.result()
            except DataError as e:
              record(e, futures[fut])
        except BaseException:
          pool.shutdown(cancel_futures=True)
          raise
    else:
      for f in _progress(todo, len(todo), desc, progress):
        try:
          write_case(f, *args)
        except DataError as e:
          record(e, f)
  bad_ids = {b["case_id"] for b in bad}
  return [f.case_id for f in files if f.case_id not in bad_ids], bad


def load_case(case_dir: Path) -> Case:
  """A cached case with its volumes memory-mapped (nothing read until sliced)."""
  meta = json.loads((case_dir / "meta.json").read_text())
  label = np.load(case_dir / "label.npy", mmap_mode="r") if meta["has_label"] else None
  case = Case(
    case_id=meta["case_id"],
    pre=np.load(case_dir / "pre.npy", mmap_mode="r"),
    post=np.load(case_dir / "post.npy", mmap_mode="r"),
    label=label,
    spacing=tuple(meta["spacing"]),
    affine=np.asarray(meta["affine"]),
    shape=tuple(meta["shape"]),
    crop=tuple(tuple(b) for b in meta["crop"]),
    original_spacing=tuple(meta["original_spacing"]),
    normalization=meta["normalization"],
  )
  case.fg_locations = [np.load(case_dir / name) for name in meta["fg_locations"].values()]
  return case
