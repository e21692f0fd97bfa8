"""Device-resident sampling (issue 28, first part): packed cases, crops cut with dynamic_slice."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from resfuse_jax.data import pipeline, resident
from resfuse_jax.data.common import Case
from resfuse_jax.train import resident as device_resident

REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def odd_cases(small_cases):
  """Three phantom cases (cropped: shapes differ), one thinner than the patch, one long one."""
  a, b = small_cases[0], small_cases[1]
  thin = dataclasses.replace(
    a, case_id="thin", pre=a.pre[:, :, :12], post=a.post[:, :, :12], label=a.label[:, :, :12],
    fg_locations=None,
  )  # fmt: skip
  long = dataclasses.replace(
    b, case_id="long", pre=np.concatenate([b.pre, b.pre]), post=np.concatenate([b.post, b.post]),
    label=np.concatenate([b.label, b.label]), fg_locations=None,
  )  # fmt: skip
  return [*small_cases[:3], thin, long]


@pytest.mark.parametrize(
  "patch, crop", [((16, 16, 16), (16, 16, 16)), ((16, 16, 16), (24, 20, 26))]
)
def test_a_resident_crop_is_the_host_crop_of_the_same_case_and_centre(small_cases, patch, crop):
  cases = odd_cases(small_cases)
  packed = resident.pack(cases, REGIONS, patch, crop)
  assert packed.nbytes == resident.resident_bytes(
    [c.pre.shape for c in cases], 3, patch, crop, "float32"
  )
  host = pipeline.PairedPatchSampler(cases, patch, REGIONS, 0.5, crop)
  on_device = device_resident.to_device(packed)
  cut = jax.jit(lambda i, c: device_resident.cut(on_device, i, c, patch, crop))
  rng = np.random.default_rng(0)
  for i, case in enumerate(cases):
    shape = np.array(case.pre.shape)
    centres = [
      np.zeros(3, int),
      shape - 1,
      shape // 2,
      rng.integers(0, shape),
      np.array([0, 31, 5]),
    ]
    for centre in centres:
      centre = np.minimum(centre, shape - 1)
      expected = host._cut(case, centre)
      got = cut(i, jnp.asarray(centre, jnp.int32))
      np.testing.assert_array_equal(np.asarray(got["pre"])[..., 0], expected["pre"])
      np.testing.assert_array_equal(np.asarray(got["post"])[..., 0], expected["post"])
      np.testing.assert_array_equal(np.asarray(got["label"]), expected["label"])


def test_bfloat16_storage_rounds_within_its_precision_and_halves_the_scans(small_cases):
  patch, crop = (16, 16, 16), (20, 20, 20)
  f32 = resident.pack(small_cases[:2], REGIONS, patch, crop, "float32")
  bf16 = resident.pack(small_cases[:2], REGIONS, patch, crop, "bfloat16")
  assert bf16.scans.dtype == ml_dtypes.bfloat16 and bf16.scans.nbytes * 2 == f32.scans.nbytes
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  stored = bf16.scans.astype(np.float32)
  np.testing.assert_allclose(stored, f32.scans, rtol=eps, atol=0)
  assert np.array_equal(bf16.labels, f32.labels)
  with pytest.raises(Exception, match="resident_dtype must be one of float32, bfloat16"):
    resident.pack(small_cases[:1], REGIONS, patch, crop, "float16")


def corner_case(shape=(24, 24, 24), patch=(8, 8, 8)):
  """Foreground only where a uniform centre never lands (within patch/2 of a corner):
  region 'big' (label 1, 8 voxels) and 'small' (label 2, 1 voxel)."""
  label = np.zeros(shape, np.uint8)
  label[:2, :2, :2] = 1
  label[-1, -1, -1] = 2
  pre = np.random.default_rng(1).random(shape).astype(np.float32)
  box = tuple((0, n) for n in shape)
  return Case("corner", pre, pre + 1, label, (1.0, 1.0, 1.0), np.eye(4), shape, box)


def test_the_drawn_foreground_share_and_region_choice_match_the_host_rule():
  patch, fraction, n = (8, 8, 8), 0.3, 4000
  case = corner_case(patch=patch)
  regions = {"big": (1,), "small": (2,)}
  on_device = device_resident.to_device(resident.pack([case], regions, patch, patch))
  keys = device_resident.sample_keys(5, jnp.asarray(3), n)
  draw = jax.jit(jax.vmap(lambda k: device_resident.draw_centre(on_device, k, patch, fraction)))
  cases, centres = (np.asarray(x) for x in draw(keys))
  assert (cases == 0).all()
  labels = case.label[tuple(centres.T)]
  share = (labels > 0).mean()
  assert abs(share - fraction) < 4 * np.sqrt(fraction * (1 - fraction) / n)  # 4 sigma
  # each non-empty region is chosen uniformly, however small
  assert abs((labels == 2).sum() / (labels > 0).sum() - 0.5) < 0.1
  # uniform centres keep the host's range: [patch/2, shape - patch/2]
  uniform = centres[labels == 0]
  assert uniform.min() >= 4 and uniform.max() <= 20


def test_rows_are_decided_by_seed_step_and_row_alone(small_cases):
  patch, crop = (16, 16, 16), (20, 20, 20)
  on_device = device_resident.to_device(resident.pack(small_cases[:4], REGIONS, patch, crop))

  @functools.partial(jax.jit, static_argnums=1)
  def crops(step, batch):
    keys = device_resident.sample_keys(0, step, batch)
    return device_resident.sample_crops(on_device, keys, patch, crop, 1 / 3)

  a, b = crops(jnp.asarray(7), 4), crops(jnp.asarray(7), 6)
  assert a["pre"].shape == (4, *crop, 1) and a["label"].dtype == jnp.uint8
  for k in ("pre", "post", "label"):  # a larger batch draws the same first rows
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k])[:4])
  c = crops(jnp.asarray(8), 4)
  assert not np.array_equal(np.asarray(a["pre"]), np.asarray(c["pre"]))
  # past UNROLL_ROWS the rows are vmapped (one gather): the same crops
  many = crops(jnp.asarray(7), device_resident.UNROLL_ROWS + 1)
  for k in ("pre", "post", "label"):
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(many[k])[:4])


def placement_setup(small_cases, monkeypatch, memory_bytes, **data):
  from conftest import smoke_config

  from resfuse_jax import backend
  from resfuse_jax.task import Task
  from resfuse_jax.train.inputs import RunData

  config = smoke_config(**{f"data.{k}": v for k, v in data.items()})
  task = Task.from_config(config)
  run = RunData(task.dataset, None, small_cases[:4], small_cases[4:5])
  monkeypatch.setattr(backend, "device_memory_bytes", lambda device=None: memory_bytes)
  # the GPU column: auto means "device where it fits" there
  monkeypatch.setitem(backend.DEFAULTS["cpu"], "resident", "device")
  return task, run


def test_auto_falls_back_to_the_host_when_the_set_does_not_fit_and_device_refuses(
  small_cases, monkeypatch, caplog
):
  from resfuse_jax.errors import ConfigError
  from resfuse_jax.train.inputs import resident_placement

  shapes = [c.pre.shape for c in small_cases[:4]]
  task, run = placement_setup(small_cases, monkeypatch, 1 << 40, resident="auto")
  needed = resident.resident_bytes(shapes, 3, task.patch_size, task.crop_shape, "float32")
  assert resident_placement(task, run) == "replicated"
  task, run = placement_setup(small_cases, monkeypatch, 2 * needed, resident="auto")
  with caplog.at_level("INFO"):
    assert resident_placement(task, run) == "host"  # 0.4 of 2x what it needs: does not fit
  assert "crops come from the host pipeline (Grain)" in caplog.text
  assert f"needs {needed / 2**20:.1f} MiB a device" in caplog.text
  # over 4 data shards each device holds one case: a quarter fits where the whole did not
  assert resident_placement(task, run, shards=4) == "sharded"
  assert resident.resident_bytes(
    shapes, 3, task.patch_size, task.crop_shape, "float32", shards=4
  ) * 4 == needed  # fmt: skip
  task, run = placement_setup(small_cases, monkeypatch, 2 * needed, resident="device")
  with pytest.raises(ConfigError, match=r"data.resident=device: replicated \(4 of the 4 train"):
    resident_placement(task, run)  # one data shard: nothing to deal the cases over
  task, run = placement_setup(
    small_cases, monkeypatch, 2 * needed, resident="device", resident_layout="replicated"
  )
  with pytest.raises(ConfigError, match=r"replicated \(4 of the 4 training cases on each"):
    resident_placement(task, run, shards=4)  # the layout asked for is the only one tried
  task, run = placement_setup(
    small_cases, monkeypatch, 2 * needed, resident="device", resident_memory_fraction=0.6
  )
  assert resident_placement(task, run) == "replicated"
  task, run = placement_setup(small_cases, monkeypatch, 1 << 40, resident="device")
  assert resident_placement(task, run, shards=8) == "replicated"  # fits whole: replicated
  task, run = placement_setup(small_cases, monkeypatch, 0, resident="host")
  assert resident_placement(task, run) == "host"  # host never measures


def test_auto_keeps_the_host_pipeline_on_the_cpu_and_says_so(small_cases, monkeypatch, caplog):
  from resfuse_jax import backend
  from resfuse_jax.train.inputs import resident_placement

  assert backend.DEFAULTS["cpu"]["resident"] == "host"
  assert backend.DEFAULTS["gpu"]["resident"] == "device"
  task, run = placement_setup(small_cases, monkeypatch, 1 << 40, resident="auto")
  monkeypatch.setitem(backend.DEFAULTS["cpu"], "resident", "host")
  with caplog.at_level("INFO"):
    assert resident_placement(task, run) == "host"
  assert "data.resident=auto on the cpu backend: crops come from the host pipeline" in caplog.text


def test_sharded_packing_deals_every_case_once_at_the_shared_shape(small_cases):
  """Shard d holds cases d, d+D, ...; its block has the largest shard's slot count (empty
  slots: shape 0, never drawn) and the padded shape of all cases; a case's foreground
  subset does not depend on what it is packed with."""
  patch, crop, n, shards = (16, 16, 16), (20, 20, 20), 5, 3
  cases = odd_cases(small_cases)[:n]
  size = resident.padded_shape([c.pre.shape for c in cases], patch, crop)
  members = [resident.shard_members(n, shards, d) for d in range(shards)]
  assert members == [[0, 3], [1, 4], [2]]
  slots = resident.slots_per_shard(n, shards)
  whole = resident.pack(cases, REGIONS, patch, crop)
  for m in members:
    part = resident.pack([cases[i] for i in m], REGIONS, patch, crop, size=size, slots=slots)
    assert part.scans.shape == (slots, *size, 2) and whole.scans.shape[1:] == (*size, 2)
    for j, i in enumerate(m):
      np.testing.assert_array_equal(part.scans[j], whole.scans[i])
      np.testing.assert_array_equal(part.fg[j], whole.fg[i])
    assert (part.shapes[len(m) :] == 0).all() and (part.fg_counts[len(m) :] == 0).all()
  with pytest.raises(ValueError, match="smaller than these cases need"):
    resident.pack(cases, REGIONS, patch, crop, size=(8, 8, 8))


def test_the_flat_layout_the_benchmark_measures_cuts_the_padded_layouts_crops(small_cases):
  """benchmarks/resident_data.py times a flat buffer (each case at its own padded shape,
  crops gathered): its crops must be the padded layout's for the timing to mean anything."""
  from benchmarks import resident_data

  patch, crop = (16, 16, 16), (24, 20, 26)
  cases = odd_cases(small_cases)
  flat = tuple(jnp.asarray(a) for a in resident_data.flat_pack(cases, patch, crop))
  on_device = device_resident.to_device(resident.pack(cases, REGIONS, patch, crop))
  rng = np.random.default_rng(3)
  for i, case in enumerate(cases):
    high = np.maximum(np.array(case.pre.shape) - patch, 0)
    window = jnp.asarray(rng.integers(0, high + 1), jnp.int32)
    got = resident_data.flat_cut(flat, i, window, crop)
    centre = window + jnp.asarray(patch) // 2
    expected = device_resident.cut(on_device, i, centre, patch, crop)
    np.testing.assert_array_equal(
      np.asarray(got["scans"][..., 1]), np.asarray(expected["post"])[..., 0]
    )
    np.testing.assert_array_equal(np.asarray(got["label"]), np.asarray(expected["label"]))


