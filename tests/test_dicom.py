"""DICOM in, DICOM SEG out, on series these tests write from the phantom (tests/dicom_writer.py).

The same arrays and affine are also written as NIfTI: what is read from DICOM must be what
is read from NIfTI, and the SEG read back with highdicom must hold the NIfTI label map.
"""

import logging
import shutil
import subprocess
import sys

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import ROOT
from dicom_writer import oblique_affine, study, write_series

from resfuse_jax import data
from resfuse_jax.data import dicom
from resfuse_jax.errors import DataError, OutputError
from resfuse_jax.inference import dicom_seg, prediction
from resfuse_jax.inference.predictor import Predictor

SLOPE, INTERCEPT = 0.25, -8.0  # phantom intensities (0-2000, float): stored as int16 + rescale


@pytest.fixture(scope="module")
def scans(small_phantom):
  """(pre, post) float arrays on a 32^3 grid, as the int16 + rescale of DICOM holds them."""
  root, _ = small_phantom
  cid = sorted(p.name for p in root.iterdir() if p.is_dir())[0]
  out = []
  for kind in ("t1n", "t1c"):
    arr = np.asarray(nib.load(root / cid / f"{cid}-{kind}.nii.gz").dataobj, np.float64)
    stored = np.round((arr - INTERCEPT) / SLOPE)
    out.append((stored * SLOPE + INTERCEPT).astype(np.float32))
  return tuple(out)


@pytest.fixture(scope="module")
def series(scans, tmp_path_factory):
  """One study: single-frame and enhanced multi-frame pre/post series (oblique, anisotropic),
  and the NIfTI files of the same arrays and affine."""
  root = tmp_path_factory.mktemp("dicom")
  affine, meta = oblique_affine(), study()
  pre, post = scans
  for name, volume, number in (("pre", pre, 3), ("post", post, 5)):
    kw = {"slope": SLOPE, "intercept": INTERCEPT}
    write_series(root / "single" / name, volume, affine, meta, f"T1 {name}", number, **kw)
    write_series(root / "multi" / name, volume, affine, meta, f"T1 {name} MF", number + 10,
                 multiframe=True, **kw)  # fmt: skip
    nib.save(nib.Nifti1Image(volume, affine), root / f"{name}.nii.gz")
  return root, affine, meta


@pytest.fixture(scope="module")
def predictor(trained_workdir):
  return Predictor.load(trained_workdir, backend="jax")


@pytest.mark.parametrize("layout", ["single", "multi"])
def test_a_series_reads_back_as_the_array_and_affine_written(series, scans, layout):
  root, affine, _ = series
  volume = dicom.read_series(root / layout / "post", None, "case c: post", "--post_series")
  np.testing.assert_array_equal(volume.array, scans[1])
  np.testing.assert_allclose(volume.affine, affine, atol=1e-6)


def test_the_geometry_agrees_with_simpleitks_gdcm_series_reader(series):
  sitk = pytest.importorskip("SimpleITK")
  root, _, _ = series
  folder = str(root / "single" / "post")
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
  image = reader.Execute()
  lps = np.eye(4)
  lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.array(image.GetSpacing())
  lps[:3, 3] = image.GetOrigin()
  ours = dicom.read_series(folder, None, "case c: post", "--post_series")
  np.testing.assert_allclose(ours.affine, dicom.LPS_TO_RAS @ lps, atol=1e-4)
  np.testing.assert_allclose(
    ours.array, sitk.GetArrayFromImage(image).transpose(2, 1, 0), atol=1e-3
  )


def _labels_from_seg(path, grid):
  """The SEG at ``path`` as a label map [columns, rows, slices] on ``grid``."""
  seg = hd.seg.segread(path)
  numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
  out = np.zeros(grid.shape, np.uint8)
  if len(grid.datasets) > 1:
    uids = [ds.SOPInstanceUID for ds in grid.datasets]
    pixels = seg.get_pixels_by_source_instance(
      uids, segment_numbers=numbers, combine_segments=True, assert_missing_frames_are_empty=True
    )
    for k, frame in enumerate(grid.frames):
      out[:, :, k] = pixels[frame.file].T
  else:
    frames = list(range(1, len(grid.frames) + 1))
    pixels = seg.get_pixels_by_source_frame(
      grid.datasets[0].SOPInstanceUID,
      frames,
      segment_numbers=numbers,
      combine_segments=True,
      assert_missing_frames_are_empty=True,
    )
    for k, frame in enumerate(grid.frames):
      out[:, :, k] = pixels[frame.frame].T
  return seg, out


