"""Post-processing rules on hand-made volumes, their choice on validation, and their use."""

import json
import shutil

import numpy as np
import pytest

from resfuse_jax.data import brats
from resfuse_jax.evaluation import metrics, postprocess_selection
from resfuse_jax.evaluation.postprocess_selection import CaseMasks
from resfuse_jax.inference import postprocess, prediction
from resfuse_jax.inference.postprocess import NO_RULE, Rule
from resfuse_jax.workdir import VALIDATION_MASKS


def blob(shape, corner, size) -> np.ndarray:
  m = np.zeros(shape, bool)
  m[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
  return m


def test_component_sizes_are_compared_in_mm3():
  """2 mm voxels hold 8 mm³: 6 voxels (48 mm³) go under 50 mm³, 7 voxels (56 mm³) stay."""
  mask = blob((20, 20, 20), (1, 1, 1), (6, 1, 1)) | blob((20, 20, 20), (10, 10, 10), (7, 1, 1))
  kept = postprocess.apply_rule(mask, Rule(min_component_mm3=50), voxel_mm3=8.0)
  assert kept.sum() == 7 and not kept[1, 1, 1] and kept[10, 10, 10]
  assert postprocess.apply_rule(mask, Rule(min_component_mm3=48), 8.0).sum() == 13
  at_1mm = postprocess.apply_rule(mask, Rule(min_component_mm3=50), voxel_mm3=1.0)
  assert not at_1mm.any()


def test_largest_only_and_relabel():
  mask = blob((12, 12, 12), (0, 0, 0), (3, 3, 3)) | blob((12, 12, 12), (8, 8, 8), (2, 2, 2))
  largest = postprocess.apply_rule(mask, Rule(largest_only=True), 1.0)
  assert largest.sum() == 27 and not largest[8, 8, 8]
  assert not postprocess.apply_rule(mask, Rule(relabel_below_mm3=36), 1.0).any()
  assert postprocess.apply_rule(mask, Rule(relabel_below_mm3=35), 1.0).sum() == 35


def test_rules_keep_regions_nested_and_relabelled_et_becomes_necrosis():
  shape = (16, 16, 16)
  wt = blob(shape, (2, 2, 2), (6, 6, 6)) | blob(shape, (12, 12, 12), (2, 2, 2))
  tc = blob(shape, (3, 3, 3), (3, 3, 3)) | blob(shape, (12, 12, 12), (2, 2, 2))
  et = blob(shape, (4, 4, 4), (1, 2, 2)) | blob(shape, (0, 14, 0), (1, 1, 1))  # one outside WT
  masks = np.stack([wt, tc, et], -1)
  nested = postprocess.apply_rules(masks, None, (1.0, 1.0, 1.0))
  assert nested[0, 14, 0].all()  # painting reads an ET voxel as TC and WT: so does the mask
  rules = [Rule(min_component_mm3=10), NO_RULE, Rule(relabel_below_mm3=10)]
  out = postprocess.apply_rules(masks, rules, (1.0, 1.0, 1.0))
  assert not out[12, 12, 12].any() and not out[0, 14, 0].any()  # WT's small parts, TC inside
  assert out[4, 4, 4, 1] and not out[..., 2].any()  # ET (4 voxels) emptied, TC keeps them
  labels = postprocess.masks_to_labels(out, brats.REGIONS)
  assert labels[4, 4, 4] == 1 and labels[2, 2, 2] == 2 and labels[12, 12, 12] == 0
  np.testing.assert_array_equal(postprocess.region_masks(labels, brats.REGIONS), out)
  no_et = masks.copy()
  no_et[..., 2] = False  # an empty ET stays empty under every rule, and WT/TC are unchanged
  for rule in (Rule(min_component_mm3=10), Rule(relabel_below_mm3=1e6), Rule(largest_only=True)):
    kept = postprocess.apply_rules(no_et, [NO_RULE, NO_RULE, rule], (1.0, 1.0, 1.0))
    assert not kept[..., 2].any()
    np.testing.assert_array_equal(kept[..., :2], postprocess.nest(no_et)[..., :2])


def brats_case(case_id, pred_regions, ref_regions, shape=(24, 24, 24)) -> CaseMasks:
  def stack(regions):
    return np.stack([regions.get(r, np.zeros(shape, bool)) for r in brats.REGIONS], -1)

  return CaseMasks(case_id, stack(pred_regions), stack(ref_regions), (1.0, 1.0, 1.0))


def test_selection_picks_the_known_best_rule_per_region():
  shape = (24, 24, 24)
  big = blob(shape, (4, 4, 4), (6, 6, 6))  # 216 voxels: a real lesion
  specks = [blob(shape, (18, 18, 18 - 4 * i), (2, 2, 1)) for i in range(4)]  # 4-voxel FPs
  noisy = big | np.any(specks, axis=0)
  et_a = blob(shape, (5, 5, 5), (4, 4, 4))  # 64 voxels, no ET in the reference: relabel it
  et_b = blob(shape, (5, 5, 5), (3, 4, 5)) | blob(shape, (5, 5, 12), (3, 4, 5))  # 2 × 60, real
  wt_b = big | blob(shape, (4, 4, 11), (6, 6, 6))
  cases = [
    brats_case("a", {"WT": noisy, "TC": big, "ET": et_a}, {"WT": big, "TC": big}),
    brats_case("b", {"WT": wt_b, "TC": wt_b, "ET": et_b}, {"WT": wt_b, "TC": wt_b, "ET": et_b}),
  ]
  record = postprocess_selection.determine(cases, list(brats.REGIONS), brats_like=True)
  rules = record["rules"]
  assert Rule.from_dict(rules["WT"]) == Rule(min_component_mm3=10.0)  # the smallest that works
  assert Rule.from_dict(rules["TC"]) == NO_RULE  # nothing to gain: ties go to none
  assert Rule.from_dict(rules["ET"]) == Rule(relabel_below_mm3=100.0)
  by_rule = {(c["region"], c["describe"]): c["score"] for c in record["candidates"]}
  assert by_rule[("WT", "none")] < by_rule[("WT", "remove components < 10 mm³")] == 1.0
  assert by_rule[("ET", "remove components < 100 mm³")] < 1.0  # removes b's real lesions
  assert record["metric"] == "lesion_dice" and record["cases"] == 2
  # Binary data is scored by voxel Dice; the largest component is a candidate there.
  binary = [CaseMasks("c", noisy[..., None], big[..., None], (1.0, 1.0, 1.0))]
  record = postprocess_selection.determine(binary, ["lesion"], brats_like=False)
  assert record["metric"] == "dice" and Rule.from_dict(record["rules"]["lesion"]) == Rule(
    min_component_mm3=10.0
  )
  assert any(c["describe"] == "keep the largest component" for c in record["candidates"])


def test_cropped_masks_score_exactly_like_the_whole_volume():
  rng = np.random.default_rng(0)
  shape = (40, 40, 40)
  ref = blob(shape, (10, 10, 10), (8, 8, 8)) | blob(shape, (25, 25, 25), (4, 4, 4))
  pred = ref.copy()
  pred[8:30, 8:30, 8:30] ^= rng.random((22, 22, 22)) < 0.01  # boundary errors and specks
  pred[30:33, 5:8, 5:7] = True
  spacing = (1.0, 1.2, 2.0)
  cropped = postprocess_selection.crop_case("x", pred[..., None], ref[..., None], spacing)
  assert cropped.pred.size < pred.size
  for fn in (metrics.dice, lambda p, r: metrics.hd95(p, r, spacing)):
    assert fn(cropped.pred[..., 0], cropped.ref[..., 0]) == pytest.approx(fn(pred, ref))
  assert metrics.lesion_wise(cropped.pred[..., 0], cropped.ref[..., 0], spacing) == pytest.approx(
    metrics.lesion_wise(pred, ref, spacing)
  )


def test_training_writes_the_choice_and_scores_before_and_after(trained_workdir):
  record = json.loads((trained_workdir / "postprocessing.json").read_text())
  assert set(record["rules"]) == set(brats.REGIONS)
  assert {c["region"] for c in record["candidates"]} == set(brats.REGIONS)
  results = json.loads((trained_workdir / "results.json").read_text())
  assert set(results["postprocessed"]["lesion_dice"]) == {*brats.REGIONS, "mean"}
  assert "lesion_dice" in results  # the final validation is scored lesion-wise for BraTS
  saved = postprocess_selection.load_masks(trained_workdir / "validation_masks.npz")
  again = postprocess_selection.evaluate_rules(saved, None, list(brats.REGIONS), True)
  for row, saved_row in zip(metrics.read_csv(trained_workdir / "metrics.csv"), again.rows):
    for key in ("dice_WT", "dice_ET", "hd95_TC", "lesion_dice_WT"):
      assert saved_row[key] == pytest.approx(row[key])  # no second forward pass needed


@pytest.fixture
def workdir_with_rules(trained_workdir, tmp_path):
  workdir = shutil.copytree(trained_workdir, tmp_path / "w")
  record = json.loads((workdir / "postprocessing.json").read_text())
  rules = {"WT": Rule(min_component_mm3=100).to_dict(), "TC": {}, "ET": {}}
  (workdir / "postprocessing.json").write_text(json.dumps({**record, "rules": rules}))
  return workdir


def test_predict_applies_the_saved_choice_unless_told_not_to(
  workdir_with_rules, small_cases, small_phantom, tmp_path, monkeypatch
):
  from resfuse_jax.data import brats as brats_reader
  from resfuse_jax.inference.predictor import Predictor

  case_files = brats_reader.find_cases(small_phantom[0])[0]
  shape = small_cases[0].pre.shape
  probs = np.zeros((*shape, 3), np.float32)
  probs[2:10, 2:10, 2:10, 0] = 0.9  # 512 voxels of WT
  probs[20:22, 20:22, 20:22, 0] = 0.9  # an 8-voxel speck
  monkeypatch.setattr(Predictor, "probabilities", lambda self, case, tta=False: probs)
  counts = {}
  other = tmp_path / "other.json"
  record = json.loads((workdir_with_rules / "postprocessing.json").read_text())
  other.write_text(
    json.dumps({**record, "rules": {"WT": Rule(largest_only=True).to_dict(), "TC": {}, "ET": {}}})
  )
  for mode in ("auto", "none", str(other)):
    predictor = prediction.load_predictor(str(workdir_with_rules), None, None, mode)
    out = tmp_path / f"{len(counts)}.nii.gz"
    prediction.predict_case(predictor, case_files, out)
    import nibabel as nib

    counts[mode] = int((np.asarray(nib.load(str(out)).dataobj) > 0).sum())
  assert counts["auto"] == 512 and counts["none"] == 520 and counts[str(other)] == 512
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({**record, "rules": {"lesion": {}}}))
  with pytest.raises(prediction.ConfigError, match="not a usable post-processing file"):
    prediction.load_predictor(str(workdir_with_rules), None, None, str(bad))


