"""Every file the predictor reads from an export is covered by a SHA-256 (issue 26, class 6).

``export.json`` records ``file_digests`` (``config.json``, ``postprocessing.json`` when
there is one, the serialized window function) beside the parameters' ``param_digests``
and ``model.onnx``'s ``onnx.sha256``, and ``record_sha256``: a digest of its own
content (every other key, canonical JSON), so an edited threshold, rule or digest is
noticed. `verify_export` checks them all before ``Predictor.load`` reads anything else.

An ensemble export (``serving.ensembles``: one export per fold in ``E/fold_<k>/``) seals
its own ``export.json`` alike, with each member's ``export.json`` among the covered files:
a member's record covers the member's files, so one chain of digests covers all of E.

What this protects against: accidental damage, a half-copied folder, a hand edit. What
it does not: someone who rewrites a file and its digest (and the record's) together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from resfuse_jax import checkpointing, files
from resfuse_jax.errors import CheckpointError, DataError
from resfuse_jax.workdir import CONFIG, FOLD_PREFIX, POSTPROCESSING

EXPORT_JSON = "export.json"
FILES_KEY = "file_digests"
RECORD_KEY = "record_sha256"
AGAIN = "export the model again (python -m resfuse_jax.export)"


def record_sha256(record: dict) -> str:
  """The digest of ``export.json``'s content, without the key that holds it."""
  body = {k: v for k, v in record.items() if k != RECORD_KEY}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def is_ensemble_export(path: str | Path) -> bool:
  """``path/export.json`` is an ensemble's; unreadable: False (the single reader says why)."""
  try:
    meta = json.loads((Path(path) / EXPORT_JSON).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(meta, dict) and meta.get("format") == checkpointing.ENSEMBLE_FORMAT


def seal(record: dict, folder: str | Path, also: tuple[str, ...] = ()) -> dict:
  """``record`` with the digests of the files in ``folder`` a predictor reads, and its own.

  ``also``: more files (relative paths) to cover, e.g. an ensemble's members' records.
  """
  names = [CONFIG, POSTPROCESSING, checkpointing.EXPORT_SERVING_FILE, *also]
  digests = {n: files.sha256(Path(folder, n)) for n in names if Path(folder, n).is_file()}
  sealed = {**record, FILES_KEY: digests}
  return {**sealed, RECORD_KEY: record_sha256(sealed)}


def _check_file(folder: Path, name: str, recorded: str | None) -> None:
  try:
    path = files.under(folder, name)
  except DataError as e:
    raise CheckpointError(f"{folder / EXPORT_JSON}: {e}") from None
  if recorded is None:
    raise CheckpointError(
      f"{path} is not recorded in {EXPORT_JSON}: it was not written by this export; {AGAIN}"
    )
  if not path.is_file():
    raise CheckpointError(f"{path} is missing from the export; {AGAIN}")
  if files.sha256(path) != recorded:
    raise CheckpointError(
      f"{path} does not match the SHA-256 recorded in {EXPORT_JSON}: the file was edited or "
      f"damaged since the export; {AGAIN}"
    )


def verify_export(path: str | Path, format_: str = checkpointing.EXPORT_FORMAT) -> dict:
  """``export.json`` of the export ``path`` once it and every file it covers match."""
  path = Path(path)
  meta = checkpointing.export_metadata(path, format_)
  where = path / EXPORT_JSON
  if not isinstance(meta.get(FILES_KEY), dict) or RECORD_KEY not in meta:
    raise CheckpointError(
      f"{where} records no SHA-256 of config.json and postprocessing.json (an export of an "
      f"older version); {AGAIN}"
    )
  if record_sha256(meta) != meta[RECORD_KEY]:
    raise CheckpointError(
      f"{where} does not match the SHA-256 recorded in it: the file was edited or damaged "
      f"since the export; {AGAIN}"
    )
  recorded = meta[FILES_KEY]
  present = [n for n in (CONFIG, POSTPROCESSING) if (path / n).is_file()]
  for name in dict.fromkeys([*present, *recorded]):
    _check_file(path, name, recorded.get(name))
  return meta


def verify_ensemble(path: str | Path) -> dict:
  """An ensemble export's ``export.json`` once it, every member's record and every member
  (`verify_export`) match; a member folder it does not record is refused too."""
  path = Path(path)
  meta = verify_export(path, checkpointing.ENSEMBLE_FORMAT)
  members = meta.get("members")
  if not isinstance(members, dict) or not members:
    raise CheckpointError(f"{path / EXPORT_JSON} names no members; {AGAIN}")
  for folder in members.values():
    _check_file(path, f"{folder}/{EXPORT_JSON}", meta[FILES_KEY].get(f"{folder}/{EXPORT_JSON}"))
    verify_export(path / folder)
  stray = sorted(p.name for p in path.glob(f"{FOLD_PREFIX}*") if p.name not in members.values())
  if stray:
    raise CheckpointError(
      f"{path / stray[0]} is not a member recorded in {path / EXPORT_JSON}: it was not written "
      f"by this export; {AGAIN}"
    )
  return meta
