"""One ONNX emitter per JAX primitive: (translator, equation, input values) -> output values.

Emitters keep the layout of their inputs where the operator allows (see
`onnx_translate`): an elementwise op runs in its first activation's layout, a reduction
maps its axes, a transpose only relabels axes. Convolutions and 1x1x1 ``dot_general``
(``nn.Dense`` over channels) become ``Conv``/``ConvTranspose`` on channel-first tensors.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from resfuse_jax.serving import onnx_gather
from resfuse_jax.serving.onnx_translate import (
  NotExportable,
  Translator,
  Value,
  channels_first,
  is_concrete,
)

EMITTERS: dict = {}


def emits(*names: str):
  def register(fn):
    for name in names:
      EMITTERS[name] = fn
    return fn

  return register


def out_value(eqn, name: str, perm=None, implicit: bool = False, index: int = 0) -> Value:
  return Value(eqn.outvars[index].aval, name, perm=perm, implicit=implicit)


def onnx_dtype(dtype) -> int:
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# -- elementwise ---------------------------------------------------------------------------


def common_perm(ndim: int, ins: list[Value]) -> tuple[int, ...]:
  """The layout an elementwise op runs in: its first full activation's, else channels first."""
  for want_exact in (True, False):
    for v in ins:
      if not v.known and v.ndim == ndim and (not want_exact or not v.implicit):
        return v.perm
  return channels_first(ndim)


def elementwise(t: Translator, op_type: str, ins: list[Value], aval, **attrs) -> Value:
  """``op_type`` over ``ins`` (ONNX broadcasting; scalars as they are) in a common layout."""
  ndim = len(aval.shape)
  perm = common_perm(ndim, ins)
  names = [t.lazy(v, perm) if v.ndim == ndim else t.onnx(v) for v in ins]
  exact = any(not v.implicit and v.shape == tuple(aval.shape) for v in ins)
  return Value(aval, t.op(op_type, names, **attrs), perm=perm, implicit=not exact)


def _unary(op_type: str):
  return lambda t, eqn, ins: [elementwise(t, op_type, ins, eqn.outvars[0].aval)]


def _binary(op_type: str):
  return lambda t, eqn, ins: [elementwise(t, op_type, ins, eqn.outvars[0].aval)]


for _jax, _onnx in {
  "exp": "Exp",
  "log": "Log",
  "logistic": "Sigmoid",
  "tanh": "Tanh",
  "sqrt": "Sqrt",
  "abs": "Abs",
  "neg": "Neg",
  "sign": "Sign",
  "floor": "Floor",
  "ceil": "Ceil",
  "erf": "Erf",
  "not": "Not",
  "sin": "Sin",
  "cos": "Cos",
}.items():
  EMITTERS[_jax] = _unary(_onnx)
for _jax, _onnx in {
  "sub": "Sub",
  "mul": "Mul",
  "div": "Div",
  "pow": "Pow",
  "min": "Min",
  "and": "And",
  "or": "Or",
  "xor": "Xor",
  "lt": "Less",
  "le": "LessOrEqual",
  "gt": "Greater",
  "ge": "GreaterOrEqual",
  "eq": "Equal",
}.items():
  EMITTERS[_jax] = _binary(_onnx)


@emits("max")
def _max(t, eqn, ins):
  """``max(x, 0)`` is ReLU, which runtimes fuse into the convolution before it."""
  aval = eqn.outvars[0].aval
  zero = [v for v in ins if v.known and v.const.size == 1 and float(v.const.reshape(())) == 0.0]
  if zero and np.issubdtype(aval.dtype, np.floating):
    (x,) = [v for v in ins if v is not zero[0]]
    if x.shape == tuple(aval.shape):
      return [elementwise(t, "Relu", [x], aval)]
  return [elementwise(t, "Max", ins, aval)]


@emits("ne")
def _ne(t, eqn, ins):
  equal = elementwise(t, "Equal", ins, eqn.outvars[0].aval)
  return [elementwise(t, "Not", [equal], eqn.outvars[0].aval)]


@emits("square")
def _square(t, eqn, ins):
  return [elementwise(t, "Mul", [ins[0], ins[0]], eqn.outvars[0].aval)]


