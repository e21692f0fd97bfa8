"""Which DICOM series a folder holds, and the one a flag or manifest column chooses.

Only headers are read here (``stop_before_pixels``): listing a study of a thousand
instances costs milliseconds per file, and the pixels of the series not chosen are
never decoded. pydicom comes with the ``dicom`` extra.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path

from absl import logging

from resfuse_jax.errors import DataError

EXTRA = "pip install 'resfuse_jax[dicom]'"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


def pydicom():
  """pydicom, or one line naming the extra that brings it."""
  try:
    import pydicom as module
  except ImportError:
    raise DataError(f"reading DICOM needs pydicom: {EXTRA}") from None
  return module


@dataclasses.dataclass(frozen=True)
class Series:
  """One image series of a folder: its instances' files (any order) and what names it."""

  uid: str
  description: str
  number: int | None
  frame_of_reference: str | None
  files: tuple[Path, ...]

  def line(self) -> str:
    number = "" if self.number is None else f"#{self.number} "
    return f"{number}{self.description or '(no SeriesDescription)'!r}  {self.uid}  ({len(self.files)} files)"


def one_line(error: Exception) -> str:
  """A library's message (pydicom's list every plug-in it tried, line by line) on one line."""
  return " ".join(str(error).split())


def _read_header(dcm, path: Path, folder: Path):
  """The header of ``path``; None for a file that is not DICOM. Files written without the
  128-byte preamble and "DICM" (older exports) are read too, when they parse as DICOM."""
  try:
    return dcm.dcmread(path, stop_before_pixels=True)
  except dcm.errors.InvalidDicomError:
    try:
      ds = dcm.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # a README, a thumbnail: not DICOM at all
      return None
    return ds if "SOPInstanceUID" in ds and "SeriesInstanceUID" in ds else None
  except Exception as e:
    raise DataError(f"DICOM folder {folder}: cannot read {path}: {one_line(e)}") from e


def _headers(folder: Path):
  """(path, header dataset) of every DICOM image instance under ``folder``, sorted by path."""
  dcm = pydicom()
  skipped = 0
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    ds = _read_header(dcm, path, folder)
    if ds is None:
      skipped += 1
      continue
    sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if sop_class == DICOMDIR_SOP_CLASS or "Rows" not in ds or "SeriesInstanceUID" not in ds:
      continue  # DICOMDIR, structured reports, presentation states: no image
    if str(getattr(ds, "Modality", "")) == "SEG":
      continue  # segmentations (ours or others') are not scans
    yield path, ds
  if skipped:
    logging.info("DICOM folder %s: %d file(s) that are not DICOM were passed over", folder, skipped)


def list_series(folder: str | Path) -> list[Series]:
  """Every image series under ``folder`` (recursively), in SeriesNumber order."""
  folder = Path(folder)
  if not folder.is_dir():
    raise DataError(f"DICOM folder {folder} not found")
  grouped: dict[str, list] = {}
  for path, ds in _headers(folder):
    grouped.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
  out = []
  for uid, members in grouped.items():
    first = members[0][1]
    number = getattr(first, "SeriesNumber", None)
    out.append(
      Series(
        uid=uid,
        description=str(getattr(first, "SeriesDescription", "") or ""),
        number=None if number in (None, "") else int(number),
        frame_of_reference=str(first.get("FrameOfReferenceUID", "") or "").strip() or None,
        files=tuple(p for p, _ in members),
      )
    )
  return sorted(out, key=lambda s: (s.number is None, s.number or 0, s.description, s.uid))


def _listing(series: list[Series]) -> str:
  return "; ".join(s.line() for s in series)


def select(folder: str | Path, selector: str | None, what: str, flag: str) -> Series:
  """The series of ``folder`` that ``selector`` names (SeriesInstanceUID, SeriesDescription
  or a shell pattern of it); without a selector, the folder's only series.

  ``what`` names the scan in errors (``case X: pre-contrast``), ``flag`` the way to choose.
  Several series without a selector, or a selector matching none or several, stop with
  the list of what the folder holds.
  """
  series = list_series(folder)
  if not series:
    raise DataError(f"{what} folder {folder} holds no DICOM image series")
  if selector:  # a UID exactly; a description exactly, then in any letter case or a pattern
    chosen = [s for s in series if selector in (s.uid, s.description)]
    wanted = selector.casefold()
    chosen = chosen or [s for s in series if fnmatch.fnmatchcase(s.description.casefold(), wanted)]
    if len(chosen) == 1:
      return chosen[0]
    problem = "matches no series" if not chosen else f"matches {len(chosen)} series"
    raise DataError(
      f"{what} folder {folder}: {flag}={selector!r} {problem}; the folder holds: "
      f"{_listing(chosen or series)}"
    )
  if len(series) > 1:
    raise DataError(
      f"{what} folder {folder} holds {len(series)} DICOM series; choose one with "
      f"{flag}=<SeriesInstanceUID or SeriesDescription>: {_listing(series)}"
    )
  return series[0]