@pytest.mark.parametrize("layout", ["single", "multi"])
def test_the_seg_read_back_with_highdicom_maps_to_the_same_voxels(series, scans, layout, tmp_path):
  root, _, meta = series
  grid = dicom.read_grid(root / layout / "post", None, "case c: post", "--post_series")
  labels = np.zeros(grid.shape, np.uint8)  # planted: three labels, asymmetric in every axis
  labels[3:9, 4:20, 2:5], labels[10:12, 1:3, 20:30], labels[20:31, 25:28, 7] = 1, 2, 3
  names = data.get_dataset("brats").label_names
  algorithm = dicom_seg.algorithm_identification("resfuse", {"parameters_sha256": "ab" * 32})
  out = dicom_seg.write(labels, grid, names, algorithm, tmp_path / "seg.dcm")
  seg, back = _labels_from_seg(out, grid)
  np.testing.assert_array_equal(back, labels)
  assert [s.SegmentLabel for s in seg.SegmentSequence] == list(names.values())
  assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Edema"
  for key in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "AccessionNumber"):
    assert str(getattr(seg, key)) == str(meta[key])
  referenced = seg.ReferencedSeriesSequence[0]
  assert referenced.SeriesInstanceUID == grid.series.uid
  assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {
    ds.SOPInstanceUID for ds in grid.datasets
  }


def test_predictions_from_dicom_agree_with_predictions_from_nifti(series, predictor, tmp_path):
  root, affine, _ = series
  nifti = data.CaseFiles("c", root / "pre.nii.gz", root / "post.nii.gz", None)
  prediction.predict_case(predictor, nifti, tmp_path / "nifti.nii.gz", write_probs=True)
  reference = np.asarray(nib.load(tmp_path / "nifti.nii.gz").dataobj)
  ref_probs = np.asarray(nib.load(tmp_path / "nifti_probabilities.nii.gz").dataobj)
  for layout in ("single", "multi"):
    case = data.CaseFiles("c", root / layout / "pre", root / layout / "post", None)
    out = tmp_path / f"{layout}.nii.gz"
    prediction.predict_case(predictor, case, out, write_probs=True, seg=True)
    image = nib.load(out)
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)  # post's grid
    labels = np.asarray(image.dataobj)
    assert np.mean(labels == reference) >= 0.999
    probs = np.asarray(nib.load(tmp_path / f"{layout}_probabilities.nii.gz").dataobj)
    assert np.abs(probs - ref_probs).max() < 1e-3
    grid = dicom.read_grid(root / layout / "post", None, "case c: post", "--post_series")
    seg, back = _labels_from_seg(tmp_path / f"{layout}.dcm", grid)
    np.testing.assert_array_equal(back, labels)
    parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert predictor.parameters_sha256() in parameters.AlgorithmParameters


def test_pre_on_another_grid_of_one_frame_of_reference_is_resampled_onto_post(
  series, scans, tmp_path, caplog
):
  _, affine, meta = series
  pre, post = scans
  shifted = affine.copy()  # pre: 3 columns and 2 slices further on, and 4 slices fewer
  shifted[:3, 3] = affine[:3, :3] @ [3, 0, 2] + affine[:3, 3]
  write_series(tmp_path / "pre", pre[3:, :, 2:-4], shifted, meta, "T1 pre", 3, SLOPE, INTERCEPT)
  write_series(tmp_path / "post", post, affine, meta, "T1 post", 5, SLOPE, INTERCEPT)
  with caplog.at_level(logging.INFO):
    pre_img, post_img = dicom.read_pair("c", tmp_path / "pre", tmp_path / "post")
  assert sum("resampled onto the post-contrast grid" in r.message for r in caplog.records) == 1
  np.testing.assert_allclose(pre_img.affine, post_img.affine)
  on_post = np.asarray(pre_img.dataobj)
  assert on_post.shape == post.shape
  np.testing.assert_allclose(on_post[3:, :, 2:-4], pre[3:, :, 2:-4], atol=1e-4)  # integer shift
  assert not on_post[:3].any() and not on_post[:, :, -4:].any()  # outside pre's field of view


