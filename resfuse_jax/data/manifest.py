"""Reader for any collection described by a CSV manifest: ``case_id,pre,post,label``.

Relative paths are taken relative to the manifest's folder; an empty ``label``
marks an inference-only case.
"""

from __future__ import annotations

import csv
from pathlib import Path

from resfuse_jax import files as file_io
from resfuse_jax.data.common import CaseFiles, DataError, require_scan

COLUMNS = ("case_id", "pre", "post", "label")
SERIES_COLUMNS = ("pre_series", "post_series")  # optional: which series of a DICOM folder


def _decoded_lines(path: Path) -> list[str]:
  """The manifest's lines as UTF-8 (a byte-order mark is dropped); else one line naming the row."""
  try:
    blob = path.read_bytes()
  except OSError as e:
    raise DataError(f"manifest {path} cannot be read: {e.strerror}") from None
  lines = blob.splitlines(keepends=True)
  out = []
  for number, raw in enumerate(lines, start=1):
    try:
      out.append(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
    except UnicodeDecodeError as e:
      raise DataError(
        f"manifest {path} line {number}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
        f"{e.start + 1}); save the manifest as UTF-8"
      ) from None
  return out


def find_cases(
  manifest: str | Path,
  require_label: bool = True,
  series: tuple[str | None, str | None] = (None, None),
) -> list[CaseFiles]:
  """The manifest's cases; ``pre``/``post`` may name DICOM series folders, whose series the
  optional ``pre_series``/``post_series`` columns choose (else ``series``, the flags)."""
  path = Path(manifest) if manifest else None
  if path is None:
    raise DataError(
      f"no manifest given: data.manifest=''; expected a CSV with columns {','.join(COLUMNS)}"
    )
  try:
    file_io.require_file(path, "manifest")
  except DataError as e:
    raise DataError(
      f"{e} (data.manifest); expected a CSV with columns {','.join(COLUMNS)}"
    ) from None
  reader = csv.DictReader(_decoded_lines(path))
  missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
  if missing:
    raise DataError(f"manifest {path} lacks columns {missing}; it has {reader.fieldnames}")
  rows = list(reader)
  cases, seen = [], set()
  for line, row in enumerate(rows, start=2):
    cid = (row["case_id"] or "").strip()
    if not cid:
      raise DataError(f"manifest {path} line {line}: empty case_id")
    file_io.check_name(cid, f"manifest {path} line {line}")
    if cid in seen:
      raise DataError(f"manifest {path} line {line}: case_id {cid!r} appears twice")
    seen.add(cid)
    files, problem = {}, None
    for column in ("pre", "post", "label"):
      value = (row[column] or "").strip()
      if column == "label" and not require_label:  # never read: not demanded
        files[column] = None
        continue
      where = f"manifest {path} line {line} (case {cid})"
      files[column] = Path(value) if Path(value).is_absolute() else path.parent / value
      try:
        if not value:
          raise DataError(f"{where}: empty {column!r} path")
        if column == "label":
          file_io.require_file(files[column], f"{where}: {column} file")
        else:
          require_scan(files[column], f"{where}: {column} file")
      except DataError as e:
        problem = problem or str(e)
    chosen = [(row.get(c) or "").strip() or flag for c, flag in zip(SERIES_COLUMNS, series)]
    cases.append(CaseFiles(cid, files["pre"], files["post"], files["label"], problem, *chosen))
  if not cases:
    raise DataError(f"manifest {path} lists no cases")
  return cases
