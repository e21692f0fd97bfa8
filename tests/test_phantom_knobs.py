"""The phantom's acquisition knobs: off reproduces the phantom exactly; on, each does what it says."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from conftest import ROOT
from scipy import ndimage
from scipy.spatial.transform import Rotation

from resfuse_jax import config_lib
from resfuse_jax.data import datasets, phantom, phantom_acquisition
from resfuse_jax.errors import DataError

BASE = phantom.PhantomSpec(num_cases=4, shape=(32, 32, 32), seed=3)
# sha256 over make_case(PhantomSpec(num_cases=2, shape=(32,)*3, seed=3), i) (sorted keys, raw
# bytes), computed with the phantom as it was before the knobs existed (numpy 2.4, scipy 1.17).
BEFORE_KNOBS = {
  0: "44ba4911fef33137261e147509142f841e5d134d8e512e75ebb5804650ade54f",
  1: "0c84aaaadeacbec80178fce2debb3416d4ac9c24eca0d40a39ca3b0f4e6db805",
}
ON = {
  "misregistration_mm": 3.0,
  "misregistration_deg": 5.0,
  "deformation_mm": 2.0,
  "pre_noise": 0.05,
  "post_noise": 0.05,
  "pre_bias": 0.2,
  "pre_slice_mm": 4.5,
  "enhancement_amplitude": 0.3,
  "enhancement_timing": 0.3,
}


def digest(case: dict) -> str:
  h = hashlib.sha256()
  for key in sorted(case):
    h.update(key.encode())
    h.update(np.ascontiguousarray(case[key]).tobytes())
  return h.hexdigest()


@pytest.fixture(scope="module")
def base_cases():
  return [phantom.make_case(BASE, i) for i in range(BASE.num_cases)]


def with_knob(**knobs):
  return dataclasses.replace(BASE, **knobs)


def brain(case):
  return case["t1c"] > 0


def test_knobs_off_reproduce_the_phantom_from_before_the_knobs_byte_for_byte():
  spec = phantom.PhantomSpec(num_cases=2, shape=(32, 32, 32), seed=3)
  explicit_zeros = dataclasses.replace(spec, **{k: 0.0 for k in phantom.KNOBS})
  for index, expected in BEFORE_KNOBS.items():
    assert digest(phantom.make_case(spec, index)) == expected
    assert digest(phantom.make_case(explicit_zeros, index)) == expected
  assert set(ON) == set(phantom.KNOBS)  # every knob is exercised below


@pytest.mark.parametrize("knob", sorted(ON))
def test_each_knob_changes_only_the_scan_it_is_about(knob, base_cases):
  case = phantom.make_case(with_knob(**{knob: ON[knob]}), 0)
  base = base_cases[0]
  np.testing.assert_array_equal(case["seg"], base["seg"])  # labels stay on post's grid
  for name in ("t2w", "t2f"):
    np.testing.assert_array_equal(case[name], base[name])
  changes_post = knob in ("post_noise", "enhancement_amplitude", "enhancement_timing")
  assert not np.array_equal(
    case["t1c" if changes_post else "t1n"], base["t1c" if changes_post else "t1n"]
  )
  if not changes_post:
    np.testing.assert_array_equal(case["t1c"], base["t1c"])
  if knob.startswith(("post_", "enhancement_")):
    np.testing.assert_array_equal(case["t1n"], base["t1n"])


def test_cache_folder_and_marker_are_unchanged_with_knobs_off_and_name_the_knobs_when_on(tmp_path):
  config = config_lib.load(f"{ROOT}/configs/phantom.py")
  off = datasets.phantom_root(config.data)
  assert off.name == "phantom-seed0-n40-48x48x48"
  assert "acquisition" not in datasets.phantom_spec(config.data).key()
  config.data.misregistration_mm = 2.25
  config.data.pre_noise = 0.05
  on = datasets.phantom_root(config.data)
  assert on.name == "phantom-seed0-n40-48x48x48-misregistration_mm2.25-pre_noise0.05"
  spec = dataclasses.replace(BASE, num_cases=2, misregistration_mm=3.0)
  assert spec.key()["acquisition"] == {"misregistration_mm": 3.0}
  phantom.write_phantom(tmp_path / "p", spec)
  drawn = json.loads((tmp_path / "p" / phantom.ACQUISITION).read_text())
  assert drawn[phantom.case_id(1)] == phantom.acquisition(spec, 1)
  with pytest.raises(DataError, match="different spec"):  # the knob is part of the identity
    phantom.write_phantom(tmp_path / "p", dataclasses.replace(spec, misregistration_mm=1.0))


def test_negative_or_out_of_range_knobs_are_refused():
  with pytest.raises(DataError, match="data.pre_noise must be >= 0"):
    with_knob(pre_noise=-0.1)
  with pytest.raises(DataError, match="enhancement_timing must be at most 1"):
    with_knob(enhancement_timing=1.5)


def test_translation_moves_the_pre_scans_centre_of_mass_by_the_drawn_millimetres(base_cases):
  spec = with_knob(misregistration_mm=4.5)
  checked = 0
  for index, base in enumerate(base_cases):
    shift = np.asarray(phantom.acquisition(spec, index)["translation_mm"])
    assert np.linalg.norm(shift) <= 4.5
    box = np.argwhere(brain(base))
    margin = np.minimum(box.min(0), np.array(BASE.shape) - 1 - box.max(0))
    if np.any(np.abs(shift) / BASE.spacing >= margin):
      continue  # the move would push the head out of the field of view
    moved = phantom.make_case(spec, index)
    # Linear resampling keeps an image's first moments; only the scanner's bias field and
    # noise, which did not move, pull the centre off by a few hundredths of a millimetre.
    before = np.array(ndimage.center_of_mass(base["t1n"]))
    after = np.array(ndimage.center_of_mass(moved["t1n"]))
    np.testing.assert_allclose((after - before) * BASE.spacing, shift, atol=0.1)
    np.testing.assert_array_equal(moved["t1c"], base["t1c"])  # post did not move
    checked += 1
  assert checked >= 2


def test_rotation_turns_the_pre_scan_about_the_volume_centre(base_cases):
  spec = with_knob(misregistration_deg=8.0)
  index = 2  # a head with a margin all round
  drawn = phantom.acquisition(spec, index)
  assert abs(drawn["rotation_deg"]) > 3 and np.allclose(drawn["translation_mm"], 0)
  moved = phantom.make_case(spec, index)
  rotation = Rotation.from_rotvec(
    np.radians(drawn["rotation_deg"]) * np.asarray(drawn["rotation_axis"])
  ).as_matrix()
  centre = (np.array(BASE.shape) - 1) / 2
  before = np.array(ndimage.center_of_mass(base_cases[index]["t1n"]))
  after = np.array(ndimage.center_of_mass(moved["t1n"]))
  np.testing.assert_allclose(after, centre + rotation @ (before - centre), atol=0.1)
  assert np.linalg.norm(after - before) > 0.2  # a real move, not the tolerance


def test_deformation_is_smooth_and_bounded_by_its_maximum():
  spec = with_knob(deformation_mm=3.0)
  points = phantom_acquisition.pre_sample_points(spec, 0, phantom.acquisition(spec, 0))
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in BASE.shape], indexing="ij"))
  displacement = np.linalg.norm(points - grid, axis=0) * BASE.spacing
  assert displacement.max() == pytest.approx(3.0)
  assert np.abs(np.diff(points - grid, axis=1)).max() < 0.5  # smooth: neighbours move alike


def test_noise_knobs_lower_the_measured_snr_of_their_scan_only(base_cases):
  base = base_cases[1]
  inside = ndimage.binary_erosion(brain(base), iterations=2)

  def snr(img, reference):  # the added noise's std from the difference with the knob off
    return img[inside].mean() / (img - reference)[inside].std()

  for knob, scan in (("pre_noise", "t1n"), ("post_noise", "t1c")):
    for std in (0.05, 0.1):
      noisy = phantom.make_case(with_knob(**{knob: std}), 1)[scan]
      added = (noisy - base[scan])[inside].std()
      assert added == pytest.approx(std * 1000, rel=0.05)
  assert snr(phantom.make_case(with_knob(pre_noise=0.1), 1)["t1n"], base["t1n"]) < snr(
    phantom.make_case(with_knob(pre_noise=0.05), 1)["t1n"], base["t1n"]
  )


def test_pre_bias_field_is_smooth_and_grows_with_its_strength(base_cases):
  base = base_cases[0]
  inside = ndimage.binary_erosion(brain(base), iterations=2) & (base["t1n"] > 300)

  def log_field(strength):  # noise is shared and small, so the ratio is pre's own field
    biased = phantom.make_case(with_knob(pre_bias=strength), 0)["t1n"]
    return np.log(np.maximum(biased, 1) / np.maximum(base["t1n"], 1))

  weak, strong = log_field(0.1), log_field(0.2)
  assert np.std(weak[inside]) > 0.03
  assert np.std(strong[inside]) == pytest.approx(2 * np.std(weak[inside]), rel=0.1)
  # Smooth: between neighbouring voxels the field changes far less than across the head.
  step = np.abs(np.diff(strong, axis=0))[inside[1:] & inside[:-1]]
  assert np.median(step) < 0.1 * np.ptp(strong[inside])


def test_coarse_pre_slices_remove_high_frequencies_along_z_only(base_cases):
  base = base_cases[0]["t1n"]
  coarse = phantom.make_case(with_knob(pre_slice_mm=4.5), 0)["t1n"]  # 3 fine slices per slice

  def high_energy(img, axis):  # energy above a third of Nyquist along ``axis``
    spectrum = np.abs(np.fft.rfft(img, axis=axis)) ** 2
    cut = spectrum.shape[axis] // 3
    return np.take(spectrum, np.arange(cut, spectrum.shape[axis]), axis=axis).sum()

  along_z = high_energy(coarse, 2) / high_energy(base, 2)
  in_plane = high_energy(coarse, 0) / high_energy(base, 0)  # lower only by averaged noise
  assert along_z < 0.1 and along_z < 0.25 * in_plane


def test_enhancement_gain_and_timing_scale_tumour_and_vessels_apart(base_cases):
  spec = with_knob(enhancement_amplitude=0.3, enhancement_timing=0.3)
  for index in range(BASE.num_cases):
    base = base_cases[index]
    varied = phantom.make_case(spec, index)
    drawn = phantom.acquisition(spec, index)
    et = base["seg"] == 3
    if not et.any():
      continue  # a non-enhancing tumour
    expected = drawn["enhancement_gain"] * (1 + drawn["enhancement_timing"])
    # post's gain and noise are unchanged, so the ratio of the mean enhancements is close
    ratio = (varied["t1c"] - varied["t1n"])[et].mean() / (base["t1c"] - base["t1n"])[et].mean()
    assert ratio == pytest.approx(expected, rel=0.1)
    return
  pytest.fail("no case with enhancing tumour")


def test_a_workdir_written_before_the_knobs_resumes_but_a_knob_change_is_refused():
  from resfuse_jax import workdir

  config = config_lib.load(f"{ROOT}/configs/phantom.py:smoke")
  saved = json.loads(json.dumps(config.to_dict()))
  for knob in phantom.KNOBS:
    del saved["data"][knob]  # a config.json from before the knobs existed
  assert workdir.resume_conflicts(saved, config) == []
  config.data.pre_slice_mm = 4.5
  assert workdir.resume_conflicts(saved, config) == ["data.pre_slice_mm: 0.0 -> 4.5"]