def test_a_pair_in_different_frames_of_reference_on_other_grids_is_refused(series, scans, tmp_path):
  _, affine, meta = series
  write_series(tmp_path / "pre", scans[0][:, :, :30], affine, study(), "T1 pre", 3)
  write_series(tmp_path / "post", scans[1], affine, meta, "T1 post", 5)
  with pytest.raises(DataError, match="do not share a frame of reference.*no registration"):
    dicom.read_pair("c", tmp_path / "pre", tmp_path / "post")


def _plant(tmp_path, scans, edit, **kw):
  folder = tmp_path / "bad"
  write_series(folder, scans[1], oblique_affine(), study(), "T1 post", 5, edit=edit, **kw)
  return folder


def _moved(k, ds, shift):
  ds.ImagePositionPatient = [f"{float(v) + s:.8f}" for v, s in zip(ds.ImagePositionPatient, shift)]
  return ds


def _along_normal(ds, mm):
  cosines = np.array(ds.ImageOrientationPatient, float)
  return _moved(0, ds, mm * np.cross(cosines[:3], cosines[3:]))


def _in_plane(ds, mm):
  return _moved(0, ds, mm * np.array(ds.ImageOrientationPatient[:3], float))


def _sized(ds, rows):
  ds.Rows = rows
  return ds


PLANTED = {
  "missing slices": (lambda k, ds: None if k == 12 else ds, "missing slices: a gap"),
  "non-uniform": (
    lambda k, ds: _along_normal(ds, 0.1) if k >= 20 else ds,  # every step 2 mm; one 2.1
    "non-uniform slice spacing",
  ),
  "shear": (lambda k, ds: _in_plane(ds, 0.5) if k == 9 else ds, "gantry tilt or shear"),
  "mixed rows": (lambda k, ds: _sized(ds, 31) if k == 3 else ds, "mixed slice sizes"),
  "gantry tilt": (lambda k, ds: _moved(k, ds, [0.2 * k, 0.2 * k, 0]), "gantry tilt or shear"),
  "mixed orientations": (
    lambda k, ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]) or ds
    if k == 5 else ds,
    "mixed orientations",
  ),
  "mixed sizes": (
    lambda k, ds: setattr(ds, "PixelSpacing", [0.5, 0.5]) or ds if k == 7 else ds,
    "mixed slice sizes",
  ),
}  # fmt: skip


@pytest.mark.parametrize("defect", sorted(PLANTED))
def test_a_series_that_is_not_one_regular_grid_is_refused(scans, tmp_path, defect):
  edit, message = PLANTED[defect]
  folder = _plant(tmp_path, scans, edit)
  with pytest.raises(DataError, match=message) as info:
    dicom.read_series(folder, None, "case c: post-contrast", "--post_series")
  assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_a_compressed_series_names_the_plug_in_that_would_read_it(scans, tmp_path, monkeypatch):
  from pydicom.pixels import get_decoder

  def compressed(k, ds):
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
    return ds

  folder = _plant(tmp_path, scans, compressed)
  decoder = get_decoder(pydicom.uid.JPEGLosslessSV1)
  monkeypatch.setattr(decoder, "_available", {})  # as on a machine without the plug-ins
  monkeypatch.setattr(
    decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")}
  )
  with pytest.raises(DataError, match="JPEG Lossless.*no installed decoder.*pylibjpeg-libjpeg"):
    dicom.read_series(folder, None, "case c: post-contrast", "--post_series")
  for path in folder.iterdir():  # a syntax pydicom has no decoder for at all
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.save_as(path)
  with pytest.raises(DataError, match="MPEG2.*no decoder"):
    dicom.read_series(folder, None, "case c: post-contrast", "--post_series")


