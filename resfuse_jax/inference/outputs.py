"""The one rule that keeps a command's outputs off what it reads (issue 26, class 1).

Every output path of ``predict``, ``export`` and ``evaluate`` is checked here before
the model is loaded. Paths are compared resolved (``os.path.realpath``: ``a/../a/x``
and symbolic links) and, for existing files and folders, by identity
(``os.path.samefile``: hard links and bind mounts). An output is refused, with one
line naming both paths, when it

- is the same file as an input file (a scan, a manifest, a post-processing file);
- lies inside (or is) an input folder, or contains one, or contains an input file;
- equals, contains or lies inside a protected folder (the workdir W or the model E),
  or is a hard link to a file inside one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from resfuse_jax.errors import OutputError

Named = tuple[str, str | Path]  # (what the user called it, e.g. "--pre", its path)


def _real(path: str | Path) -> Path:
  return Path(os.path.realpath(path))


def _same(a: str | Path, b: str | Path) -> bool:
  if _real(a) == _real(b):
    return True
  try:
    return os.path.samefile(a, b)
  except OSError:  # one of them does not exist: only the resolved spelling can match
    return False


def _inside(path: str | Path, folder: str | Path) -> bool:
  """``path`` is ``folder`` or lies below it (resolved, or the same folder by identity)."""
  real = _real(path)
  return any(_same(p, folder) for p in (real, *real.parents))


def _hard_link_into(path: str | Path, folder: str | Path) -> Path | None:
  """A file under ``folder`` that ``path`` (an existing file with other links) is."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  if st.st_nlink < 2 or not Path(folder).is_dir():
    return None
  for parent, _, names in os.walk(folder):
    for name in names:
      other = os.path.join(parent, name)
      try:
        o = os.stat(other)
      except OSError:
        continue
      if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
        return Path(other)
  return None


def _refuse(out: Named, relation: str, other: Named) -> None:
  (flag, path), (oflag, opath) = out, other
  raise OutputError(
    f"{flag}={path} {relation} {oflag}={opath} ({_real(opath)}); refusing to write over "
    "what this command reads: choose another output"
  )


def _identity(path: str | Path) -> tuple[int, int] | None:
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_dev, st.st_ino


def _index(files: list[Named]) -> dict:
  """Input files by resolved path and by (device, inode): one look-up per output file."""
  index = {}
  for named in files:
    index.setdefault(_real(named[1]), named)
    ident = _identity(named[1])
    if ident is not None:
      index.setdefault(ident, named)
  return index


def _check_file(out: Named, index: dict, folders: list[Named], protected: list[Named]):
  same = index.get(_real(out[1])) or index.get(_identity(out[1]) or ())
  if same is not None:
    _refuse(out, "is the same file as", same)
  for other in folders:
    if _inside(out[1], other[1]):
      _refuse(out, "lies inside the input folder", other)
  for other in protected:
    if _inside(out[1], other[1]):
      _refuse(out, "lies inside", other)
    if _inside(other[1], out[1]):
      _refuse(out, "contains", other)
    linked = _hard_link_into(out[1], other[1])
    if linked is not None:
      _refuse(out, f"is a hard link to {linked}, inside", other)


def _check_folder(out: Named, files: list[Named], folders: list[Named], protected: list[Named]):
  for other in files:
    if _inside(other[1], out[1]):
      _refuse(out, "contains the input file", other)
  for other in folders:
    if _inside(out[1], other[1]) or _inside(other[1], out[1]):
      relation = "is or lies inside" if _inside(out[1], other[1]) else "contains"
      _refuse(out, f"{relation} the input folder", other)
  for other in protected:
    if _inside(out[1], other[1]):
      _refuse(out, "is or lies inside", other)
    if _inside(other[1], out[1]):
      _refuse(out, "contains", other)


def refuse_overlaps(
  output_files: Iterable[Named] = (),
  output_folders: Iterable[Named] = (),
  input_files: Iterable[Named] = (),
  input_folders: Iterable[Named] = (),
  protected: Iterable[Named] = (),
) -> None:
  """Raises an ``OutputError`` (one line, both paths) if an output would touch an input.

  ``output_files``: files the command will write; ``output_folders``: folders it writes
  into (anything in them may be replaced); ``input_files`` / ``input_folders``: what it
  reads; ``protected``: folders it reads and must never write into (W, E).
  """
  files, folders, kept = list(input_files), list(input_folders), list(protected)
  index = _index(files)
  for out in output_files:
    _check_file(out, index, folders, kept)
  for out in output_folders:
    _check_folder(out, files, folders, kept)