def test_export_carries_the_choice(workdir_with_rules, tmp_path):
  from resfuse_jax.inference.predictor import Predictor
  from resfuse_jax.serving import exporting

  export = exporting.export_model(workdir_with_rules, tmp_path / "E")
  assert (export / "postprocessing.json").read_bytes() == (
    workdir_with_rules / "postprocessing.json"
  ).read_bytes()
  assert Predictor.load(export).rules == [Rule(min_component_mm3=100), NO_RULE, NO_RULE]


def test_folds_are_pooled_into_one_choice(tmp_path):
  """Fold 0 alone has nothing to remove; with fold 1's spurious specks the 20 mm³ rule wins."""
  import subprocess
  import sys

  from conftest import ROOT

  shape = (24, 24, 24)
  big = blob(shape, (4, 4, 4), (6, 6, 6))
  speck = blob(shape, (18, 18, 18), (3, 3, 2))  # 18 voxels
  folds = {
    "f0": [brats_case("a", {"WT": big | speck}, {"WT": big | speck})],  # a real 18-voxel lesion
    "f1": [brats_case(c, {"WT": big | speck}, {"WT": big}) for c in ("b", "c")],  # spurious
  }
  for name, cases in folds.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps({"data": {"name": "phantom"}}))
    postprocess_selection.save_masks(tmp_path / name / VALIDATION_MASKS, cases)
  alone = postprocess_selection.determine(folds["f0"], list(brats.REGIONS), True)
  assert Rule.from_dict(alone["rules"]["WT"]) == NO_RULE
  out = tmp_path / "pooled.json"
  cmd = [
    sys.executable, "-m", "resfuse_jax.evaluate",
    f"--pool_folds={tmp_path / 'f0'},{tmp_path / 'f1'}", f"--output={out}",
  ]  # fmt: skip
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads(out.read_text())
  assert record["cases"] == 3 and sorted(record["case_ids"]) == ["a", "b", "c"]
  assert Rule.from_dict(record["rules"]["WT"]) == Rule(min_component_mm3=20.0)
  assert postprocess.read_rules(out, list(brats.REGIONS))[0] == Rule(min_component_mm3=20)
