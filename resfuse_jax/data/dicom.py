"""A DICOM series as the NIfTI image the rest of the package reads.

Slices are ordered by ImagePositionPatient projected on the slice normal (never by file
name or InstanceNumber), RescaleSlope/Intercept are applied per slice, enhanced
multi-frame MR is read from its functional groups, and DICOM's LPS patient coordinates
become the RAS affine of NIfTI (x and y negated). Voxels are stored as NIfTI stores
them: ``array[i, j, k]`` is column i, row j of the k-th slice along the normal, so the
affine's columns are (column direction x column spacing, row direction x row spacing,
slice step, first slice's position). A series whose slices do not make one regular
grid (a missing slice, uneven steps, gantry tilt, mixed orientations or sizes) is
refused with one line naming the folder: reading it as a grid would misplace voxels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
from absl import logging
from scipy import ndimage

from resfuse_jax.data import dicom_series
from resfuse_jax.data.common import InputLimits, check_size
from resfuse_jax.errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
GAP = 1.5  # a step this many median steps long is a missing slice ("about twice")
UNEVEN = 0.01  # a step more than 1% off the median is non-uniform spacing
TILT = 1e-3  # sideways drift per mm along the normal (~0.06 degrees): gantry tilt
SIDEWAYS = 0.05  # ... or per pixel spacing, whichever is larger (rounded positions)
ROUNDING = 0.02  # mm: what rounding of ImagePositionPatient (0.01 mm, 6 digits) may add
SAME = 1e-4  # orientation cosines and spacings that agree to this are equal
GRID_TOLERANCE = 1e-3  # mm: two grids this close are one (no resampling)


@dataclasses.dataclass(frozen=True)
class Frame:
  """One slice: which file and frame holds it, and its geometry and rescale."""

  file: int  # index into the series' datasets
  frame: int | None  # frame of a multi-frame instance, None for a single-frame one
  position: np.ndarray  # ImagePositionPatient (LPS, mm)
  orientation: np.ndarray  # ImageOrientationPatient (6 cosines)
  spacing: tuple[float, float]  # PixelSpacing (row spacing, column spacing)
  size: tuple[int, int]  # (Rows, Columns)
  rescale: tuple[float, float]  # (slope, intercept)


@dataclasses.dataclass
class SeriesVolume:
  """A series read as a grid: ``array`` [columns, rows, slices] float32, ``affine`` RAS."""

  series: dicom_series.Series
  folder: Path
  array: np.ndarray | None  # None: the grid only (`read_grid`)
  affine: np.ndarray
  datasets: list  # header datasets, in file order of ``frames[*].file``
  frames: list[Frame]  # in slice order (k = 0, 1, ...)
  where: str  # "case X: post-contrast folder F (series 'D')", for errors

  @property
  def shape(self) -> tuple[int, int, int]:
    rows, cols = self.frames[0].size
    return cols, rows, len(self.frames)

  def image(self) -> nib.Nifti1Image:
    return nib.Nifti1Image(self.array, self.affine)


def _group(ds, index: int, sequence: str):
  """A functional group macro of frame ``index``: per-frame first, then shared."""
  for groups, i in (
    ("PerFrameFunctionalGroupsSequence", index),
    ("SharedFunctionalGroupsSequence", 0),
  ):
    if groups in ds and len(ds[groups].value) > i and sequence in ds[groups].value[i]:
      return ds[groups].value[i][sequence].value[0]
  return None


def _rescale(item) -> tuple[float, float]:
  slope = getattr(item, "RescaleSlope", None) if item is not None else None
  intercept = getattr(item, "RescaleIntercept", None) if item is not None else None
  return (1.0 if slope is None else float(slope), 0.0 if intercept is None else float(intercept))


def _frames_of(ds, index: int, where: str) -> list[Frame]:
  size = (int(ds.Rows), int(ds.Columns))
  frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
  if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
    if frames != 1:
      raise DataError(f"{where}: a multi-frame instance without functional groups")
    for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
      if name not in ds:
        raise DataError(f"{where}: an instance lacks {name}; its slices cannot be placed")
    spacing = tuple(float(s) for s in ds.PixelSpacing)
    return [
      Frame(index, None, np.array(ds.ImagePositionPatient, float),
            np.array(ds.ImageOrientationPatient, float), spacing, size, _rescale(ds))
    ]  # fmt: skip
  out = []
  for f in range(frames):
    position = _group(ds, f, "PlanePositionSequence")
    orientation = _group(ds, f, "PlaneOrientationSequence")
    measures = _group(ds, f, "PixelMeasuresSequence")
    if position is None or orientation is None or measures is None:
      raise DataError(f"{where}: frame {f + 1} lacks its plane position, orientation or spacing")
    out.append(
      Frame(index, f, np.array(position.ImagePositionPatient, float),
            np.array(orientation.ImageOrientationPatient, float),
            tuple(float(s) for s in measures.PixelSpacing), size,
            _rescale(_group(ds, f, "PixelValueTransformationSequence")))
    )  # fmt: skip
  return out


def _check_same(frames: list[Frame], where: str) -> np.ndarray:
  """The one orientation of the slices (else refused); returns the slice normal."""
  first = frames[0]
  sizes = {f.size for f in frames}
  spacing = np.array([f.spacing for f in frames])
  if len(sizes) > 1 or np.abs(spacing - spacing[0]).max() > SAME * max(spacing[0]):
    raise DataError(
      f"{where}: mixed slice sizes in one series ({sorted(sizes)} pixels, pixel spacings "
      f"{sorted({tuple(s) for s in spacing.round(4).tolist()})} mm); it is not one volume"
    )
  cosines = np.array([f.orientation for f in frames])
  if np.abs(cosines - cosines[0]).max() > SAME:
    raise DataError(
      f"{where}: mixed orientations in one series ({len(np.unique(cosines.round(4), axis=0))} "
      "different ImageOrientationPatient); it is not one volume"
    )
  row, col = first.orientation[:3], first.orientation[3:]
  if (
    abs(np.linalg.norm(row) - 1) > 1e-3
    or abs(np.linalg.norm(col) - 1) > 1e-3
    or abs(row @ col) > 1e-3
  ):
    raise DataError(
      f"{where}: ImageOrientationPatient {first.orientation.tolist()} is not two orthogonal unit vectors"
    )
  return np.cross(row, col)


def _check_positions(frames: list[Frame], normal: np.ndarray, where: str) -> list[Frame]:
  """The slices in order along the normal, refused unless they are evenly spaced and stacked
  straight along it (no gap, no uneven step, no gantry tilt or shear).

  Positions are decimal strings, often rounded to 0.01 mm or 6 significant digits: steps
  get an absolute allowance of ``ROUNDING`` mm, and sideways drift is judged over the whole
  stack (where rounding averages out) and per slice against a fraction of a pixel.
  """
  if len(frames) < 2:
    raise DataError(f"{where}: {len(frames)} slice; a 3-D volume needs at least two")
  depth = np.array([f.position @ normal for f in frames])
  order = np.argsort(depth, kind="stable")
  frames, depth = [frames[i] for i in order], depth[order]
  steps = np.diff(depth)
  median = float(np.median(steps))
  shared = steps < max(1e-3 * median, ROUNDING)
  if shared.any():
    raise DataError(
      f"{where}: {int(shared.sum()) + 1} slices share one position (several echoes, phases or "
      "repeats in one series?); give a series with one slice per position"
    )
  worst = int(np.argmax(np.abs(steps - median)))
  if steps[worst] > GAP * median:
    raise DataError(
      f"{where}: missing slices: a gap of {steps[worst]:.3g} mm between slices at "
      f"{depth[worst]:.4g} and {depth[worst + 1]:.4g} mm along the normal, where the median step "
      f"is {median:.3g} mm (about {round(steps[worst] / median) - 1} slice(s) missing)"
    )
  if abs(steps[worst] - median) > max(UNEVEN * median, ROUNDING):
    raise DataError(
      f"{where}: non-uniform slice spacing: a step of {steps[worst]:.4g} mm where the median "
      f"is {median:.4g} mm (more than {UNEVEN:.0%} off); it cannot be read as one grid"
    )
  _check_straight(np.array([f.position for f in frames]), normal, min(frames[0].spacing), where)
  return frames


def _check_straight(positions: np.ndarray, normal: np.ndarray, pixel: float, where: str) -> None:
  """Slices stacked along the normal: no overall drift sideways (gantry tilt), no slice off
  the line through the first and last (shear)."""
  span = positions[-1] - positions[0]
  along = float(span @ normal)
  drift = float(np.linalg.norm(span - along * normal))
  if drift > max(TILT * along, SIDEWAYS * pixel):
    raise DataError(
      f"{where}: gantry tilt or shear: the slices drift {drift:.3g} mm sideways over "
      f"{along:.4g} mm along the normal ({np.degrees(np.arctan2(drift, along)):.2f} degrees off "
      "it); resample the series to an orthogonal grid first"
    )
  fraction = np.linspace(0.0, 1.0, len(positions))[:, None]
  away = positions - (positions[0] + fraction * span)
  off = float(np.linalg.norm(away - np.outer(away @ normal, normal), axis=1).max())  # sideways
  if off > SIDEWAYS * pixel + ROUNDING:
    raise DataError(
      f"{where}: gantry tilt or shear: a slice lies {off:.3g} mm off the line through the "
      "first and last slice positions; the slices do not make one grid"
    )


def _affine(frames: list[Frame]) -> np.ndarray:
  first, last = frames[0], frames[-1]
  row_spacing, col_spacing = first.spacing
  lps = np.eye(4)
  lps[:3, 0] = first.orientation[:3] * col_spacing  # along a row: increasing column index
  lps[:3, 1] = first.orientation[3:] * row_spacing  # along a column: increasing row index
  lps[:3, 2] = (last.position - first.position) / (len(frames) - 1)
  lps[:3, 3] = first.position
  return LPS_TO_RAS @ lps


def _check_decodable(ds, path: Path, where: str) -> None:
  """A compressed transfer syntax that no installed decoder reads: named, with the plug-in."""
  uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
  if uid is None or not uid.is_compressed:
    return
  from pydicom.pixels import get_decoder

  try:
    decoder = get_decoder(uid)
  except NotImplementedError:
    raise DataError(
      f"{where}: {path.name} uses the transfer syntax {uid.name} ({uid}), which pydicom has "
      "no decoder for; convert the series to an uncompressed one first (e.g. gdcmconv --raw)"
    ) from None
  if not decoder.is_available:
    plugins = "; or ".join(decoder.missing_dependencies) or "a pydicom decoder plug-in"
    raise DataError(
      f"{where}: {path.name} uses the compressed transfer syntax {uid.name} ({uid}), which no "
      f"installed decoder reads; install {plugins}"
    )


def _check_size(frames: list[Frame], where: str, limits: InputLimits) -> None:
  rows, cols = frames[0].size
  step = float(np.linalg.norm(frames[-1].position - frames[0].position)) / (len(frames) - 1)
  zooms = (frames[0].spacing[1], frames[0].spacing[0], step)
  check_size(where, (cols, rows, len(frames)), 4, zooms, limits)  # float32 once rescaled


def read_grid(
  folder: str | Path,
  selector: str | None,
  what: str,
  flag: str,
  limits: InputLimits = InputLimits(),
) -> SeriesVolume:
  """The series of ``folder`` that ``selector`` names (`dicom_series.select`), its grid
  checked and its slices ordered, from the headers alone (``array`` None)."""
  folder = Path(folder)
  series = dicom_series.select(folder, selector, what, flag)
  where = f"{what} folder {folder} (series {series.description or series.uid!r})"
  dcm = dicom_series.pydicom()
  headers = [dcm.dcmread(p, stop_before_pixels=True, force=True) for p in series.files]
  frames = [f for i, ds in enumerate(headers) for f in _frames_of(ds, i, where)]
  frames = _check_positions(frames, _check_same(frames, where), where)
  _check_size(frames, where, limits)
  for ds, path in zip(headers, series.files):
    _check_decodable(ds, path, where)
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
      raise DataError(f"{where}: {path.name} is a colour image; expected a greyscale MR series")
  return SeriesVolume(series, folder, None, _affine(frames), headers, frames, where)


def read_series(*args, **kwargs) -> SeriesVolume:
  """`read_grid` (the same arguments), then `read_pixels`."""
  return read_pixels(read_grid(*args, **kwargs))


def read_pixels(grid: SeriesVolume) -> SeriesVolume:
  """``grid`` with its voxels: ``array`` [columns, rows, slices] float32, rescaled."""
  frames, paths = grid.frames, grid.series.files
  array = np.empty((len(frames), *frames[0].size), np.float32)
  by_file: dict[int, list[tuple[int, Frame]]] = {}
  for k, frame in enumerate(frames):
    by_file.setdefault(frame.file, []).append((k, frame))
  dcm = dicom_series.pydicom()
  for i, members in by_file.items():
    try:
      pixels = dcm.dcmread(paths[i], force=True).pixel_array
    except Exception as e:
      raise DataError(
        f"{grid.where}: cannot decode the pixels of {paths[i]}: {dicom_series.one_line(e)}"
      ) from e
    for k, frame in members:
      plane = pixels if pixels.ndim == 2 else pixels[frame.frame or 0]
      slope, intercept = frame.rescale
      array[k] = plane.astype(np.float64) * slope + intercept
  grid.array = np.ascontiguousarray(array.transpose(2, 1, 0))  # [columns, rows, slices]
  return grid


def on_grid(moving: SeriesVolume, fixed: SeriesVolume) -> np.ndarray:
  """``moving``'s voxels on ``fixed``'s grid (linear; 0 outside ``moving``'s field of view)."""
  matrix = np.linalg.inv(moving.affine) @ fixed.affine
  return ndimage.affine_transform(
    moving.array, matrix[:3, :3], offset=matrix[:3, 3], output_shape=fixed.shape,
    order=1, mode="constant", cval=0.0,
  )  # fmt: skip


def same_grid(a: SeriesVolume, b: SeriesVolume) -> bool:
  return a.shape == b.shape and np.abs(a.affine - b.affine).max() <= GRID_TOLERANCE


def read_pair(
  case_id: str,
  pre: Path,
  post: Path,
  pre_series: str | None = None,
  post_series: str | None = None,
  limits: InputLimits = InputLimits(),
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
  """Pre- and post-contrast series as images on the post-contrast grid.

  Series of one frame of reference on different grids: pre is resampled onto post's
  (logged); of different frames of reference (or without one), on any grid: refused (no
  registration is attempted).
  """
  pre_v = read_series(pre, pre_series, f"case {case_id}: pre-contrast", "--pre_series", limits)
  post_v = read_series(post, post_series, f"case {case_id}: post-contrast", "--post_series", limits)
  frames = pre_v.series.frame_of_reference, post_v.series.frame_of_reference
  if None in frames or frames[0] != frames[1]:
    raise DataError(
      f"case {case_id}: the pre-contrast series in {pre} and the post-contrast series in {post} "
      f"do not share a frame of reference (FrameOfReferenceUID {frames[0] or 'missing'} vs "
      f"{frames[1] or 'missing'}), so nothing says their voxels are the same places in the "
      "patient; no registration is attempted: register them first, or give series of one "
      "frame of reference"
    )
  if same_grid(pre_v, post_v):
    return pre_v.image(), post_v.image()
  logging.info(
    "case %s: pre-contrast %s resampled onto the post-contrast grid %s (one frame of reference)",
    case_id, "x".join(map(str, pre_v.shape)), "x".join(map(str, post_v.shape)),
  )  # fmt: skip
  resampled = nib.Nifti1Image(on_grid(pre_v, post_v).astype(np.float32), post_v.affine)
  return resampled, post_v.image()
