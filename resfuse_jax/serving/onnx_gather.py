"""JAX's ``gather`` as ONNX: Slice where the indices are known, GatherND where they are data.

With a symbolic batch, ``jnp`` indexing lowers even ``x[..., 0]``, ``x[:, ::2]`` and
``f[:n]`` to ``gather``. Known indices that form a grid of per-axis index vectors (an
outer product) become one Slice (or Gather) per indexed axis in the operand's layout;
a single run-time start vector becomes Slices with dynamic starts. ``take_along_axis``
(batching dimensions, indices computed from data) becomes ``GatherND`` with
``batch_dims``, its "fill" mode kept exact by a validity mask.
"""

from __future__ import annotations

import numpy as np

from resfuse_jax.serving.onnx_translate import NotExportable, Translator, Value


def _mode(eqn) -> str:
  return str(eqn.params["mode"]).rsplit(".", 1)[-1].upper()


def gather(t: Translator, eqn, ins: list[Value]) -> list[Value]:
  x, idx = ins
  if eqn.params["dimension_numbers"].operand_batching_dims:
    return [batched_gather(t, eqn, x, idx)]
  return [sliced_gather(t, eqn, x, idx)]


def _constant_start(t: Translator, eqn, x: Value, a: int, comp: np.ndarray):
  """(start, varying batch axis or None, vector) of known component ``comp`` for axis ``a``."""
  size = eqn.params["slice_sizes"][a]
  if not isinstance(x.shape[a], int):  # the batch axis: only a start JAX need not clamp
    flat = comp.reshape(-1)
    if (flat == flat[0]).all() and (flat[0] == 0 or _mode(eqn) == "PROMISE_IN_BOUNDS"):
      return int(flat[0]), None, None
    raise NotExportable("gather along the symbolic batch axis with these indices")
  clipped = np.clip(comp, 0, x.shape[a] - size)
  if _mode(eqn) in ("FILL_OR_DROP", "ONE_HOT") and (clipped != comp).any():
    raise NotExportable("gather with out-of-bounds indices in fill mode has no ONNX form here")
  flat = clipped.reshape(-1)
  if (flat == flat[0]).all():
    return int(flat[0]), None, None
  varying = [b for b in range(clipped.ndim) if (np.diff(clipped, axis=b) != 0).any()]
  if len(varying) != 1 or size != 1:
    raise NotExportable("gather with indices that are not a grid of per-axis vectors")
  (b,) = varying
  vector = np.moveaxis(clipped, b, 0).reshape(clipped.shape[b], -1)[:, 0]
  return None, b, vector


def _dynamic_start(t: Translator, eqn, x: Value, a: int, idx: Value, j: int) -> str:
  """int64 [1] start of component ``j`` of a run-time index vector, clamped as JAX does."""
  name = t.op("Slice", [t.onnx(idx), t.int64s([j]), t.int64s([j + 1]), t.int64s([0])])
  name = t.op("Cast", [name], to=7)  # int64
  mode = _mode(eqn)
  if mode == "CLIP":
    limit = t.op("Sub", [t.dim(x.shape[a]), t.dim(eqn.params["slice_sizes"][a])])
    name = t.op("Max", [t.op("Min", [name, limit]), t.int64s([0])])
  elif mode != "PROMISE_IN_BOUNDS":
    raise NotExportable(f"gather with run-time indices in mode {mode} has no ONNX form here")
  return name


def sliced_gather(t: Translator, eqn, x: Value, idx: Value) -> Value:
  """Gathers whose indices are known, or one run-time start vector: Slices in x's layout."""
  dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  batch_shape = idx.shape[:-1]
  if not idx.known and batch_shape:
    raise NotExportable("gather with run-time indices of this form has no ONNX form here")
  base = t.onnx(x)
  name, tags, squeeze = base, {a: ("offset", a) for a in range(x.ndim)}, []
  static = {}  # ONNX axis -> (start, end, step): one Slice node for all of them
  for j, a in enumerate(dn.start_index_map):
    k = x.perm.index(a)
    if not idx.known:
      start = _dynamic_start(t, eqn, x, a, idx, j)
      ends = t.op("Add", [start, t.dim(sizes[a])])
      name = t.op("Slice", [name, start, ends, t.int64s([k])])
    else:
      start, b, vector = _constant_start(t, eqn, x, a, idx.const[..., j])
      step = int(vector[1] - vector[0]) if b is not None and len(vector) > 1 else 1
      if b is None:
        static[k] = (start, start + sizes[a], 1)
      elif step > 0 and (np.diff(vector) == step).all():
        static[k] = (int(vector[0]), int(vector[-1]) + 1, step)
      else:
        name = t.op("Gather", [name, t.int64s(vector)], axis=k)
      if b is not None:
        tags[a] = ("batch", b)
    if a in dn.collapsed_slice_dims and tags[a][0] == "offset":
      squeeze.append(k)
      tags.pop(a)
  for a in range(x.ndim):
    if a not in dn.start_index_map and not _full(sizes[a], x.shape[a]):
      static[x.perm.index(a)] = (0, sizes[a], 1)
  axes = sorted(static)
  node = None
  if axes:
    bounds = [t.shape_tensor([static[k][i] for k in axes]) for i in (0, 1)]
    node = ("Slice", [name, *bounds, t.int64s(axes), t.int64s([static[k][2] for k in axes])], {})
  if squeeze:
    name = t.op(*node[:2], **node[2]) if node else name
    name, node = t.op("Squeeze", [name, t.int64s(squeeze)]), None
  tags = [tags[a] for a in x.perm if a in tags]
  out = _relabel(t, eqn, None if node else name, tags, batch_shape, node)
  if node and out.perm == x.perm and name is base and _every_step(x, static):
    steps = [1] * x.ndim
    for k in axes:
      steps[x.perm[k]] = static[k][2]
    out.strided = (x, tuple(steps))  # x[::s]: a 1x1x1 Conv reads it by its strides
  return out


