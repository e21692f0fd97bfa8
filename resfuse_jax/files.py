"""Paths and writes that cannot go wrong quietly: names are not paths, outputs are atomic.

- ``check_name``: a case ID (from a folder, manifest or flag) is a plain file name;
- ``under``: every output and cache path is resolved and must stay under its root;
- ``require_file``: an input that is not a readable file is named with the reason
  (missing, a folder, a broken link, a symbolic link loop);
- ``exclusive_lock``: one holder per lock file (``fcntl.flock``, released on any exit);
- ``atomic_path`` / ``write_text`` / ``write_json``: results are written to a temporary
  name in the same folder, flushed, then renamed; a reader sees the old file or the new
  one, never half, and an unwritable, full or wrong-type target is an ``OutputError``
  naming the path, with no partial file left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resfuse_jax.errors import DataError, OutputError, WorkdirBusy

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(name: str, where: str) -> str:
  """``name`` if it is safe as one path component; else a ``DataError`` naming ``where``.

  Refused: empty, a path separator, ``..``, a leading ``.`` (hidden or relative), an
  absolute path, control characters, or surrounding whitespace.
  """
  problem = None
  if not name:
    problem = "is empty"
  elif _CONTROL.search(name):
    problem = "contains control characters"
  elif "/" in name or "\\" in name or os.sep in name:
    problem = "contains a path separator"
  elif name.startswith("."):
    problem = "starts with '.'"
  elif name != name.strip():
    problem = "starts or ends with whitespace"
  if problem:
    raise DataError(f"{where}: case ID {name!r} {problem}; case IDs are used as file names")
  return name


def under(root: str | Path, *parts: str) -> Path:
  """``root/parts...`` resolved, refused (``DataError``) unless it stays inside ``root``."""
  base = Path(root).resolve()
  path = base.joinpath(*parts).resolve()
  if path != base and base not in path.parents:
    raise DataError(f"{Path(root).joinpath(*parts)} resolves to {path}, outside {base}")
  return path


def require_file(path: str | Path, what: str) -> Path:
  """``path`` if it is an existing file; else a ``DataError`` with the reason."""
  path = Path(path)
  try:
    path.stat()
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise DataError(f"{what} {path} is a symbolic link loop") from None
    if path.is_symlink():
      raise DataError(f"{what} {path} is a broken symbolic link (to {os.readlink(path)})") from None
    if e.errno == errno.ENOENT:
      raise DataError(f"{what} {path} not found") from None
    raise DataError(f"{what} {path} cannot be read: {e.strerror}") from None
  if path.is_dir():
    raise DataError(f"{what} {path} is a folder, expected a file")
  if not path.is_file():
    raise DataError(f"{what} {path} is not a regular file")
  return path


def output_error(path: str | Path, error: OSError) -> OutputError:
  reason = error.strerror or str(error)
  if isinstance(error, IsADirectoryError):
    reason = "it is a folder"
  elif isinstance(error, NotADirectoryError):
    reason = "a parent of it is a file, not a folder"
  return OutputError(f"cannot write {path}: {reason}")


def make_dirs(path: str | Path) -> Path:
  """``mkdir -p`` with an ``OutputError`` naming the path on failure."""
  path = Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise output_error(path, e) from None
  if not path.is_dir():
    raise OutputError(f"cannot write into {path}: it is not a folder")
  return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
  """Yields a temporary path beside ``path`` (same suffixes) to write; renamed on success.

  On any failure the temporary file is removed and ``path`` is untouched; an
  ``OSError`` becomes an ``OutputError`` naming ``path``.
  """
  path = Path(path)
  if path.is_dir():
    raise OutputError(f"cannot write {path}: it is a folder")
  make_dirs(path.parent)
  double = path.name.lower().endswith(".nii.gz")
  suffix = "".join(path.suffixes[-2:]) if double else path.suffix
  stem = path.name.removesuffix(suffix)  # the temporary's suffix lower-case: nibabel's writers
  tmp = path.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:8]}{suffix.lower()}")
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    tmp.replace(path)
  except OutputError:
    tmp.unlink(missing_ok=True)
    raise
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise output_error(path, e) from e
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def write_text(path: str | Path, text: str) -> Path:
  with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
    f.write(text)
  return Path(path)


def write_bytes(path: str | Path, blob: bytes) -> Path:
  with atomic_path(path) as tmp:
    tmp.write_bytes(blob)
  return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
  return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str = "run") -> Iterator[Path]:
  """Holds the lock file ``path`` for the block; a second holder fails at once (``WorkdirBusy``).

  ``flock`` is released by the kernel when the process exits however it exits, so
  a killed run never leaves a stale lock; the file names the holder's host and PID.
  The lock's folder is named in the error (``workdir.Workdir.lock`` names the file).
  """
  path = Path(path)
  folder = make_dirs(path.parent)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise output_error(path, e) from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirBusy(
        f"{folder} is in use by another {what}: {holder} holds {path}. Wait for it to "
        "finish or choose another folder"
      ) from None
    except OSError as e:  # e.g. ENOSYS/ENOLCK: a file system without locks (Lustre sans flock)
      raise OutputError(f"cannot lock {path}: {e.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    try:
      yield path
    finally:
      os.ftruncate(fd, 0)
  finally:
    os.close(fd)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def disk_full_reason(error: BaseException) -> str | None:
  """'No space left on device' (or quota, read-only) when ``error`` or its causes say so.

  Tensorstore (Orbax's writer) reports a full disk as RESOURCE_EXHAUSTED in a
  ``ValueError``'s text, not as an ``OSError``; both are recognised. None otherwise.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
      return error.strerror or os.strerror(error.errno)
    text = str(error)
    if "RESOURCE_EXHAUSTED" in text or "No space left" in text:
      return "no space left on the device (RESOURCE_EXHAUSTED)"
    if "Read-only file system" in text:
      return "read-only file system"
    error = error.__cause__ or error.__context__
  return None


TMP_OWNER = ".owner"  # "<host> <pid>" of the process writing a temporary folder


def make_owned_tmp_dir(path: str | Path) -> Path:
  """Creates the temporary folder ``path`` recording this process as its owner."""
  path = make_dirs(path)
  write_text(path / TMP_OWNER, f"{socket.gethostname()} {os.getpid()}\n")
  return path


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def remove_orphaned_tmp_dirs(parent: str | Path, pattern: str) -> list[Path]:
  """Removes temporaries under ``parent`` whose recorded owner (this host) is dead.

  One without an owner record, from another host, or whose process lives, is left alone.
  """
  removed = []
  for folder in Path(parent).glob(pattern):
    try:
      host, pid = (folder / TMP_OWNER).read_text().split()
      pid = int(pid)
    except (OSError, ValueError):
      continue
    if host == socket.gethostname() and pid != os.getpid() and not _alive(pid):
      shutil.rmtree(folder, ignore_errors=True)
      removed.append(folder)
  return removed


def sha256(path: str | Path) -> str:
  """The SHA-256 of a file's bytes, read 1 MiB at a time (hex)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
