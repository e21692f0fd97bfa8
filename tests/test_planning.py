"""The planner: fingerprint, nnU-Net's rules, the measured search, plans applied to configs.

Synthetic anisotropic manifests (0.8 x 0.8 x 4 mm scans of 96 x 96 x 24 voxels, the
slice axis last in canonical order). The search's logic runs against a fake measurer
(memory and time linear in voxels); one test compiles the real step (XLA's analysis).
"""

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT

from resfuse_jax import config_lib, data
from resfuse_jax.planning import fingerprint, memory, planner, rules, search

SPACING = (0.8, 0.8, 4.0)
SHAPE = (96, 96, 24)


def write_dataset(root, n=3, spacing=SPACING, shape=SHAPE):
  """A manifest of ``n`` cases with a head box, a lesion, and the given voxel spacing."""
  root.mkdir(parents=True, exist_ok=True)
  affine = np.diag([*spacing, 1.0])
  lines = ["case_id,pre,post,label"]
  for i in range(n):
    rng = np.random.default_rng(i)
    pre = np.zeros(shape, np.float32)
    inner = tuple(slice(2, s - 2) for s in shape)
    pre[inner] = rng.uniform(100, 200, tuple(s - 4 for s in shape))
    label = np.zeros(shape, np.uint8)
    label[40:56, 40:56, 10:14] = 1
    for kind, arr in (("pre", pre), ("post", pre + 100 * label), ("label", label)):
      nib.save(nib.Nifti1Image(arr, affine), str(root / f"c{i}_{kind}.nii.gz"))
    lines.append(f"c{i},c{i}_pre.nii.gz,c{i}_post.nii.gz,c{i}_label.nii.gz")
  (root / "cases.csv").write_text("\n".join(lines) + "\n")
  return root / "cases.csv"


def config_for(csv, tmp_path, **overrides):
  return config_lib.load(
    f"{ROOT / 'configs' / 'manifest.py'}:resfuse",
    {
      "data.manifest": str(csv),
      "data.cache_dir": str(tmp_path / "cache"),
      "data.preprocess_workers": 1,
      "data.augment.preset": "none",
      "model.features": (4, 8, 16),
      **overrides,
    },
  )


class FakeMeasurer:
  """Memory = 1 MB + 2 kB per voxel of patch x batch; a step 1 us per voxel."""

  def __init__(self):
    self.compiled = []

  def memory(self, c):
    self.compiled.append(c)
    return 1e6 + 2e3 * c.voxels

  def seconds(self, c):
    return 1e-6 * c.voxels


# --- rules ---------------------------------------------------------------------------------------


def test_target_spacing_median_and_the_anisotropic_axis():
  iso = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.2], [0.9, 1.0, 1.0]])
  np.testing.assert_allclose(rules.target_spacing(iso, np.full((3, 3), 100)), [1.0, 1.0, 1.0])
  # slice axis 5-6 mm (> 3x the in-plane 0.8) with few slices: its 10th percentile
  aniso = np.array([[0.8, 0.8, s] for s in (5.0, 5.5, 6.0, 6.0, 6.0)])
  shapes = np.array([[200, 200, 30]] * 5)
  target = rules.target_spacing(aniso, shapes)
  np.testing.assert_allclose(target[:2], [0.8, 0.8])
  assert target[2] == pytest.approx(np.percentile([5.0, 5.5, 6.0, 6.0, 6.0], 10))
  # as many slices as in-plane voxels: not nnU-Net's anisotropic case, the median stays
  assert rules.target_spacing(aniso, np.array([[200, 200, 200]] * 5))[2] == 6.0


def test_anisotropic_data_pools_in_plane_first():
  strides = rules.pooling(SPACING, SHAPE, max_pools=4)
  assert strides[0] == (1, 1, 1) and all(set(s) <= {1, 2} for s in strides)
  in_plane, slices = rules.divisor(strides)[0], rules.divisor(strides)[2]
  assert in_plane > slices  # 0.8 mm axes pooled more often than the 4 mm one
  assert strides[1] == (2, 2, 1)
  assert rules.pooling((1.0, 1.0, 1.0), (64, 64, 64), 4)[1:] == ((2, 2, 2),) * 4
  assert len(rules.pooling((1.0, 1.0, 1.0), (16, 16, 16), 4)) == 3  # stops at 4 voxels


