"""Crops drawn and cut on the device from the resident training set (`data.resident`).

The host pipeline's sampling (`data.pipeline.PairedPatchSampler`), as a pure JAX
function of (resident arrays, one key per row): a case uniformly at random (nnU-Net's
loader draws cases with replacement), with probability ``fg_fraction`` a centre on a
voxel of one non-empty region chosen uniformly, else a uniform centre; the patch window
clipped into the volume and the crop around it cut with ``lax.dynamic_slice``. For the
same (case, centre) the crop is the host's, voxel for voxel (float32 storage).

Two layouts (`data.resident_layout`): ``replicated``, every device holding the whole set,
so a row's crop depends on (seed, step, row) alone, on any number of devices; and
``sharded``, the cases dealt over the mesh's 'data' axis (`data.resident.shard_members`),
each device holding only its shard's and drawing its own batch rows from them inside a
``shard_map``, so each process loads only the cases of its own devices. A sharded row
depends on (seed, step, row) and the number of data shards.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resfuse_jax import sharding
from resfuse_jax.data import DataError
from resfuse_jax.data import resident as packing
from resfuse_jax.data.common import Case
from resfuse_jax.data.resident import Packed
from resfuse_jax.errors import ConfigError

Resident = dict[str, jax.Array]  # Packed's arrays, on the devices

_SAMPLE_STREAM = 0x73616D  # folded into the row keys: sampling never reuses augmentation's draws
# Up to this many rows a device cuts its crops one dynamic_slice each (unrolled); vmapped,
# the slices become one gather, 2.4x slower per 206³ crop on the CPU (BUILD_NOTES, issue 28).
UNROLL_ROWS = 16


def to_device(packed: Packed, sharding: jax.sharding.Sharding | None = None) -> Resident:
  """Packed's arrays placed once (replicated over the mesh: every device can cut any case)."""
  arrays = {
    "scans": packed.scans,
    "labels": packed.labels,
    "shapes": packed.shapes,
    "fg": packed.fg,
    "fg_counts": packed.fg_counts,
  }
  return {k: jax.device_put(v, sharding) for k, v in arrays.items()}


def place_sharded(
  cases: Sequence[Case],
  regions: dict,
  patch: Sequence[int],
  crop: Sequence[int],
  dtype: str,
  mesh: jax.sharding.Mesh,
) -> tuple[Resident, list[str]]:
  """The cases dealt over the mesh's 'data' axis, each process packing only the shards of
  its own devices (the others' memory-mapped cases are never read).

  Every array gets a leading [D * slots] axis split over 'data' (replicated over
  'spatial'); ``count`` [D] says how many of a shard's slots hold cases. Returns the
  arrays and the ids of the cases this process packed.
  """
  shards = mesh.shape[sharding.DATA]
  if len(cases) < shards:
    raise ConfigError(
      f"data.resident_layout=sharded deals the training cases over the {shards} data shards, "
      f"but there are only {len(cases)}: use resident_layout=replicated"
    )
  slots = packing.slots_per_shard(len(cases), shards)
  size = packing.padded_shape([c.pre.shape for c in cases], patch, crop)
  packed: dict[int, Packed] = {}

  def shard_of(index) -> Packed:
    first = index[0].start or 0
    if first % slots or (index[0].stop or shards * slots) - first != slots:
      raise AssertionError(f"a device's block {index[0]} is not one shard of {slots} slots")
    d = first // slots
    if d not in packed:
      members = [cases[i] for i in packing.shard_members(len(cases), shards, d)]
      packed[d] = packing.pack(members, regions, patch, crop, dtype, size=size, slots=slots)
    return packed[d]

  split = NamedSharding(mesh, P(sharding.DATA))
  row_shapes = {  # one slot of each of Packed's arrays
    "scans": (*size, 2),
    "labels": tuple(size),
    "shapes": (3,),
    "fg": (len(regions), packing.LOCATIONS, 3),
    "fg_counts": (len(regions),),
  }
  arrays = {
    name: jax.make_array_from_callback(
      (shards * slots, *row), split, lambda idx, n=name: getattr(shard_of(idx), n)
    )
    for name, row in row_shapes.items()
  }
  counts = np.array([len(packing.shard_members(len(cases), shards, d)) for d in range(shards)])
  arrays["count"] = jax.make_array_from_callback(
    (shards,), split, lambda idx: counts[idx].astype(np.int32)
  )
  held = [cid for d in sorted(packed) for cid in packed[d].case_ids]
  return arrays, held


