"""A label map as a DICOM Segmentation object that a PACS viewer overlays on the source.

One binary segment per label value (BraTS: necrotic core, oedema, enhancing tumour;
breast and manifest data: lesion), coded from the SNOMED CT table that pydicom and
highdicom ship, marked as made by an automatic algorithm whose identification records
the package version and the SHA-256 of the parameters used (one per fold for an
ensemble). The SEG references the post-contrast series' instances as its source images
and lies in their frame of reference; highdicom copies the patient and study attributes
from them, so the archive files it under the same study. highdicom comes with the
``dicom`` extra.
"""

from __future__ import annotations

import copy
from importlib import metadata
from pathlib import Path

import numpy as np

from resfuse_jax import files
from resfuse_jax.data import dicom
from resfuse_jax.data.dicom_series import EXTRA
from resfuse_jax.errors import DataError, OutputError

SUFFIX = ".dcm"


def version() -> str:
  try:
    return metadata.version("resfuse-jax")
  except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    return "unknown"


MANUFACTURER = "resfuse_jax"

# label name -> SNOMED CT segmented property type (category: morphologically abnormal structure)
TYPES = {
  "necrotic tumour core": "Necrosis",
  "peritumoral oedema": "Edema",
  "enhancing tumour": "Neoplasm",
  "lesion": "Lesion",
}


def highdicom():
  try:
    import highdicom as module
  except ImportError:
    raise OutputError(f"writing a DICOM SEG needs highdicom: {EXTRA}") from None
  return module


def is_seg_path(path: str | Path) -> bool:
  return Path(path).name.lower().endswith(SUFFIX)


def label_names(dataset, data_config) -> dict[int, str]:
  """Label value -> name: the dataset's, or a manifest config's ``data.label_names``
  (comma-separated, for labels 1, 2, ...)."""
  given = data_config.get("label_names") if hasattr(data_config, "get") else None
  if not given:
    return dict(dataset.label_names)
  names = [n.strip() for n in str(given).split(",")]
  values = [v for v in dataset.label_values if v]
  if len(names) != len(values) or not all(names):
    raise OutputError(
      f"data.label_names={given!r} names {len(names)} labels; the model predicts {values}"
    )
  return dict(zip(values, names))


def segment_descriptions(names: dict[int, str], algorithm) -> list:
  from pydicom.sr.codedict import codes

  hd = highdicom()
  out = []
  for number, name in sorted(names.items()):
    out.append(
      hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=getattr(codes.SCT, TYPES.get(name, "Lesion")),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
      )
    )
  return out


def algorithm_identification(model_name: str, parameter_digests: dict[str, str]):
  """Name, version and the parameters' digests (``parameters_sha256`` for one model,
  ``fold_<k>_parameters_sha256`` per fold of an ensemble)."""
  from pydicom.sr.codedict import codes

  return highdicom().AlgorithmIdentificationSequence(
    name=f"resfuse_jax {model_name}",
    family=codes.cid7162.ArtificialIntelligence,
    version=version(),
    parameters=parameter_digests,
  )


def frames_for(labels: np.ndarray, grid: dicom.SeriesVolume) -> np.ndarray:
  """[columns, rows, slices] labels -> [frames, rows, columns] in the source's frame order:
  single-frame sources in ``grid.datasets`` order, a multi-frame source in its frame order."""
  if labels.shape != grid.shape:
    raise DataError(f"{grid.where}: the label map is {labels.shape}, the series' grid {grid.shape}")
  by_slice = labels.transpose(2, 1, 0)  # [slices, rows, columns]
  if len(grid.datasets) == 1 and grid.frames[0].frame is not None:
    out = np.zeros_like(by_slice)
    for k, frame in enumerate(grid.frames):
      out[frame.frame] = by_slice[k]
    return out
  return by_slice[np.argsort([f.file for f in grid.frames])]  # one file per slice


# Type 2 attributes (present, possibly empty) of the patient and study modules that highdicom
# copies from the source; anonymisers often delete them instead of emptying them.
TYPE2 = (
  "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
  "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def source_images(grid: dicom.SeriesVolume) -> list:
  """Copies of the source datasets, in the order `frames_for` lays the frames out, with
  deleted Type 2 attributes restored empty. Checked before the model runs (`prepare`)."""
  if len(grid.datasets) > 1 and len(grid.datasets) != len(grid.frames):
    raise DataError(
      f"{grid.where}: {len(grid.datasets)} multi-frame instances in one series; a SEG is "
      "written for a series of single-frame instances or one multi-frame instance"
    )
  out = []
  for ds in grid.datasets:
    missing = [key for key in (*REQUIRED, "FrameOfReferenceUID") if not ds.get(key)]
    if missing:
      raise DataError(
        f"{grid.where}: its instances lack {', '.join(missing)}; a SEG cannot reference them"
      )
    ds = copy.deepcopy(ds)
    for key in TYPE2:
      if key not in ds:
        setattr(ds, key, "")
    out.append(ds)
  return out


def require_dicom_post(case_files, what: str) -> None:
  """A SEG references the post-contrast series' instances: a NIfTI input has none."""
  if not Path(case_files.post).is_dir():
    raise OutputError(
      f"{what}: a DICOM SEG references DICOM source images, but case {case_files.case_id}'s "
      f"post-contrast scan {case_files.post} is a NIfTI file; write NIfTI (.nii.gz) instead"
    )


def prepare(case_files, out: Path) -> dicom.SeriesVolume:
  """The post-contrast series' grid, checked to take a SEG, before any inference: a series
  that cannot is a bad case (``DataError``) before the model spends time on it."""
  require_dicom_post(case_files, str(out))
  what = f"case {case_files.case_id}: post-contrast"
  grid = dicom.read_grid(case_files.post, case_files.post_series, what, "--post_series")
  source_images(grid)
  return grid


def write(
  labels: np.ndarray,
  grid: dicom.SeriesVolume,
  names: dict[int, str],
  algorithm,
  out: Path,
  series_number: int = 9901,
) -> Path:
  """Writes ``labels`` ([columns, rows, slices] on ``grid``, the post-contrast series) as a
  binary DICOM SEG at ``out`` (atomically)."""
  hd = highdicom()
  unknown = sorted(set(np.unique(labels).tolist()) - {0, *names})
  if unknown:
    raise OutputError(f"{out}: label values {unknown} have no segment ({sorted(names)})")
  sources = source_images(grid)
  seg = hd.seg.Segmentation(
    source_images=sources,
    pixel_array=frames_for(labels.astype(np.uint8), grid),
    segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
    segment_descriptions=segment_descriptions(names, algorithm),
    series_instance_uid=hd.UID(),
    series_number=series_number,
    sop_instance_uid=hd.UID(),
    instance_number=1,
    manufacturer=MANUFACTURER,
    manufacturer_model_name=algorithm[0].AlgorithmName[:64],
    software_versions=version(),
    device_serial_number="none",
    series_description=f"Segmentation: {sources[0].get('SeriesDescription', '')}"[:64],
    omit_empty_frames=bool(labels.any()),  # an empty map keeps its frames (highdicom)
  )
  with files.atomic_path(out) as tmp:
    seg.save_as(tmp)
  return out


def write_case_seg(predictor, grid: dicom.SeriesVolume, labels: np.ndarray, out: Path) -> Path:
  """The SEG of one predicted case: ``labels`` [columns, rows, slices] on ``grid``, the
  post-contrast series (`prepare`)."""
  names = label_names(predictor.dataset, predictor.config.data)
  algorithm = algorithm_identification(predictor.config.model.name, predictor.parameter_digests())
  return write(labels, grid, names, algorithm, out)