@emits("integer_pow")
def _integer_pow(t, eqn, ins):
  y, aval = eqn.params["y"], eqn.outvars[0].aval
  exponent = Value(jax_scalar(aval.dtype), const=np.asarray(abs(y), aval.dtype))
  x = elementwise(t, "Pow", [ins[0], exponent], aval) if abs(y) != 1 else ins[0]
  return [elementwise(t, "Reciprocal", [x], aval) if y < 0 else x]


@emits("rsqrt")
def _rsqrt(t, eqn, ins):
  aval = eqn.outvars[0].aval
  return [elementwise(t, "Reciprocal", [elementwise(t, "Sqrt", ins, aval)], aval)]


@emits("select_n")
def _select_n(t, eqn, ins):
  pred, *cases = ins
  if len(cases) != 2:
    raise NotExportable(f"select_n with {len(cases)} cases has no ONNX form here")
  if pred.aval.dtype != np.bool_:
    one = Value(jax_scalar(pred.aval.dtype), const=np.asarray(1, pred.aval.dtype))
    pred = elementwise(t, "Equal", [pred, one], pred.aval.update(dtype=np.bool_))
  return [elementwise(t, "Where", [pred, cases[1], cases[0]], eqn.outvars[0].aval)]


@emits("clamp")
def _clamp(t, eqn, ins):
  lo, x, hi = ins
  aval = eqn.outvars[0].aval
  return [elementwise(t, "Max", [elementwise(t, "Min", [x, hi], aval), lo], aval)]


@emits("convert_element_type")
def _convert(t, eqn, ins):
  (x,), aval = ins, eqn.outvars[0].aval
  if np.dtype(x.aval.dtype) == np.dtype(aval.dtype):
    return [Value(aval, None if x.known else t.lazy(x), x.const, x.perm, x.implicit)]
  return [elementwise(t, "Cast", [x], aval, to=onnx_dtype(aval.dtype))]


@emits("stop_gradient", "copy", "copy_p", "optimization_barrier", "sharding_constraint")
def _identity(t, eqn, ins):
  return [
    Value(o.aval, None if v.known else t.lazy(v), v.const, v.perm, v.implicit)
    for o, v in zip(eqn.outvars, ins)
  ]


def same(a, b) -> bool:
  """Dimension equality that holds for symbolic dimensions too (unknown: not the same)."""
  try:
    return bool(a == b)
  except Exception:  # jax's InconclusiveDimensionOperation
    return False


def jax_scalar(dtype):
  import jax

  return jax.core.ShapedArray((), dtype)


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


# -- contractions --------------------------------------------------------------------------


@emits("conv_general_dilated")
def _conv(t, eqn, ins):
  """Conv (or ConvTranspose for an input-dilated conv) reading and writing channels first."""
  (x, kernel), p = ins, eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  if p["batch_group_count"] != 1:
    raise NotExportable("conv_general_dilated with batch_group_count > 1 has no ONNX form here")
  if not kernel.known:
    raise NotExportable("a convolution whose kernel is computed at run time has no ONNX form here")
  w = np.transpose(kernel.const, rhs_spec)  # [O, I, *k]
  lo, hi = [lo for lo, _ in p["padding"]], [hi for _, hi in p["padding"]]
  inputs = [t.onnx(x, lhs_spec)]
  if all(d == 1 for d in p["lhs_dilation"]):
    if min(lo + hi) < 0:
      raise NotExportable("a convolution with negative padding has no ONNX form here")
    attrs = {
      "kernel_shape": list(w.shape[2:]),
      "strides": list(p["window_strides"]),
      "pads": lo + hi,
      "dilations": list(p["rhs_dilation"]),
      "group": p["feature_group_count"],
    }
    return [pending(eqn, ("Conv", [*inputs, t.constant(w, "w")], attrs), tuple(out_spec))]
  return [pending(eqn, conv_transpose(t, inputs[0], w, p, lo, hi), tuple(out_spec))]


def pending(eqn, node: tuple, perm) -> Value:
  """A convolution emitted on first use, so a bias ``add`` can become its third input."""
  return Value(eqn.outvars[0].aval, perm=perm, node=node)


