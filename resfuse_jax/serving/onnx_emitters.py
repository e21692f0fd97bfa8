"""Elementwise JAX primitives as ONNX: (translator, equation, input values) -> outputs.

Each emitter keeps its inputs' layout (`onnx_translate`): the op runs in its first
activation's layout, constants are transposed to it at export, scalars broadcast.
`onnx_shapes` has the reductions and layout operators, `onnx_convs` the contractions,
`onnx_gather` the gathers.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from resfuse_jax.serving.onnx_translate import NotExportable, Translator, Value, channels_first

EMITTERS: dict = {}  # JAX primitive name -> emitter; onnx_shapes and onnx_convs add theirs


def emits(*names: str):
  """Registers an emitter for these primitives (in every emitter module, this one table)."""

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
