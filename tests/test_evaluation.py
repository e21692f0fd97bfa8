"""The one evaluation path, on hand-made window functions (no model needed)."""

import numpy as np
import pytest
from conftest import smoke_config

from resfuse_jax.evaluation import evaluation, finalize, metrics
from resfuse_jax.inference import postprocess


def constant(value):
  return lambda tiles: np.full((*tiles.shape[:-1], 3), value, np.float32)


def test_evaluate_cases_scores_every_case_with_the_metrics_functions(small_cases):
  config = smoke_config()
  cases = small_cases[:2]
  seen = []
  acc = evaluation.evaluate_cases(
    constant(0.9), cases, config, on_case=lambda c, p, m, row: seen.append((c, p, m, row))
  )
  assert [row["case"] for row in acc.rows] == [c.case_id for c in cases]
  for case, probs, masks, row in seen:
    assert probs.shape == (*case.pre.shape, 3) and masks.shape == probs.shape
    assert masks.all()  # 0.9 everywhere
    ref = postprocess.region_masks(
      np.asarray(case.label), {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    )
    assert row["dice_WT"] == pytest.approx(metrics.dice(masks[..., 0], ref[..., 0]))
    assert row["recall_ET"] == 1.0  # everything predicted: nothing missed
  assert "lesion_dice_WT" not in acc.rows[0]


def test_evaluate_cases_applies_the_configs_post_processing(small_cases):
  config = smoke_config(**{"eval.thresholds": (0.5, 0.95, 0.95)})
  (row,) = evaluation.evaluate_cases(constant(0.9), small_cases[:1], config).rows
  # TC and ET are below their thresholds: an empty prediction scores 0 against a present one
  assert row["dice_TC"] == 0.0 and row["recall_ET"] == 0.0 and row["dice_WT"] > 0.0
  # Masks are scored as the label map reads them: a TC voxel is a WT voxel, whatever WT's
  # own threshold said.
  config = smoke_config(**{"eval.thresholds": (0.95, 0.5, 0.5)})
  (nested,) = evaluation.evaluate_cases(constant(0.9), small_cases[:1], config).rows
  assert nested["dice_WT"] == row["dice_WT"] and nested["recall_WT"] == 1.0


def test_evaluate_cases_adds_lesion_wise_scores_and_tta_is_consistent(small_cases):
  config = smoke_config()
  plain = evaluation.evaluate_cases(constant(0.0), small_cases[:1], config, lesion_wise=True)
  tta = evaluation.evaluate_cases(constant(0.0), small_cases[:1], config, tta=True)
  assert plain.rows[0]["lesion_dice_WT"] == 0.0  # every reference lesion missed
  assert plain.rows[0]["dice_WT"] == tta.rows[0]["dice_WT"] == 0.0


def test_results_record_has_the_contract_keys(small_cases):
  config = smoke_config("resunet")
  acc = evaluation.evaluate_cases(constant(0.9), small_cases[:2], config)
  record = finalize.results_record(config, 7, 123, acc)
  assert set(record) == {
    "model",
    "variant",
    "dataset",
    "steps",
    "params",
    "dice",
    "recall",
    "precision",
    "hd95",
    "cases",
  }
  assert record["model"] == record["variant"] == "resunet" and record["cases"] == 2
  assert record["dice"] == acc.summary()["dice"] and record["steps"] == 7


def test_training_validation_on_one_device_takes_the_backends_tiling(small_cases, monkeypatch):
  """Training's validation on one device gives the tiler a JaxWindow, so a GPU's device
  tiling applies there too; both placements score the same."""
  import jax

  from resfuse_jax import backend, sharding
  from resfuse_jax.inference import predictor, tiler
  from resfuse_jax.task import Task
  from resfuse_jax.train import loop

  config = smoke_config()
  model = Task.from_config(config).model
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  x = jax.numpy.zeros((1, *config.data.patch_size, 1))
  params = jax.jit(model.init)(jax.random.key(1), x, x)["params"]  # eager init: 160 compiles
  window_fn = predictor.make_sharded_window_fn(model, mesh)
  placements = []
  resolve = tiler.resolve_placement
  monkeypatch.setattr(
    tiler, "resolve_placement", lambda p, f: placements.append(resolve(p, f)) or placements[-1]
  )

  probs = []
  keep = lambda case, p, masks, row: probs.append(p)  # noqa: E731
  loop.validate(window_fn, params, small_cases[:1], config, mesh, keep)
  monkeypatch.setitem(backend.DEFAULTS["cpu"], "tiling", "device")
  loop.validate(window_fn, params, small_cases[:1], config, mesh, keep)
  assert placements == ["host", "device"]
  assert probs[0].shape == (*small_cases[0].pre.shape, 3) and np.ptp(probs[0]) > 1e-3
  np.testing.assert_allclose(probs[1], probs[0], rtol=0, atol=1e-5)
