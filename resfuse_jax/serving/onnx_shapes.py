"""Reductions and layout primitives as ONNX, each mapping JAX axes through the layout.

A reduction or slice names ONNX axes found through the value's layout, a transpose only
relabels axes, ``broadcast_in_dim`` stays lazy (`onnx_translate`), and a reshape that
only adds or drops size-1 axes keeps the layout; any other reshape reads JAX order.
"""

from __future__ import annotations

import numpy as np

from resfuse_jax.serving.onnx_emitters import (
  EMITTERS,
  common_perm,
  emits,
  onnx_dtype,
  out_value,
  same,
)
from resfuse_jax.serving.onnx_translate import NotExportable, Translator, Value, channels_first

# -- reductions and layout ops -------------------------------------------------------------


def drop_axes(perm: tuple[int, ...], axes) -> tuple[int, ...]:
  """The layout left when ``axes`` (JAX axes) are removed: the rest renumbered in order."""
  axes = set(axes)
  return tuple(a - sum(b < a for b in axes) for a in perm if a not in axes)


def _reduce(op_type: str):
  def emit(t, eqn, ins):
    (x,), axes = ins, eqn.params["axes"]
    onnx_axes = [x.perm.index(a) for a in axes]
    y = t.op(op_type, [t.onnx(x), t.int64s(onnx_axes)], keepdims=0)
    return [out_value(eqn, y, drop_axes(x.perm, axes))]

  return emit


for _jax, _onnx in {
  "reduce_sum": "ReduceSum",
  "reduce_max": "ReduceMax",
  "reduce_min": "ReduceMin",
  "reduce_prod": "ReduceProd",
}.items():
  EMITTERS[_jax] = _reduce(_onnx)


@emits("argmax", "argmin")
def _argmax(t, eqn, ins):
  (x,), (axis,) = ins, eqn.params["axes"]
  op_type = "ArgMax" if eqn.primitive.name == "argmax" else "ArgMin"
  y = t.op(op_type, [t.onnx(x)], axis=x.perm.index(axis), keepdims=0)
  y = t.op("Cast", [y], to=onnx_dtype(eqn.params["index_dtype"]))
  return [out_value(eqn, y, drop_axes(x.perm, (axis,)))]


@emits("transpose")
def _transpose(t, eqn, ins):
  """Free: the data stays, only which JAX axis each ONNX axis holds changes."""
  (x,), permutation = ins, eqn.params["permutation"]
  new_axis = {a: i for i, a in enumerate(permutation)}
  return [out_value(eqn, t.lazy(x), tuple(new_axis[a] for a in x.perm), x.implicit)]


@emits("broadcast_in_dim")
def _broadcast_in_dim(t, eqn, ins):
  """Lazy: the operand gains size-1 axes in the output's layout; ONNX broadcasts the rest."""
  x, dims = ins[0], eqn.params["broadcast_dimensions"]
  shape = tuple(eqn.params["shape"])
  perm = channels_first(len(shape))
  order = tuple(sorted(range(x.ndim), key=lambda i: perm.index(dims[i])))
  new_axes = [k for k, a in enumerate(perm) if a not in dims]
  expands = x.implicit or any(shape[a] != 1 for a in perm if a not in dims)
  expands = expands or any(x.shape[i] != shape[dims[i]] for i in range(x.ndim))
  if x.known:
    onnx_shape = [1 if a not in dims else x.shape[dims.index(a)] for a in perm]
    name = t.constant(np.transpose(x.const, order).reshape(onnx_shape))
    return [out_value(eqn, name, perm, expands)]
  name = t.lazy(x, order)
  if new_axes:
    name = t.op("Unsqueeze", [name, t.int64s(new_axes)])
  return [out_value(eqn, name, perm, expands)]


def unit_reshape(t: Translator, x: Value, eqn) -> Value | None:
  """A reshape that only adds or drops size-1 axes, kept in ``x``'s layout; else None."""
  new = tuple(eqn.outvars[0].aval.shape)
  old_axes = [i for i, d in enumerate(x.shape) if not (isinstance(d, int) and d == 1)]
  new_axes = [j for j, d in enumerate(new) if not (isinstance(d, int) and d == 1)]
  if [x.shape[i] for i in old_axes] != [new[j] for j in new_axes]:
    return None
  to_new = dict(zip(old_axes, new_axes))
  order = [to_new[a] for a in x.perm if a in to_new]
  perm = channels_first(len(new))
  if [a for a in perm if a in new_axes] != order:
    perm = (*order, *[j for j in range(len(new)) if j not in new_axes])
  name = t.op("Reshape", [t.onnx(x), t.shape_tensor([new[a] for a in perm], reshape=True)])
  return out_value(eqn, name, perm)


