"""Every file the predictor reads from an export is covered by a SHA-256 (issue 26, class 6).

``export.json`` records ``file_digests`` (``config.json``, ``postprocessing.json`` when
there is one, the serialized window function) beside the parameters' ``param_digests``
and ``model.onnx``'s ``onnx.sha256``, and ``record_sha256``: a digest of its own
content (every other key, canonical JSON), so an edited threshold, rule or digest is
noticed. `verify_export` checks them all before ``Predictor.load`` reads anything else.

What this protects against: accidental damage, a half-copied folder, a hand edit. What
it does not: someone who rewrites a file and its digest (and the record's) together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from resfuse_jax import checkpointing, files
from resfuse_jax.errors import CheckpointError, DataError
from resfuse_jax.workdir import CONFIG, POSTPROCESSING

EXPORT_JSON = "export.json"
FILES_KEY = "file_digests"
RECORD_KEY = "record_sha256"
AGAIN = "export the model again (python -m resfuse_jax.export)"


def record_sha256(record: dict) -> str:
  """The digest of ``export.json``'s content, without the key that holds it."""
  body = {k: v for k, v in record.items() if k != RECORD_KEY}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(record: dict, folder: str | Path) -> dict:
  """``record`` with the digests of the files in ``folder`` a predictor reads, and its own."""
  names = [CONFIG, POSTPROCESSING, checkpointing.EXPORT_SERVING_FILE]
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


def verify_export(path: str | Path) -> dict:
  """``export.json`` of the export ``path`` once it and every file it covers match."""
  path = Path(path)
  meta = checkpointing.export_metadata(path)
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