def test_a_resident_run_refuses_a_host_pipelines_checkpoint_state_with_the_fix():
  from resfuse_jax.data import DataError

  stream = device_resident.ResidentStream({}, "sharded", 4)
  assert device_resident.marker(stream.get_state()) == {
    "resident": "device", "layout": "sharded", "shards": 4,
  }  # fmt: skip
  stream.set_state(stream.get_state())
  with pytest.raises(DataError, match="resume it with --config.data.resident=host"):
    stream.set_state(b'{"next_index": 12}')


def test_a_resume_draws_its_crops_where_its_checkpoint_did(small_cases, monkeypatch, caplog):
  """auto follows the checkpoint (even against the backend's column); a setting that
  contradicts it is refused before anything is restored, so no checkpoint looks damaged."""
  from resfuse_jax import backend
  from resfuse_jax.errors import ConfigError
  from resfuse_jax.train.inputs import resident_placement

  host_state = (6, b'{"next_index": 12, "worker_count": 0}')
  sharded = (6, device_resident.ResidentStream({}, "sharded", 2).get_state())
  task, run = placement_setup(small_cases, monkeypatch, 1 << 40, resident="auto")
  assert resident_placement(task, run, 2, saved=host_state) == "host"  # column says device
  with caplog.at_level("WARNING"):
    assert resident_placement(task, run, 4, saved=sharded) == "sharded"
  assert "dealt the training cases over 2 data shards, this run has 4" in caplog.text
  task, run = placement_setup(small_cases, monkeypatch, 1 << 40, resident="device")
  with pytest.raises(
    ConfigError, match="step 6 was written by a run whose crops came from the host"
  ):
    resident_placement(task, run, 2, saved=host_state)
  task, run = placement_setup(
    small_cases, monkeypatch, 1 << 40, resident="auto", resident_layout="replicated"
  )
  with pytest.raises(
    ConfigError, match=r"drawn on the device \(sharded layout\).*resident_layout=sharded"
  ):
    resident_placement(task, run, 2, saved=sharded)
  task, run = placement_setup(small_cases, monkeypatch, 0, resident="auto")
  with pytest.raises(ConfigError, match=r"resuming a resident run\): sharded \(2 of the 4"):
    resident_placement(task, run, 2, saved=sharded)  # cannot resume where it does not fit
  task, run = placement_setup(small_cases, monkeypatch, 1 << 40, resident="auto")
  monkeypatch.setitem(backend.DEFAULTS["cpu"], "resident", "host")
  assert resident_placement(task, run, 2, saved=sharded) == "sharded"  # CPU column: host