def test_a_folder_of_several_series_lists_them_and_a_selector_chooses(series, tmp_path):
  root, _, _ = series
  both = tmp_path / "study"
  shutil.copytree(root / "single" / "pre", both / "a")
  shutil.copytree(root / "single" / "post", both / "b")
  with pytest.raises(
    DataError, match=r"holds 2 DICOM series; choose one with --pre_series=.*'T1 pre'.*'T1 post'"
  ):
    dicom.read_grid(both, None, "case c: pre-contrast", "--pre_series")
  assert dicom.read_grid(both, "T1 post", "c", "--post_series").series.description == "T1 post"
  assert dicom.read_grid(both, "*pre", "c", "--pre_series").series.description == "T1 pre"
  assert dicom.read_grid(both, "t1 POST", "c", "--post_series").series.description == "T1 post"
  with pytest.raises(DataError, match="--pre_series='T2' matches no series"):
    dicom.read_grid(both, "T2", "case c: pre-contrast", "--pre_series")


def test_a_dicom_pre_with_a_nifti_post_is_refused(series):
  root, _, _ = series
  case = data.CaseFiles("c", root / "single" / "pre", root / "post.nii.gz", None)
  with pytest.raises(DataError, match="is a DICOM folder but .* a file"):
    data.preprocess_case(case, (0, 1, 2, 3), training=False)


def test_a_seg_of_nifti_inputs_and_outputs_into_a_series_folder_are_refused(
  series, trained_workdir
):
  root, _, _ = series
  nifti = (str(root / "pre.nii.gz"), str(root / "post.nii.gz"), str(root / "x" / "seg.dcm"))
  with pytest.raises(OutputError, match="references DICOM source images"):
    prediction.check_outputs(str(trained_workdir), None, nifti)
  inside = (str(root / "single" / "pre"), str(root / "single" / "post"),
            str(root / "single" / "post" / "seg.nii.gz"))  # fmt: skip
  with pytest.raises(OutputError, match="refusing to write over"):
    prediction.check_outputs(str(trained_workdir), None, inside, seg=True)


def test_predict_takes_a_folder_of_studies_and_writes_a_seg_per_case(
  series, trained_workdir, tmp_path
):
  root, _, _ = series
  studies = tmp_path / "studies"
  for case in ("case-1", "case-2"):
    shutil.copytree(root / "multi" / "pre", studies / case / "series3")
    shutil.copytree(root / "multi" / "post", studies / case / "series5")
  out = tmp_path / "out"
  cmd = [
    sys.executable, "-m", "resfuse_jax.predict", f"--workdir={trained_workdir}", "--backend=jax",
    f"--input={studies}", f"--output={out}", "--pre_series=T1 pre*", "--post_series=T1 post*",
    "--dicom_seg",
  ]  # fmt: skip
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in out.iterdir()) == [
    "case-1.dcm", "case-1.nii.gz", "case-2.dcm", "case-2.nii.gz"
  ]  # fmt: skip
  grid = dicom.read_grid(studies / "case-1", "T1 post*", "c", "--post_series")
  _, back = _labels_from_seg(out / "case-1.dcm", grid)
  np.testing.assert_array_equal(back, np.asarray(nib.load(out / "case-1.nii.gz").dataobj))