@emits("reshape")
def _reshape(t, eqn, ins):
  x = ins[0]
  if eqn.params.get("dimensions") is not None:
    raise NotExportable("reshape with dimensions has no ONNX form here")
  kept = unit_reshape(t, x, eqn)
  if kept is not None:
    return [kept]
  new = eqn.outvars[0].aval.shape
  name = t.op("Reshape", [t.onnx(x, range(x.ndim)), t.shape_tensor(new, reshape=True)])
  return [out_value(eqn, name)]


@emits("squeeze", "expand_dims")
def _squeeze(t, eqn, ins):
  return [unit_reshape(t, ins[0], eqn)]


@emits("concatenate")
def _concatenate(t, eqn, ins):
  perm = common_perm(ins[0].ndim, ins)
  axis = perm.index(eqn.params["dimension"])
  return [out_value(eqn, t.op("Concat", [t.onnx(v, perm) for v in ins], axis=axis), perm)]


@emits("stack")
def _stack(t, eqn, ins):
  """The new axis goes first in ONNX order; the stacked values keep their layout."""
  perm, axis = common_perm(ins[0].ndim, ins), eqn.params["axis"]
  parts = [t.op("Unsqueeze", [t.onnx(v, perm), t.int64s([0])]) for v in ins]
  out_perm = (axis, *[a if a < axis else a + 1 for a in perm])
  return [out_value(eqn, t.op("Concat", parts, axis=0), out_perm)]


@emits("split")
def _split(t, eqn, ins):
  (x,), axis = ins, eqn.params["axis"]
  sizes = t.shape_tensor(eqn.params["sizes"])
  outs = t.op("Split", [t.onnx(x), sizes], len(eqn.outvars), axis=x.perm.index(axis))
  outs = [outs] if isinstance(outs, str) else outs
  return [out_value(eqn, o, x.perm, index=i) for i, o in enumerate(outs)]


@emits("slice")
def _slice(t, eqn, ins):
  (x,), p = ins, eqn.params
  strides = p["strides"] or (1,) * x.ndim
  axes = [
    a
    for a in range(x.ndim)
    if not same(p["start_indices"][a], 0)
    or not same(p["limit_indices"][a], x.shape[a])
    or strides[a] != 1
  ]
  if not axes:
    return [out_value(eqn, t.onnx(x), x.perm)]
  starts = t.shape_tensor([p["start_indices"][a] for a in axes])
  ends = t.shape_tensor([p["limit_indices"][a] for a in axes])
  onnx_axes = t.int64s([x.perm.index(a) for a in axes])
  steps = t.int64s([strides[a] for a in axes])
  return [out_value(eqn, t.op("Slice", [t.onnx(x), starts, ends, onnx_axes, steps]), x.perm)]


@emits("rev")
def _rev(t, eqn, ins):
  (x,), dims = ins, eqn.params["dimensions"]
  n = len(dims)
  big = np.iinfo(np.int64)
  inputs = [t.onnx(x), t.int64s([-1] * n), t.int64s([big.min] * n)]
  inputs += [t.int64s([x.perm.index(a) for a in dims]), t.int64s([-1] * n)]
  return [out_value(eqn, t.op("Slice", inputs), x.perm)]


@emits("pad")
def _pad(t, eqn, ins):
  (x, value), config = ins, eqn.params["padding_config"]
  if any(interior for _, _, interior in config):
    raise NotExportable("pad with interior padding has no ONNX form here")
  pads = [config[a][0] for a in x.perm] + [config[a][1] for a in x.perm]
  y = t.op("Pad", [t.onnx(x), t.int64s(pads), t.onnx(value)], mode="constant")
  return [out_value(eqn, y, x.perm)]


@emits("iota")
def _iota(t, eqn, ins):
  p, aval = eqn.params, eqn.outvars[0].aval
  shape, dim = tuple(p["shape"]), p["dimension"]
  one = np.ones((), np.int64)
  size = t.op("Reshape", [t.dim(shape[dim]), t.int64s([])])
  r = t.op("Range", [t.constant(0 * one), size, t.constant(one)])
  r = t.op("Cast", [r], to=onnx_dtype(aval.dtype))
  others = [k for k in range(len(shape)) if k != dim]
  if others:
    r = t.op("Unsqueeze", [r, t.int64s(others)])
  return [out_value(eqn, r, implicit=len(shape) > 1)]


@emits("dim_as_value")
def _dim_as_value(t, eqn, ins):
  aval = eqn.outvars[0].aval
  scalar = t.op("Reshape", [t.dim(eqn.params["dim"]), t.int64s([])])
  return [out_value(eqn, t.op("Cast", [scalar], to=onnx_dtype(aval.dtype)))]