@emits("add")
def _add(t, eqn, ins):
  """conv + per-channel constant -> the convolution with a bias (as the hand graph had)."""
  aval = eqn.outvars[0].aval
  for conv, bias in (ins, ins[::-1]):
    node = conv.node if conv.name is None else None
    if node is None or len(node[1]) != 2 or not bias.known or conv.shape != tuple(aval.shape):
      continue
    channel = conv.perm[1]
    ones = [d for a, d in enumerate(bias.const.shape) if a != channel]
    if bias.const.ndim == conv.ndim and all(d == 1 for d in ones):
      vector = bias.const.reshape(-1).astype(np.float32)
      if len(vector) == conv.shape[channel]:
        name = t.op(node[0], [*node[1], t.constant(vector, "b")], **node[2])
        return [Value(aval, name, perm=conv.perm)]
  return [elementwise(t, "Add", ins, aval)]


def conv_transpose(t: Translator, x: str, w: np.ndarray, p, lo, hi) -> tuple:
  """A conv over the stride-dilated input is ConvTranspose with the taps flipped, I <-> O."""
  k = list(w.shape[2:])
  begin = [kk - 1 - a for kk, a in zip(k, lo)]
  end = [kk - 1 - b for kk, b in zip(k, hi)]
  plain = all(s == 1 for s in p["window_strides"]) and all(d == 1 for d in p["rhs_dilation"])
  if not plain or p["feature_group_count"] != 1 or min(begin + end) < 0:
    raise NotExportable("this input-dilated convolution has no ONNX ConvTranspose form")
  spatial = tuple(range(2, w.ndim))
  flipped = np.flip(w, spatial).transpose(1, 0, *spatial)  # [I, O, *k]
  attrs = {"kernel_shape": k, "strides": list(p["lhs_dilation"]), "pads": begin + end}
  return "ConvTranspose", [x, t.constant(np.ascontiguousarray(flipped), "w")], attrs


@emits("dot_general")
def _dot_general(t, eqn, ins):
  """A known [I, O] matrix over one axis of a >= 3-D activation is a 1x1x1 Conv; else Einsum."""
  (x, w), p = ins, eqn.params
  ((lc, rc), (lb, rb)) = p["dimension_numbers"]
  if w.known and w.ndim == 2 and not lb and len(lc) == 1 and x.ndim >= 3 and not x.known:
    c = lc[0]
    rest = [a for a in x.perm if a != c]
    perm = (rest[0], c, *rest[1:])
    matrix = w.const.T if rc[0] == 0 else w.const  # [O, I]
    kernel = matrix.reshape(*matrix.shape, *[1] * (x.ndim - 2))
    strides = [1] * (x.ndim - 2)
    if x.strided is not None and x.strided[1][perm[0]] == x.strided[1][c] == 1:
      x, steps = x.strided  # x[::s] read by the convolution's strides
      strides = [steps[a] for a in perm[2:]]
    attrs = {"kernel_shape": [1] * (x.ndim - 2), "strides": strides}
    node = ("Conv", [t.onnx(x, perm), t.constant(kernel, "w")], attrs)
    new = [a - (a > c) for a in rest]
    return [pending(eqn, node, (new[0], x.ndim - 1, *new[1:]))]
  return [einsum(t, eqn, x, w, lc, rc, lb, rb)]


def einsum(t: Translator, eqn, x: Value, w: Value, lc, rc, lb, rb) -> Value:
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  xs, ws = [next(letters) for _ in range(x.ndim)], [None] * w.ndim
  for a, b in zip(lc, rc):
    ws[b] = xs[a]
  for a, b in zip(lb, rb):
    ws[b] = xs[a]
  ws = [s or next(letters) for s in ws]
  out = [xs[a] for a in lb]
  out += [s for a, s in enumerate(xs) if a not in lc and a not in lb]
  out += [s for b, s in enumerate(ws) if b not in rc and b not in rb]
  equation = f"{''.join(xs)},{''.join(ws)}->{''.join(out)}"
  names = [t.onnx(x, range(x.ndim)), t.onnx(w, range(w.ndim))]
  return out_value(eqn, t.op("Einsum", names, equation=equation))


EMITTERS["gather"] = onnx_gather.gather
__all__ = ["EMITTERS", "is_concrete"]