def test_a_manifest_and_the_brats_layout_take_series_folders(series, scans, tmp_path):
  root, _, _ = series
  study_folder = tmp_path / "study"
  shutil.copytree(root / "single" / "pre", study_folder / "3")
  shutil.copytree(root / "single" / "post", study_folder / "5")
  manifest = tmp_path / "cases.csv"
  manifest.write_text(
    "case_id,pre,post,label,pre_series,post_series\n"
    "a,study,study,,T1 pre,T1 post\n"  # one study folder; the columns choose the series
    f"b,{root / 'multi' / 'pre'},{root / 'multi' / 'post'},,,\n"
  )
  cases = data.find_input_cases(manifest, None)
  assert [(c.pre_series, c.post_series) for c in cases] == [("T1 pre", "T1 post"), (None, None)]
  for case in cases:
    read = data.preprocess_case(case, (0, 1, 2, 3), training=False)
    assert read.shape == scans[1].shape
  brats = tmp_path / "brats" / "BraTS-GLI-00001-000"
  shutil.copytree(root / "single" / "pre", brats / "BraTS-GLI-00001-000-t1n")
  shutil.copytree(root / "single" / "post", brats / "BraTS-GLI-00001-000-t1c")
  (case,) = data.find_input_cases(brats.parent, _brats_config())
  assert case.problem is None and case.pre.is_dir() and case.post.is_dir()


def _brats_config():
  import ml_collections

  return ml_collections.ConfigDict({"name": "brats"})


def test_a_series_over_the_input_limits_is_refused_before_its_pixels_are_read(series):
  root, _, _ = series
  limits = data.InputLimits(max_voxels=1000)
  with pytest.raises(DataError, match=r"32x32x32 voxels .* over data.max_voxels=1000"):
    dicom.read_series(root / "single" / "post", None, "case c: post", "--post_series", limits)


def test_an_ensembles_seg_records_each_folds_parameter_digest(
  cross_validation_workdir, series, tmp_path
):
  from resfuse_jax.inference.ensemble import EnsemblePredictor

  workdir, _ = cross_validation_workdir
  root, _, _ = series
  ensemble = EnsemblePredictor.load(workdir, backend="jax")
  case = data.CaseFiles("c", root / "single" / "pre", root / "single" / "post", None)
  prediction.predict_case(ensemble, case, tmp_path / "seg.dcm")
  seg = hd.seg.segread(tmp_path / "seg.dcm")
  parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
  for k, member in zip(ensemble.folds, ensemble.members):
    assert f"fold_{k}_parameters_sha256={member.parameters_sha256()}" in (
      parameters.AlgorithmParameters.split(",")
    )
  assert len(set(m.parameters_sha256() for m in ensemble.members)) == 2
  assert not (tmp_path / "seg.nii.gz").exists()  # a .dcm out is the label map itself


def test_a_manifest_models_segments_are_named_by_its_config():
  from resfuse_jax import config_lib, workdir

  config = config_lib.load("manifest")
  manifest = data.get_dataset("manifest")
  assert dicom_seg.label_names(manifest, config.data) == {1: "lesion"}
  config.data.label_names = "enhancing mass"
  assert dicom_seg.label_names(manifest, config.data) == {1: "enhancing mass"}
  config.data.label_names = "mass, cyst"
  with pytest.raises(OutputError, match="names 2 labels; the model predicts \\[1\\]"):
    dicom_seg.label_names(manifest, config.data)
  old = config.to_dict()
  del old["data"]["label_names"]  # a workdir written before the key existed
  filled = config_lib.fill_defaults(old, workdir.ADDED_LATER)
  assert dicom_seg.label_names(manifest, filled.data) == {1: "lesion"}


@pytest.mark.parametrize("decimals", [2, 3])
@pytest.mark.parametrize("thickness", [0.5, 1.0, 3.0])
def test_scanner_rounded_positions_of_an_oblique_stack_are_not_refused(
  scans, tmp_path, decimals, thickness
):
  rng = np.random.default_rng(int(thickness * 10) + decimals)
  for plan in range(4):  # random oblique plans, as a scanner's console writes them
    affine = oblique_affine((0.9, 0.9, thickness), rng.uniform(-40, 40, 3), rng.uniform(-90, 90, 3))
    folder = tmp_path / f"{plan}"
    write_series(folder, scans[1], affine, study(), "T1 post", 5, decimals=decimals)
    grid = dicom.read_grid(folder, None, "case c: post", "--post_series")
    np.testing.assert_allclose(grid.affine, affine, atol=10.0**-decimals * 2)


