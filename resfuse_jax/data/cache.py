"""The preprocessed cache: each case decoded once into memory-mappable ``.npy`` files.

Layout: ``<cache_root>/<dataset>-<key>/<case_id>/{pre,post,label}.npy``,
``fg_<region>.npy`` (foreground voxel locations for patch sampling) and
``meta.json`` (sources, crop box, spacings, normalisation statistics). ``key``
hashes the preprocessing settings, so changing them builds a new cache beside
the old one. Each case is written into a temporary folder and renamed into
place, so an interrupted build leaves only complete cases and resumes from
there; a case whose source files changed (size or mtime) is rebuilt.

``meta.json`` records every array file's shape, dtype, byte size and SHA-256.
Every check compares shape, dtype and size (cheap: headers and ``stat``), and the
hashes the first time a process opens a case (and again if an array's size or
mtime changed since): 52 ms for a BraTS-sized case (2 x 240x240x155 float32 +
uint8 label, 80 MB, page cache warm; BUILD_NOTES "Reliability 3"). A build
(``prepare``: train, evaluate, preprocess) rebuilds a case that fails, with a
warning; ``load_case`` refuses it; ``verify=True`` (``preprocess --verify``)
hashes every case again even if this process already did.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from absl import logging

from resfuse_jax import files as file_io
from resfuse_jax.data import foreground
from resfuse_jax.data import workers as workers_lib
from resfuse_jax.data.common import Case, CaseFiles, DataError, InputLimits
from resfuse_jax.data.preprocessing import PrepSettings, preprocess_case
from resfuse_jax.errors import ConfigError, OutputError

VERSION = 2  # 2: meta.json records each array's shape, dtype, size and hash
STALE_TMP_S = 3600.0
META_KEYS = (
  "version", "case_id", "sources", "affine", "shape", "crop", "spacing", "original_spacing",
  "normalization", "fg_locations", "has_label", "arrays",
)  # fmt: skip


def settings_key(dataset: str, settings: PrepSettings) -> str:
  blob = json.dumps({"version": VERSION, "dataset": dataset, **settings.as_dict()}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def source_stamp(files: CaseFiles) -> dict:
  """Path, size and mtime of each source file: a cached record is stale when these change."""
  out = {}
  for kind in ("pre", "post", "label"):
    path = getattr(files, kind)
    if path is None:
      out[kind] = None
    else:
      try:
        size, mtime = _size_and_mtime(Path(path))
      except OSError:  # gone since it was cached: the rebuild names the problem
        out[kind] = {"path": str(Path(path).absolute()), "missing": True}
        continue
      out[kind] = {"path": str(Path(path).absolute()), "size": size, "mtime_ns": mtime}
  if files.pre_series or files.post_series:
    out["series"] = [files.pre_series, files.post_series]
  return out


def _size_and_mtime(path: Path) -> tuple[int, int]:
  """A file's size and mtime; a DICOM folder's total size and newest mtime (folder included:
  a removed slice changes it)."""
  st = os.stat(path)
  if not path.is_dir():
    return st.st_size, st.st_mtime_ns
  size, mtime = 0, st.st_mtime_ns
  for parent, _, names in os.walk(path):
    mtime = max(mtime, os.stat(parent).st_mtime_ns)
    for name in names:
      member = os.stat(os.path.join(parent, name))
      size, mtime = size + member.st_size, max(mtime, member.st_mtime_ns)
  return size, mtime


def _array_record(path: Path) -> dict:
  array = np.load(path, mmap_mode="r")
  return {
    "shape": list(array.shape),
    "dtype": str(array.dtype),
    "bytes": path.stat().st_size,
    "sha256": file_io.sha256(path),
  }


def read_meta(case_dir: Path) -> dict:
  """``meta.json`` of a cached case, with every key this version writes (else DataError)."""
  path = case_dir / "meta.json"
  try:
    meta = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: cannot read the cached case's metadata: {e}") from None
  if not isinstance(meta, dict) or meta.get("version") != VERSION:
    found = meta.get("version") if isinstance(meta, dict) else type(meta).__name__
    raise DataError(f"{path}: cache format {found!r}, this version writes {VERSION}")
  missing = [k for k in META_KEYS if k not in meta]
  if missing:
    raise DataError(f"{path}: metadata lacks {missing}")
  return meta


def entry_file(case_dir: Path, name: str) -> Path:
  """A file named in ``meta.json``, refused unless it is a plain name inside the entry."""
  if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
    raise DataError(f"{case_dir / 'meta.json'}: names {name!r}, which is not a file of the entry")
  return file_io.under(case_dir, name)


_HASHED: set[tuple] = set()  # (case folder, its arrays' sizes and mtimes) this process hashed


def _stamp(case_dir: Path, meta: dict) -> tuple | None:
  try:
    stats = [(n, entry_file(case_dir, n).stat()) for n in sorted(meta["arrays"])]
  except (OSError, DataError):
    return None
  return (str(case_dir.resolve()), *((n, st.st_size, st.st_mtime_ns) for n, st in stats))


def array_problem(case_dir: Path, meta: dict, hashes: bool | str = "once") -> str | None:
  """Why the case's array files do not match ``meta['arrays']``, or None if they do.

  ``hashes``: True compares every SHA-256, ``"once"`` only the first time this process
  sees the case's arrays as they are now (size and mtime), False never.
  """
  if hashes == "once":
    stamp = _stamp(case_dir, meta)
    hashes = stamp is None or stamp not in _HASHED
    problem = array_problem(case_dir, meta, hashes)
    if problem is None and hashes:
      _HASHED.add(stamp)
    return problem
  for name, record in meta["arrays"].items():
    try:
      path = entry_file(case_dir, name)
    except DataError as e:
      return str(e)
    if not path.is_file():
      return f"{path} is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
      return f"{path} has {size} bytes, {record['bytes']} were written (truncated or replaced)"
    try:
      array = np.load(path, mmap_mode="r")
    except Exception as e:  # numpy raises ValueError, EOFError, OSError for a bad header
      return f"{path} is not a readable .npy file ({type(e).__name__}: {e})"
    if list(array.shape) != record["shape"] or str(array.dtype) != record["dtype"]:
      return (
        f"{path} holds {array.dtype} {list(array.shape)}, "
        f"{record['dtype']} {record['shape']} were written"
      )
    if hashes and file_io.sha256(path) != record["sha256"]:
      return f"{path} differs from the SHA-256 recorded when it was written (modified since)"
  return None


def case_problem(case_dir: Path, files: CaseFiles, hashes: bool | str = "once") -> str | None:
  """None if ``case_dir`` is a complete, intact cache of ``files``; else why not."""
  if not (case_dir / "meta.json").is_file():
    return "not built"
  try:
    meta = read_meta(case_dir)
  except DataError as e:
    return str(e)
  if meta["sources"] != source_stamp(files):
    return "its source files changed"
  return array_problem(case_dir, meta, hashes)


def is_complete(case_dir: Path, files: CaseFiles) -> bool:
  return case_problem(case_dir, files) is None


def _write_entry(tmp: Path, case: Case, files: CaseFiles, regions: dict) -> dict:
  """The arrays and ``meta.json`` of one case, into its temporary folder; returns the meta."""
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
    "sources": source_stamp(files),
    "affine": case.affine.tolist(),
    "shape": list(case.shape),
    "crop": [list(b) for b in case.crop],
    "spacing": list(case.spacing),
    "original_spacing": list(case.original_spacing),
    "normalization": case.normalization,
    "fg_locations": fg_files,
    "has_label": case.label is not None,
    "arrays": {p.name: _array_record(p) for p in sorted(tmp.glob("*.npy"))},
  }
  (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
  return meta


def write_case(
  files: CaseFiles,
  out_dir: Path,
  settings: PrepSettings,
  regions: dict,
  label_values: tuple,
  limits: InputLimits = InputLimits(),
) -> str:
  """Preprocesses one case into ``out_dir/<case_id>`` atomically; returns the case id."""
  final = file_io.under(out_dir, file_io.check_name(files.case_id, f"case folder in {out_dir}"))
  case = preprocess_case(files, label_values, settings, limits)
  tmp = out_dir / f".tmp-{files.case_id}-{uuid.uuid4().hex[:8]}"
  try:
    tmp.mkdir(parents=True)
  except OSError as e:
    raise file_io.output_error(tmp, e) from None
  try:
    meta = _write_entry(tmp, case, files, regions)
    if final.exists():  # stale (sources changed): move aside, then drop
      trash = out_dir / f".old-{files.case_id}-{uuid.uuid4().hex[:8]}"
      final.rename(trash)
      shutil.rmtree(trash, ignore_errors=True)
    try:
      tmp.rename(final)
      _HASHED.add(_stamp(final, meta))  # hashed as written, by this process
    except OSError:  # another process finished the same case first
      if not is_complete(final, files):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OutputError):
      raise
    raise OutputError(f"cannot write the cache of case {files.case_id} in {out_dir}: {e}") from e
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return files.case_id


def _progress(iterable, total: int, desc: str, enabled: bool):
  if not enabled:
    return iterable
  from tqdm import tqdm

  return tqdm(iterable, total=total, desc=desc, unit="case", file=sys.stderr)


def _remove_stale_temporaries(out_dir: Path) -> None:
  """A killed build's temporaries are never used; an hour old so that a concurrent build's survive."""
  for leftover in out_dir.glob(".tmp-*"):
    if time.time() - leftover.stat().st_mtime > STALE_TMP_S:
      shutil.rmtree(leftover, ignore_errors=True)


def _cases_to_build(files: list[CaseFiles], out_dir: Path, verify: bool) -> list[CaseFiles]:
  todo = []
  for f in files:
    case_dir = file_io.under(out_dir, file_io.check_name(f.case_id, f"case folder in {out_dir}"))
    problem = case_problem(case_dir, f, hashes=True if verify else "once")
    if problem is not None:
      if problem not in ("not built", "its source files changed"):
        logging.warning("cached case %s is damaged, rebuilding it: %s", f.case_id, problem)
      todo.append(f)
  return todo


def _progress_fn(total: int, desc: str, enabled: bool):
  return lambda iterable: _progress(iterable, total, desc, enabled)


def _build_here(todo, args, record, workers, progress) -> None:
  del workers  # one process
  for f in progress(todo):
    try:
      write_case(f, *args)
    except DataError as e:
      record(e, f)


def _build_in_processes(todo, args, record, workers, progress) -> None:
  workers_lib.run_in_processes(write_case, todo, args, record, workers, progress)


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
  limits: InputLimits = InputLimits(),
  verify: bool = False,
) -> tuple[list[str], list[dict]]:
  """Brings ``out_dir`` up to date for ``files``; returns (good case ids, bad cases).

  A cached case is trusted only if its arrays match their recorded shape, dtype, size
  and (the first time this process opens it, or always with ``verify``) SHA-256; one
  that does not is rebuilt, with a warning.
  ``on_bad_case='error'`` raises the first bad case's ``DataError``; ``'skip'``
  leaves bad cases out and reports them as ``{'case_id', 'error'}``.
  """
  if on_bad_case not in ("error", "skip"):
    raise ConfigError(f"data.on_bad_case must be 'error' or 'skip', got {on_bad_case!r}")
  file_io.make_dirs(out_dir)
  _remove_stale_temporaries(out_dir)
  todo = _cases_to_build(files, out_dir, verify)
  bad: list[dict] = []

  def record(error: DataError, f: CaseFiles) -> None:
    if on_bad_case == "error":
      raise error
    bad.append({"case_id": f.case_id, "error": str(error)})

  if todo:
    args = (out_dir, settings, regions, label_values, limits)
    desc = f"preprocessing {len(todo)} cases -> {out_dir}"
    run = _build_in_processes if workers > 1 else _build_here
    run(todo, args, record, workers, _progress_fn(len(todo), desc, progress))
  bad_ids = {b["case_id"] for b in bad}
  return [f.case_id for f in files if f.case_id not in bad_ids], bad


def _source_path(meta: dict, kind: str) -> Path | None:
  """The source file of ``kind`` that the case was built from (``meta['sources']``)."""
  source = meta["sources"].get(kind) if isinstance(meta["sources"], dict) else None
  return Path(source["path"]) if isinstance(source, dict) and "path" in source else None


def load_case(case_dir: Path) -> Case:
  """A cached case with its volumes memory-mapped (nothing read until sliced).

  Its arrays are checked against ``meta.json`` first (shape, dtype, size; the hashes
  the first time this process opens the case).
  """
  meta = read_meta(case_dir)
  problem = array_problem(case_dir, meta)
  if problem is not None:
    raise DataError(
      f"cached case {meta['case_id']}: {problem}; rebuild it with python -m "
      "resfuse_jax.preprocess (the same config)"
    )
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
    label_file=_source_path(meta, "label"),
  )
  case.fg_locations = [np.load(entry_file(case_dir, n)) for n in meta["fg_locations"].values()]
  return case
