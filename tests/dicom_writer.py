"""DICOM MR series the tests write themselves with pydicom, from a volume and its affine.

``volume[i, j, k]`` and a RAS ``affine`` are what a NIfTI file holds; the series places
column c, row r of slice k at ``affine @ (c, r, k)`` (LPS in the files), so a reader that
gets the geometry right gives back the same array and affine. Files are named in a
shuffled order: a reader that sorts by name or InstanceNumber instead of position fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import MRImageStorage, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0])


def oblique_affine(spacing=(0.9, 1.1, 2.0), degrees=(12.0, -7.0, 20.0), origin=(-40, 30, -20)):
  """A RAS affine with anisotropic spacing, rotated about three axes (a real oblique plan)."""
  ax, ay, az = np.radians(degrees)
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
  affine[:3, 3] = origin
  return affine


def study(patient_id="RFJ-0001", name="Phantom^Case") -> dict:
  """The patient and study attributes shared by a study's series."""
  return {
    "PatientID": patient_id,
    "PatientName": name,
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "StudyInstanceUID": generate_uid(),
    "StudyID": "1",
    "StudyDate": "20261204",
    "StudyTime": "101500",
    "AccessionNumber": "ACC-1",
    "ReferringPhysicianName": "",
    "FrameOfReferenceUID": generate_uid(),
  }


def _slice(volume, affine, k, stored, slope, intercept, meta, series, number, decimals=8):
  ds = Dataset()
  for key, value in {**meta, **series}.items():
    setattr(ds, key, value)
  ds.SOPClassUID = MRImageStorage
  ds.SOPInstanceUID = generate_uid()
  ds.Modality = "MR"
  ds.InstanceNumber = number
  ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
  lps = LPS @ affine[:3, :3]
  col_dir, row_dir = lps[:, 0], lps[:, 1]
  ds.ImageOrientationPatient = [
    f"{v:.10f}" for v in (*col_dir / np.linalg.norm(col_dir), *row_dir / np.linalg.norm(row_dir))
  ]
  ds.ImagePositionPatient = [f"{v:.{decimals}f}" for v in LPS @ (affine @ [0, 0, k, 1])[:3]]
  ds.PixelSpacing = [f"{np.linalg.norm(row_dir):.10f}", f"{np.linalg.norm(col_dir):.10f}"]
  ds.SliceThickness = f"{np.linalg.norm(affine[:3, 2]):.6f}"
  ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated = ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
  ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
  ds.ContentDate, ds.ContentTime = "20261204", "101500"
  ds.WindowCenter, ds.WindowWidth = "500", "1000"
  ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
  return ds


def write_series(
  folder: Path,
  volume: np.ndarray,
  affine: np.ndarray,
  meta: dict,
  description: str,
  series_number: int = 1,
  slope: float = 1.0,
  intercept: float = 0.0,
  multiframe: bool = False,
  edit=None,
  decimals: int = 8,
) -> list[Path]:
  """Writes ``volume`` as one MR series under ``folder`` (created); returns its files.

  Stored values are ``round((volume - intercept) / slope)`` as int16. ``multiframe``
  converts the single-frame instances into one enhanced MR instance with highdicom's
  legacy conversion. ``edit(k, ds)`` may change slice k's dataset before it is written
  (the tests plant defects with it). ``decimals``: of ImagePositionPatient (scanners write
  2 to 6).
  """
  folder.mkdir(parents=True, exist_ok=True)
  stored = np.round((np.asarray(volume, np.float64) - intercept) / slope)
  stored = stored.astype(np.int16)
  series = {
    "SeriesInstanceUID": generate_uid(),
    "SeriesDescription": description,
    "SeriesNumber": series_number,
  }
  slices = []
  for k in range(volume.shape[2]):
    ds = _slice(volume, affine, k, stored, slope, intercept, meta, series, k + 1, decimals)
    ds = file_meta(ds)
    if edit is not None:
      ds = edit(k, ds)
    if ds is not None:
      slices.append(ds)
  rng = np.random.default_rng(len(slices))
  if multiframe:
    import highdicom as hd

    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
      legacy_datasets=slices,
      series_instance_uid=generate_uid(),
      series_number=series_number,
      sop_instance_uid=generate_uid(),
      instance_number=1,
    )
    enhanced.SeriesDescription = description
    path = folder / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    return [path]
  paths = []
  for n, i in enumerate(rng.permutation(len(slices))):
    path = folder / f"IM{n:04d}"
    _save(slices[i], path)
    paths.append(path)
  return paths


def _save(ds: Dataset, path: Path) -> None:
  ds.save_as(path, enforce_file_format=True)


def file_meta(ds: Dataset, transfer_syntax=pydicom.uid.ExplicitVRLittleEndian) -> Dataset:
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = ds.SOPClassUID
  meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  meta.TransferSyntaxUID = transfer_syntax
  ds.file_meta = meta
  return ds