def test_bad_resident_settings_are_refused_up_front():
  from conftest import smoke_config

  from resfuse_jax import validation
  from resfuse_jax.errors import ConfigError

  with pytest.raises(ConfigError, match="data.resident='gpu'"):
    validation.check(smoke_config(**{"data.resident": "gpu"}))
  with pytest.raises(ConfigError, match="resident_memory_fraction=1.5: must be a number in"):
    validation.check(smoke_config(**{"data.resident_memory_fraction": 1.5}))


def test_resident_training_resumes_exactly(tmp_path):
  """2 steps, then resumed to 4, ends with the parameters of 4 steps in one go: the
  crops come from (seed, step, row) alone, and the checkpoint's data state is the marker."""
  import re

  from test_train import run_cli

  flags = ("--config.data.resident=device", "--config.checkpoint.every_steps=2")
  once = run_cli(tmp_path / "once", "--config.train.steps=4", *flags)
  run_cli(tmp_path / "resumed", "--config.train.steps=2", *flags)
  resumed = run_cli(tmp_path / "resumed", "--config.train.steps=4", *flags)
  assert "Resumed from" in resumed.stderr and "crops drawn on the device" in resumed.stderr

  def checksum(proc):
    return re.search(r"final parameter checksum (\S+)", proc.stderr).group(1)

  assert checksum(once) == checksum(resumed)
  # The host pipeline cannot continue this run: the workdir refuses the changed setting at
  # once (placement's own check covers auto resolving otherwise), every step kept.
  refused = run_cli(
    tmp_path / "resumed", "--config.train.steps=6", "--config.data.resident=host", check=False
  )
  assert refused.returncode != 0
  assert "data.resident: 'device' -> 'host'" in refused.stderr
  steps = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
  assert steps[-2:] == ["2", "4"] and not (tmp_path / "resumed" / "corrupt_checkpoints").exists()
