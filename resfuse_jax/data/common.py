"""Types shared by the dataset readers, and NIfTI loading with clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np

from resfuse_jax import files
from resfuse_jax.errors import DataError

__all__ = [
  "Case",
  "CaseFiles",
  "DataError",
  "InputLimits",
  "canonical",
  "load_canonical",
  "load_scans",
  "require_scan",
  "scan_path",
]

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class InputLimits:
  """What a scan may claim in its header before any voxel is read (``data.max_voxels`` ...).

  The defaults admit every BraTS (240x240x155, 9 M voxels) and breast DCE-MRI scan
  (at most ~512x512x200, 52 M) with a wide margin: 512^3 voxels, 2 GiB in memory.
  They keep a damaged or hostile header (30000^3 voxels, a gzip bomb) from being read
  until memory runs out, and a spacing that is not a spacing (0, NaN, 1e30 mm) out of
  resampling and HD95. They change no cached array, so they are not in the cache key.
  """

  max_voxels: int = 2**27
  max_bytes: int = 2**31
  spacing_range: tuple[float, float] = (0.05, 20.0)  # mm, per axis

  @classmethod
  def from_config(cls, cfg) -> InputLimits:
    return cls(
      max_voxels=int(cfg.max_voxels),
      max_bytes=int(cfg.max_bytes),
      spacing_range=tuple(float(s) for s in cfg.spacing_range),
    )


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  """One case's input files, as listed.

  ``problem`` is why the case cannot be read, found while listing (a missing file):
  raised when the case is preprocessed, so that ``data.on_bad_case=skip`` skips it.
  ``pre``/``post`` are NIfTI files, or folders holding a DICOM series each.
  """

  case_id: str
  pre: Path
  post: Path
  label: Path | None
  problem: str | None = None
  pre_series: str | None = None  # a DICOM folder's series (UID or description), when it has several
  post_series: str | None = None


@dataclasses.dataclass
class Case:
  """One case in canonical (RAS) orientation, cropped to the head and normalised.

  ``pre``/``post`` are float32 [D, H, W]; ``label`` uint8 [D, H, W] or None.
  ``crop`` is the (start, stop) box in the canonical grid, before any
  resampling to ``spacing`` from ``original_spacing``; ``affine``/``shape`` are
  the file's own, kept so predictions can be written back to it. ``label_file`` is
  the source label map (None without one): evaluation scores on its grid.
  """

  case_id: str
  pre: np.ndarray
  post: np.ndarray
  label: np.ndarray | None
  spacing: tuple[float, float, float]
  affine: np.ndarray
  shape: tuple[int, int, int]
  crop: tuple[tuple[int, int], ...]
  original_spacing: tuple[float, float, float] | None = None
  normalization: dict | None = None
  fg_locations: list[np.ndarray] | None = None  # per region: [N, 3] voxel indices
  label_file: Path | None = None


def require_scan(path: str | Path, what: str) -> Path:
  """``path`` if it is a scan: an existing file (NIfTI) or folder (a DICOM series)."""
  if Path(path).is_dir():
    return Path(path)
  return files.require_file(path, what)


def scan_path(nifti: Path) -> Path:
  """``nifti``, or the folder of the same name without ``.nii.gz``/``.nii`` when only that
  exists (a dataset layout's scan given as a DICOM series)."""
  if nifti.exists() or nifti.is_symlink():
    return nifti
  name = nifti.name
  for suffix in (".nii.gz", ".nii"):
    if name.lower().endswith(suffix):
      folder = nifti.with_name(name[: -len(suffix)])
      return folder if folder.is_dir() else nifti
  return nifti


def check_size(where: str, shape, itemsize: int, zooms, limits: InputLimits) -> None:
  """Refuses, before any voxel is read, a scan over ``data.max_voxels``/``max_bytes`` or with
  a spacing outside ``data.spacing_range`` (NIfTI headers and DICOM series alike)."""
  voxels = int(np.prod(shape, dtype=np.int64))
  if voxels > limits.max_voxels or voxels * itemsize > limits.max_bytes:
    raise DataError(
      f"{where}: its header claims {'x'.join(map(str, shape))} voxels "
      f"({voxels * itemsize / MiB:.0f} MiB in memory), over data.max_voxels={limits.max_voxels} "
      f"/ data.max_bytes={limits.max_bytes}; not read (raise the limits if the scan is real)"
    )
  lo, hi = limits.spacing_range
  if not all(np.isfinite(z) and lo <= z <= hi for z in zooms):
    raise DataError(
      f"{where} has voxel spacing {list(zooms)} mm, outside data.spacing_range=({lo}, {hi}) mm"
    )


def check_header(img, path: Path, case_id: str, kind: str, limits: InputLimits) -> None:
  """Refuses, from the header alone, a volume that is not a real 3-D scan of sane size."""
  where = f"case {case_id}: {kind} file {path}"
  header = img.header
  shape = tuple(int(s) for s in header.get_data_shape())
  if len(shape) == 4 and shape[-1] == 1:
    shape = shape[:3]
  if len(shape) != 3:
    raise DataError(f"{where} is {len(shape)}-D {shape}, expected a 3-D volume")
  if min(shape) < 1:
    raise DataError(f"{where} has an empty shape {shape}")
  dtype = np.dtype(header.get_data_dtype())
  if dtype.kind not in "biuf":
    raise DataError(f"{where} has data type {dtype}; expected real integer or float voxels")
  slope, inter = header.get_slope_inter() if hasattr(header, "get_slope_inter") else (None, None)
  itemsize = 8 if (slope not in (None, 1.0) or inter not in (None, 0.0)) else dtype.itemsize
  check_size(where, shape, itemsize, [float(z) for z in header.get_zooms()[:3]], limits)
  affine = np.asarray(img.affine, np.float64)
  linear = affine[:3, :3]
  if not np.isfinite(affine).all() or not linear.any():
    raise DataError(f"{where} has a zero or non-finite affine (voxel-to-world matrix)")
  if np.linalg.cond(linear) > 1e8:
    raise DataError(
      f"{where} has a singular affine (voxel-to-world matrix {linear.tolist()}): its axes "
      "do not span 3-D space, so its orientation is undefined"
    )


def load_canonical(
  path: Path, case_id: str, kind: str, limits: InputLimits = InputLimits()
) -> tuple[np.ndarray, nib.Nifti1Image, tuple[float, float, float]]:
  """Reads a volume reoriented to the closest canonical (RAS+) orientation.

  The header is checked against ``limits`` before any voxel is read. Returns the
  canonical voxels, the original image (for its affine and shape) and the
  canonical voxel spacing in mm.
  """
  files.require_file(path, f"case {case_id}: {kind} file")
  try:
    img = nib.load(str(path))
  except Exception as e:  # nibabel raises many types for damaged files
    raise DataError(f"case {case_id}: cannot read {kind} file {path}: {e}") from e
  return canonical(img, path, case_id, kind, limits)


def canonical(
  img: nib.Nifti1Image, path: Path, case_id: str, kind: str, limits: InputLimits = InputLimits()
) -> tuple[np.ndarray, nib.Nifti1Image, tuple[float, float, float]]:
  """`load_canonical` of an image already opened (a NIfTI file, or a DICOM series read into
  memory): the same checks and reorientation, whatever the source format."""
  check_header(img, path, case_id, kind, limits)
  try:
    canonical_img = nib.as_closest_canonical(img)
    data = np.asarray(canonical_img.dataobj)
  except MemoryError:
    shape = "x".join(map(str, img.header.get_data_shape()))
    raise DataError(
      f"case {case_id}: out of memory reading {kind} file {path} ({shape} voxels of "
      f"{img.header.get_data_dtype()})"
    ) from None
  except Exception as e:
    raise DataError(f"case {case_id}: cannot read {kind} file {path}: {e}") from e
  if data.ndim == 4 and data.shape[-1] == 1:
    data = data[..., 0]
  spacing = tuple(float(z) for z in canonical_img.header.get_zooms()[:3])
  return data, img, spacing


def load_scans(files_: CaseFiles, limits: InputLimits = InputLimits()):
  """(pre, pre image, spacing), (post, post image, spacing): both NIfTI files, or both
  DICOM series folders (pre then on post's grid, `dicom.read_pair`)."""
  cid = files_.case_id
  folders = [Path(p).is_dir() for p in (files_.pre, files_.post)]
  if not any(folders):
    return (
      load_canonical(files_.pre, cid, "pre-contrast", limits),
      load_canonical(files_.post, cid, "post-contrast", limits),
    )
  if not all(folders):
    dicom_one, nifti_one = (files_.pre, files_.post) if folders[0] else (files_.post, files_.pre)
    raise DataError(
      f"case {cid}: {dicom_one} is a DICOM folder but {nifti_one} a file; give the pre- and "
      "post-contrast scans both as DICOM series folders or both as NIfTI files"
    )
  from resfuse_jax.data import dicom  # pydicom only when DICOM is read

  pre_img, post_img = dicom.read_pair(
    cid, Path(files_.pre), Path(files_.post), files_.pre_series, files_.post_series, limits
  )
  return (
    canonical(pre_img, files_.pre, cid, "pre-contrast", limits),
    canonical(post_img, files_.post, cid, "post-contrast", limits),
  )