def draw_centre(resident: Resident, key: jax.Array, patch: Sequence[int], fg_fraction: float):
  """(case index, [3] centre voxel) for one row, as `PairedPatchSampler._centre` draws them."""
  k_case, k_fg, k_region, k_loc, k_uniform = jax.random.split(key, 5)
  # A data shard draws among its own cases (``count``), the replicated set among all.
  n = resident["count"][0] if "count" in resident else resident["shapes"].shape[0]
  case = jax.random.randint(k_case, (), 0, n)
  counts = resident["fg_counts"][case]  # [R]
  nonempty = counts > 0
  use_fg = nonempty.any() & (jax.random.uniform(k_fg) < fg_fraction)
  logits = jnp.where(nonempty, 0.0, -jnp.inf)
  region = jax.random.categorical(k_region, jnp.where(nonempty.any(), logits, 0.0))
  loc = jax.random.randint(k_loc, (), 0, jnp.maximum(counts[region], 1))
  fg_centre = resident["fg"][case, region, loc]
  shape = resident["shapes"][case]
  patch = jnp.asarray(patch, jnp.int32)
  lo = jnp.minimum(patch // 2, shape // 2)
  hi = jnp.maximum(shape - (patch - patch // 2), lo)
  uniform = jax.random.randint(k_uniform, (3,), lo, hi + 1)
  return case, jnp.where(use_fg, fg_centre, uniform).astype(jnp.int32)


def cut(resident: Resident, case, centre, patch: Sequence[int], crop: Sequence[int]) -> dict:
  """The crop around the clipped patch window: {'pre','post': [*crop, 1] f32, 'label': [*crop]}."""
  shape = resident["shapes"][case]
  patch_ = jnp.asarray(patch, jnp.int32)
  window = jnp.clip(centre - patch_ // 2, 0, jnp.maximum(shape - patch_, 0))
  # In the padded layout a case starts at the margin, so the crop (window − margin) starts
  # at the window itself.
  scans = jax.lax.dynamic_slice(resident["scans"], (case, *window, 0), (1, *crop, 2))[0]
  label = jax.lax.dynamic_slice(resident["labels"], (case, *window), (1, *crop))[0]
  scans = scans.astype(jnp.float32)
  return {"pre": scans[..., 0:1], "post": scans[..., 1:2], "label": label}


def sample_keys(seed: int, step: jax.Array, batch_size: int) -> jax.Array:
  """One key per row: (seed, step, row) alone decide a row's crop, on any number of devices."""
  step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _SAMPLE_STREAM), step)
  return jax.vmap(jax.random.fold_in, (None, 0))(step_key, jnp.arange(batch_size))


def sample_crops(
  resident: Resident,
  keys: jax.Array,
  patch: Sequence[int],
  crop: Sequence[int],
  fg_fraction: float,
) -> dict:
  """[B] keys -> the host pipeline's batch: {'pre','post': [B, *crop, 1], 'label': [B, *crop]}."""
  patch, crop = tuple(int(p) for p in patch), tuple(int(c) for c in crop)

  def row(key):
    case, centre = draw_centre(resident, key, patch, fg_fraction)
    return cut(resident, case, centre, patch, crop)

  if keys.shape[0] <= UNROLL_ROWS:
    rows = [row(keys[r]) for r in range(keys.shape[0])]
    return jax.tree.map(lambda *x: jnp.stack(x), *rows)
  return jax.vmap(row)(keys)


def sample_crops_on_mesh(
  resident: Resident,
  keys: jax.Array,
  mesh: jax.sharding.Mesh,
  layout: str,
  patch: Sequence[int],
  crop: Sequence[int],
  fg_fraction: float,
) -> dict:
  """`sample_crops` with each device cutting only its own batch rows (the batch split over
  'data' as the step splits it): from the whole set (``replicated``), or from its data
  shard's cases (``sharded``: the rows of shard d are drawn from shard d's cases)."""
  if layout not in ("replicated", "sharded"):
    raise ValueError(f"resident layout must be replicated or sharded, not {layout!r}")
  rows = P(sharding.DATA)
  local = jax.shard_map(
    functools.partial(sample_crops, patch=patch, crop=crop, fg_fraction=fg_fraction),
    mesh=mesh,
    in_specs=(rows if layout == "sharded" else P(), rows),
    out_specs=rows,
  )
  return local(resident, keys)


def marker(state: bytes | None) -> dict | None:
  """A checkpoint's data state read as a resident run's marker (None: a Grain position)."""
  try:
    value = json.loads(state) if state else None
  except ValueError:
    return None
  return value if isinstance(value, dict) and value.get("resident") == "device" else None


class ResidentStream:
  """Training's input when the data are resident: every step receives the same device
  arrays and draws its own crops from them (keys from the step number), so there is no
  position to save; its checkpoint state marks the run as resident, with its layout."""

  def __init__(self, arrays: Resident, layout: str, shards: int = 1):
    self.arrays, self.layout, self.shards = arrays, layout, shards

  def __iter__(self):
    return self

  def __next__(self) -> Resident:
    return self.arrays

  def get_state(self) -> bytes:
    return json.dumps({"resident": "device", "layout": self.layout, "shards": self.shards}).encode()

  def set_state(self, state: bytes) -> None:
    if marker(state) is None:
      raise DataError(
        "this checkpoint was written by a run whose crops came from the host pipeline, and "
        "data.resident now resolves to 'device' (another machine, or another "
        "resident_memory_fraction): resume it with --config.data.resident=host"
      )

  def start_prefetch(self) -> None:
    """Grain's checkpoint handler calls it after a restore: nothing to prefetch."""