def test_patch_sequence_shrinks_from_the_reference_volume():
  options = list(rules.patch_sequence(SPACING, SHAPE, SHAPE, max_pools=4))
  first, _ = options[0]
  assert first == list(SHAPE)  # the 256^3 equivalent, clipped to the median shape
  voxels = [np.prod(p) for p, _ in options]
  assert all(a > b for a, b in zip(voxels, voxels[1:]))
  for patch, strides in options:
    assert all(p % d == 0 for p, d in zip(patch, rules.divisor(strides)))
    assert all(p <= s for p, s in zip(patch, SHAPE))
  assert options[-1][0] == rules.floor_patch(SHAPE) == [8, 8, 8]
  big = rules.initial_patch((1.0, 1.0, 2.0), (400, 400, 400))
  assert big[0] == big[1] > big[2] and np.prod(big) == pytest.approx(256**3, rel=0.02)


def test_batch_cap_is_five_percent_of_the_dataset_and_at_least_two():
  assert rules.batch_cap((100, 100, 100), 1000, (50, 50, 50)) == 400
  assert rules.batch_cap((100, 100, 100), 10, (100, 100, 100)) == 2


# --- search ------------------------------------------------------------------------------------


def _limits(budget, **kw):
  base = dict(budget=budget, max_step_s=None, batch_min=2, batch_unit=1, batch_cap=lambda p: 8)
  return search.Limits(**{**base, **kw})


def _options():
  options = list(rules.patch_sequence(SPACING, SHAPE, SHAPE, 2))

  def make(i, batch):
    patch, strides = options[i]
    return memory.Candidate(tuple(patch), batch, strides, (4, 8, 16)[: len(strides)])

  return options, make


def test_search_takes_the_largest_step_that_fits_and_less_for_less_memory():
  options, make = _options()
  roomy = search.search(options, make, FakeMeasurer(), _limits(1e10))
  assert roomy.candidate.patch == SHAPE and roomy.candidate.batch == 8  # the 5% cap
  tight_budget = 1e6 + 2e3 * np.prod(SHAPE) * 1.5
  tight = search.search(options, make, FakeMeasurer(), _limits(tight_budget))
  assert tight.candidate.voxels < roomy.candidate.voxels
  assert tight.memory_bytes <= tight_budget and tight.candidate.batch >= 2
  timed = search.search(options, make, FakeMeasurer(), _limits(1e10, max_step_s=0.2))
  assert timed.candidate.voxels * 1e-6 <= 0.2 and not timed.over_time_cap


def test_a_budget_below_the_smallest_step_says_so_with_the_numbers():
  options, make = _options()
  with pytest.raises(search.PlanError, match=r"too small.*patch \[8, 8, 8\], batch 2.*GiB"):
    search.search(options, make, FakeMeasurer(), _limits(2e6), "--memory_gb=0.002")


# --- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_records_each_case_and_is_cached(tmp_path):
  csv = write_dataset(tmp_path / "m")
  cfg = config_for(csv, tmp_path)
  fp = fingerprint.fingerprint(cfg.data)
  assert fp.case_ids == ["c0", "c1", "c2"]
  np.testing.assert_allclose(fp.spacings, [SPACING] * 3)
  np.testing.assert_array_equal(fp.cropped_shapes, [[92, 92, 20]] * 3)  # the head box
  record = fp.records[0]
  assert set(record["intensity"]) == {"pre", "post"}
  assert record["intensity"]["post"]["p50"] > record["intensity"]["pre"]["p50"]  # the lesion
  assert record["class_fractions"]["1"] == pytest.approx(16 * 16 * 4 / (92 * 92 * 20))
  summary = fp.summary()
  assert summary["cases"] == 3 and summary["median_spacing"] == pytest.approx(SPACING)
  stored = data.fingerprint_dir(cfg.data) / "c0.json"
  before = stored.stat().st_mtime_ns
  fingerprint.fingerprint(cfg.data)
  assert stored.stat().st_mtime_ns == before  # reused, not recomputed


def test_bad_spacings_name_the_case(tmp_path):
  csv = write_dataset(tmp_path / "m", n=2)
  img = nib.load(str(tmp_path / "m" / "c1_pre.nii.gz"))
  img.header.set_zooms((0.8, 0.8, 2.0))  # the header disagrees with the affine (4 mm)
  nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, img.header), str(tmp_path / "bad.nii"))
  (tmp_path / "m" / "c1_pre.nii.gz").unlink()
  (tmp_path / "bad.nii").rename(tmp_path / "m" / "c1_pre.nii")
  csv.write_text(csv.read_text().replace("c1_pre.nii.gz", "c1_pre.nii"))
  cfg = config_for(csv, tmp_path)
  with pytest.raises(data.DataError, match=r"case c1: inconsistent spacing .*2\.0.*4\.0"):
    fingerprint.fingerprint(cfg.data, workers=2)  # raised from a spawned worker
  with pytest.raises(data.DataError, match=r"case c7: unreadable spacing \[0\.8, -1"):
    fingerprint.check_record(
      {"case_id": "c7", "spacing": [0.8, -1, 4], "shape": [1, 1, 1], "cropped_shape": [1, 1, 1]},
      "c7.json",
    )