def _every_step(x: Value, static: dict) -> bool:
  """Whether each slice is x[::step] on its axis (what a strided 1x1x1 Conv reads)."""
  for k, (start, end, step) in static.items():
    dim = x.shape[x.perm[k]]
    if not (isinstance(end, int) and isinstance(dim, int) and start == 0 and dim - end < step):
      return False
  return True


def _full(size, dim) -> bool:
  try:
    return bool(size == dim)
  except Exception:  # jax's InconclusiveDimensionOperation
    return False


def _relabel(t: Translator, eqn, name, tags: list, batch_shape, node=None) -> Value:
  """The output layout from the tags of the ONNX axes (which operand or batch axis each is)."""
  dn = eqn.params["dimension_numbers"]
  out_ndim = len(eqn.outvars[0].aval.shape)
  offsets = [a for a in range(len(eqn.params["slice_sizes"])) if a not in dn.collapsed_slice_dims]
  position = dict(zip([("offset", a) for a in offsets], dn.offset_dims))
  batch_positions = [i for i in range(out_ndim) if i not in dn.offset_dims]
  position.update({("batch", b): i for b, i in enumerate(batch_positions)})
  missing = [tag for tag in position if tag not in tags]
  if any(tag[0] != "batch" or batch_shape[tag[1]] != 1 for tag in missing):
    raise NotExportable("gather whose output axes this translator cannot place")
  if missing:
    if name is None:
      name = t.op(node[0], node[1], **node[2])
    name = t.op("Unsqueeze", [name, t.int64s(list(range(len(tags), len(tags) + len(missing))))])
    tags, node = tags + missing, None
  perm = tuple(position[tag] for tag in tags)
  return Value(eqn.outvars[0].aval, name, perm=perm, node=node if name is None else None)


def batched_gather(t: Translator, eqn, x: Value, idx: Value) -> Value:
  """``take_along_axis``-style: leading batching dims, then the indexed axes -> GatherND."""
  dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  nb, k = len(dn.operand_batching_dims), idx.shape[-1]
  lead, indexed = tuple(range(nb)), tuple(range(nb, nb + k))
  trailing = range(nb + k, x.ndim)
  form = dn.operand_batching_dims == lead and dn.start_indices_batching_dims == lead
  form = form and tuple(dn.start_index_map) == indexed and tuple(dn.collapsed_slice_dims) == indexed
  form = form and all(_full(sizes[a], x.shape[a]) for a in trailing)
  form = form and tuple(dn.offset_dims) == tuple(range(idx.ndim - 1, idx.ndim - 1 + len(trailing)))
  if not form:
    raise NotExportable("gather with batching dimensions of this form has no ONNX form here")
  bounds = np.array([x.shape[a] - 1 for a in indexed], np.int64)
  indices = t.op("Cast", [t.onnx(idx)], to=7)  # int64
  clamped = t.op("Max", [t.op("Min", [indices, t.constant(bounds)]), t.int64s([0])])
  y = t.op("GatherND", [t.onnx(x), clamped], batch_dims=nb)
  mode = _mode(eqn)
  if mode == "FILL_OR_DROP":
    if not np.issubdtype(eqn.outvars[0].aval.dtype, np.floating):
      raise NotExportable("fill-mode gather of integers has no ONNX form here")
    fill = eqn.params["fill_value"]
    fill = np.nan if fill is None else fill
    inside = t.op("Cast", [t.op("Equal", [indices, clamped])], to=6)  # int32
    valid = t.op("Cast", [t.op("ReduceMin", [inside, t.int64s([-1])], keepdims=1)], to=9)
    extra = len(trailing) - 1
    if extra < 0:
      valid = t.op("Squeeze", [valid, t.int64s([-1])])
    elif extra > 0:
      valid = t.op("Unsqueeze", [valid, t.int64s(list(range(idx.ndim, idx.ndim + extra)))])
    dtype = eqn.outvars[0].aval.dtype
    y = t.op("Where", [valid, y, t.constant(np.asarray(fill, dtype))])
  elif mode not in ("CLIP", "PROMISE_IN_BOUNDS"):
    raise NotExportable(f"gather in mode {mode} has no ONNX form here")
  return Value(eqn.outvars[0].aval, y)