def test_resampling_onto_a_rotated_grid_of_other_spacing_is_linear_in_world_space(tmp_path):
  meta = study()
  post_affine = oblique_affine((1.0, 1.1, 1.7), (5.0, -3.0, 10.0), (-20, 10, -15))
  pre_affine = oblique_affine((0.8, 0.8, 1.2), (-6.0, 4.0, 25.0), (-25, 5, -20))
  field = np.array(
    [0.7, -0.4, 1.3]
  )  # a linear field of world position: linear interpolation is exact

  def world(affine, shape):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]

  pre = (world(pre_affine, (40, 40, 36)) @ field + 200).astype(np.float32)
  write_series(tmp_path / "pre", pre, pre_affine, meta, "T1 pre", 3, slope=0.01)
  write_series(tmp_path / "post", np.full((24, 24, 16), 100.0), post_affine, meta, "T1 post", 5)
  pre_img, _ = dicom.read_pair("c", tmp_path / "pre", tmp_path / "post")
  on_post = np.asarray(pre_img.dataobj)
  expected = world(post_affine, (24, 24, 16)) @ field + 200
  inside = on_post != 0  # pre's field of view covers most, not all, of post's grid
  assert inside.mean() > 0.5
  np.testing.assert_allclose(on_post[inside], expected[inside], atol=0.02)


def test_a_pair_on_one_grid_in_different_frames_of_reference_is_refused(series, scans, tmp_path):
  _, affine, meta = series
  write_series(tmp_path / "pre", scans[0], affine, study(), "T1 pre", 3)  # another study
  write_series(tmp_path / "post", scans[1], affine, meta, "T1 post", 5)
  with pytest.raises(DataError, match="do not share a frame of reference"):
    dicom.read_pair("c", tmp_path / "pre", tmp_path / "post")


def test_a_seg_of_an_anonymised_series_is_written(scans, tmp_path):
  removed = ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "ReferringPhysicianName",
             "PatientName", "PatientID", "StudyDate", "StudyTime")  # fmt: skip

  def anonymise(k, ds):
    for key in removed:
      delattr(ds, key)
    return ds

  folder = _plant(tmp_path, scans, anonymise)
  grid = dicom.read_grid(folder, None, "case c: post", "--post_series")
  labels = np.zeros(grid.shape, np.uint8)
  labels[4:9, 5:7, 3:6] = 1
  algorithm = dicom_seg.algorithm_identification("resfuse", {"parameters_sha256": "0" * 64})
  out = dicom_seg.write(labels, grid, {1: "lesion"}, algorithm, tmp_path / "seg.dcm")
  seg, back = _labels_from_seg(out, grid)
  np.testing.assert_array_equal(back, labels)
  assert seg.PatientID == "" and "PatientID" not in grid.datasets[0]  # the source untouched


def test_a_series_that_cannot_take_a_seg_is_refused_before_the_model_runs(
  scans, predictor, tmp_path, monkeypatch
):
  def no_frame_of_reference(k, ds):
    del ds.FrameOfReferenceUID
    return ds

  folder = _plant(tmp_path, scans, no_frame_of_reference)
  monkeypatch.setattr(predictor, "probabilities", lambda *a: pytest.fail("the model ran"))
  case = data.CaseFiles("c", folder, folder, None)
  with pytest.raises(DataError, match="lack FrameOfReferenceUID; a SEG cannot reference them"):
    prediction.predict_case(predictor, case, tmp_path / "out" / "seg.nii.gz", seg=True)
  assert not (tmp_path / "out").exists()


def test_files_without_the_dicom_preamble_are_read_and_other_files_passed_over(series, tmp_path):
  root, _, _ = series
  folder = tmp_path / "post"
  shutil.copytree(root / "single" / "post", folder)
  for path in sorted(folder.iterdir())[:3]:  # an older export: no 128-byte preamble, no DICM
    path.write_bytes(path.read_bytes()[132:])
  (folder / "README.txt").write_text("exported by a PACS\n")
  grid = dicom.read_series(folder, None, "case c: post", "--post_series")
  assert grid.shape == (32, 32, 32)