# --- the plan ------------------------------------------------------------------------------------


def test_explicit_values_win_over_the_plan(tmp_path):
  csv = write_dataset(tmp_path / "m")
  cfg = config_for(csv, tmp_path, **{"data.patch_size": (32, 32, 16)})
  explicit = {"data.patch_size", "model.features"}
  plan = planner.make_plan(cfg, memory_gb=1.0, explicit=explicit, measurer=FakeMeasurer())
  assert plan["patch_size"] == [32, 32, 16] and plan["features"] == [4, 8, 16]
  assert plan["rules"]["patch_size"] == "given: --config.data.patch_size"
  assert plan["strides"][1] == [2, 2, 1] and len(plan["strides"]) == 3
  planned, record = planner.apply_plan(cfg, {**plan, "patch_size": [64, 64, 8]}, explicit)
  assert tuple(planned.data.patch_size) == (32, 32, 16)  # given, kept
  assert tuple(planned.data.target_spacing) == SPACING  # planned: the median spacing
  assert planned.model.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 1))
  assert record["explicit"] == {"data.patch_size": [32, 32, 16], "model.features": [4, 8, 16]}
  assert record["applied"]["train.batch_size"] == plan["batch_size"]
  json.dumps(record)  # JSON as it is written to W/plan.json


def test_plan_compiles_the_step_and_fits_the_budget(tmp_path):
  """XLA's own memory analysis: a smaller budget gives a smaller patch x batch.

  Three compiles (~20 s each on 2 busy cores): the two probes, then the tighter choice.
  """
  csv = write_dataset(tmp_path / "m")
  cfg = config_for(csv, tmp_path, **{"model.features": (4, 8)})
  measurer = memory.Measurer(cfg, timed=False)
  roomy = planner.make_plan(cfg, memory_gb=4.0, max_step_s=0, measurer=measurer)
  strides = np.array(roomy["strides"])
  assert strides[:, :2].prod(axis=0).min() > strides[:, 2].prod()  # in-plane pooled more
  assert roomy["patch_size"][0] > roomy["patch_size"][2]  # an anisotropic patch
  assert 0 < roomy["memory_bytes"] <= roomy["memory_budget_bytes"] == 4 * 2**30
  tight_gb = 0.6 * roomy["memory_bytes"] / 2**30
  tight = planner.make_plan(cfg, memory_gb=tight_gb, max_step_s=0, measurer=measurer)
  assert np.prod(tight["patch_size"]) * tight["batch_size"] < (
    np.prod(roomy["patch_size"]) * roomy["batch_size"]
  )
  assert tight["memory_bytes"] <= tight["memory_budget_bytes"]
  assert [t["why"] for t in tight["trials"]] == ["probe", "probe", "choice"]


@pytest.mark.slow
def test_main_plans_then_trains_and_records_the_plan_in_w(tmp_path):
  from test_train import run_cli

  csv = write_dataset(tmp_path / "m", n=4)
  workdir = tmp_path / "run"
  run_cli(
    workdir,
    "--plan=auto",
    "--memory_gb=2",
    f"--config.data.manifest={csv}",
    f"--config.data.cache_dir={tmp_path / 'cache'}",
    "--config.data.patch_size=(32,32,8)",
    "--config.data.num_folds=2",
    config="configs/manifest.py:resfuse,smoke",
  )
  plan = json.loads((workdir / "plan.json").read_text())
  assert plan["explicit"] == {"data.patch_size": [32, 32, 8]}
  assert plan["rules"]["patch_size"] == "given: --config.data.patch_size"
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["patch_size"] == [32, 32, 8]
  assert config["model"]["strides"] == plan["strides"] and plan["strides"][1] == [2, 2, 1]
  assert config["data"]["target_spacing"] == pytest.approx(plan["target_spacing"])
  assert config["train"]["batch_size"] == plan["batch_size"] >= 2
  assert json.loads((workdir / "results.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_plan_command_refuses_a_budget_below_the_smallest_step(tmp_path):
  import subprocess
  import sys

  csv = write_dataset(tmp_path / "m")
  proc = subprocess.run(
    [
      sys.executable, "-m", "resfuse_jax.plan", "--config=configs/manifest.py:resfuse,smoke",
      f"--config.data.manifest={csv}", f"--config.data.cache_dir={tmp_path / 'cache'}",
      "--memory_gb=0.0001", f"--output={tmp_path / 'plan.json'}",
    ],
    cwd=ROOT, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 1 and not (tmp_path / "plan.json").exists()
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the memory budget is too small") and "GiB" in last
