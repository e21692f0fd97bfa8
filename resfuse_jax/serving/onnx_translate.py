"""A traced jaxpr as ONNX nodes: one emitter per JAX primitive (`onnx_emitters`).

The translator walks the jaxpr once. Values known at export time (parameters, iota,
kernel rearrangements) are folded by JAX itself, so only the work on activations
becomes nodes. Every value carries a layout: which JAX axis each ONNX axis holds.
The graph's inputs arrive channel-first (NCDHW), convolutions read and write that
layout, and elementwise ops, reductions and broadcasts follow it, so the 5-D
activations of an NDHWC model need no Transpose around each convolution. A
``broadcast_in_dim`` stays lazy (size-1 axes that ONNX broadcasts) until an operator
that does not broadcast reads it. The batch axis may be symbolic (``jax.export``'s
``n``): shapes that depend on it are computed from the first input's shape at run time.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import helper, numpy_helper

from resfuse_jax.errors import ConfigError


class NotExportable(ConfigError):
  """The traced model uses something this translator has no ONNX form for."""


@dataclasses.dataclass
class Value:
  """One jaxpr variable: an ONNX tensor (``name``) or a value known at export (``const``).

  ``perm[k]`` is the JAX axis that ONNX axis ``k`` holds. ``implicit``: the ONNX tensor
  keeps size 1 on axes the JAX value broadcasts (a lazy ``broadcast_in_dim``). ``node``:
  a node not yet emitted (op_type, inputs, attributes), so a consumer may emit a fused
  form instead (a convolution with its bias); ``strided``: (source, step per JAX axis)
  when the value is ``source[::s0, ::s1, ...]``, which a 1x1x1 Conv reads by its strides.
  """

  aval: Any
  name: str | None = None
  const: np.ndarray | None = None
  perm: tuple[int, ...] | None = None
  implicit: bool = False
  node: tuple[str, list[str], dict] | None = None
  strided: tuple[Value, tuple[int, ...]] | None = None

  def __post_init__(self):
    if self.perm is None:
      self.perm = tuple(range(self.ndim))

  @property
  def shape(self) -> tuple:
    return tuple(self.aval.shape)

  @property
  def ndim(self) -> int:
    return len(self.aval.shape)

  @property
  def known(self) -> bool:
    return self.const is not None


Emitter = Callable[["Translator", Any, list[Value]], Sequence[Value]]


def channels_first(ndim: int) -> tuple[int, ...]:
  """The layout 5-D (and 3-D, 4-D) activations take: batch, channels (last in JAX), space."""
  if ndim < 3:
    return tuple(range(ndim))
  return (0, ndim - 1, *range(1, ndim - 1))


def inner_jaxpr(eqn) -> tuple[Any, list] | None:
  """(jaxpr, consts) of a call-like equation (jit, custom_jvp/vjp, checkpoint), else None."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is None:
      continue
    if hasattr(sub, "consts"):  # ClosedJaxpr
      return sub.jaxpr, list(sub.consts)
    if hasattr(sub, "eqns"):
      return sub, []
  return None


def is_concrete(shape) -> bool:
  return all(isinstance(d, (int, np.integer)) for d in shape)


class Translator:
  """Builds nodes and initializers; ``batch``: (input name, axis) holding the symbolic dim."""

  def __init__(
    self,
    emitters: Mapping[str, Emitter],
    composites: Mapping[str, Emitter],
    batch: tuple[str, int],
  ):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self.emitters, self.composites, self.batch = emitters, composites, batch
    self._names = itertools.count()
    self._dims: dict[str, str] = {}

  # -- nodes and constants ---------------------------------------------------------------

  def fresh(self, hint: str) -> str:
    return f"{hint}_{next(self._names)}"

  def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> Any:
    outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
    self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))
    return outputs[0] if n_out == 1 else outputs

  def constant(self, array, hint: str = "c") -> str:
    name = self.fresh(hint)
    self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
    return name

  def used_initializers(self) -> list[onnx.TensorProto]:
    """The initializers some node reads (a fused consumer leaves its pending node's unread)."""
    read = {name for node in self.nodes for name in node.input}
    return [i for i in self.initializers if i.name in read]

  def int64s(self, values) -> str:
    return self.constant(np.asarray(values, np.int64), "i")

  # -- shapes with a symbolic batch ------------------------------------------------------

  def dim(self, d) -> str:
    """An int64 [1] tensor holding dimension ``d`` (an int, or linear in the batch)."""
    if isinstance(d, (int, np.integer)):
      return self.int64s([int(d)])
    key = str(d)
    if key not in self._dims:
      (var,) = d._get_vars()
      b, a = d._evaluate({var: 0}), d._evaluate({var: 1}) - d._evaluate({var: 0})
      if d._evaluate({var: 2}) != 2 * a + b:
        raise NotExportable(f"dimension {d} is not linear in the batch; no ONNX form")
      input_name, axis = self.batch
      name = self.op("Shape", [input_name], start=axis, end=axis + 1)
      if a != 1:
        name = self.op("Mul", [name, self.int64s([a])])
      if b:
        name = self.op("Add", [name, self.int64s([b])])
      self._dims[key] = name
    return self._dims[key]

  def shape_tensor(self, dims: Sequence, reshape: bool = False) -> str:
    """int64 [k] tensor of ``dims``; for Reshape, one symbolic dim becomes -1 (static)."""
    symbolic = [i for i, d in enumerate(dims) if not isinstance(d, (int, np.integer))]
    if not symbolic:
      return self.int64s([int(d) for d in dims])
    if reshape and len(symbolic) == 1:
      return self.int64s([-1 if i in symbolic else int(d) for i, d in enumerate(dims)])
    return self.op("Concat", [self.dim(d) for d in dims], axis=0)

  # -- layouts ---------------------------------------------------------------------------

  def lazy(self, v: Value, perm: Sequence[int] | None = None) -> str:
    """``v`` as an ONNX tensor in layout ``perm``, broadcast axes possibly left at size 1."""
    perm = v.perm if perm is None else tuple(perm)
    if v.known:
      return self.constant(np.transpose(v.const, perm))
    if v.name is None:  # emitted on first use: no consumer fused it
      op_type, inputs, attrs = v.node
      v.name = self.op(op_type, inputs, **attrs)
    if perm == v.perm:
      return v.name
    return self.op("Transpose", [v.name], perm=[v.perm.index(a) for a in perm])

  def onnx(self, v: Value, perm: Sequence[int] | None = None) -> str:
    """``v`` as an ONNX tensor of its full shape in layout ``perm`` (default its own)."""
    perm = v.perm if perm is None else tuple(perm)
    if v.implicit and not v.known:
      full = self.op("Expand", [v.name, self.shape_tensor([v.shape[a] for a in v.perm])])
      v = dataclasses.replace(v, name=full, implicit=False)
    return self.lazy(v, perm)

  # -- walking ---------------------------------------------------------------------------

  def run(self, jaxpr, inputs: Sequence[Value], consts: Sequence = ()) -> list[Value]:
    env: dict[Any, Value] = {}
    for var, c in zip(jaxpr.constvars, consts):
      env[var] = Value(var.aval, const=np.asarray(c))
    env.update(zip(jaxpr.invars, inputs))

    def read(var) -> Value:
      if isinstance(var, jax_core.Literal):
        return Value(var.aval, const=np.asarray(var.val, var.aval.dtype))
      return env[var]

    for eqn in jaxpr.eqns:
      outs = self.equation(eqn, [read(v) for v in eqn.invars])
      for var, out in zip(eqn.outvars, outs):
        env[var] = out
    return [read(v) for v in jaxpr.outvars]

  def equation(self, eqn, ins: list[Value]) -> Sequence[Value]:
    name = eqn.primitive.name
    known = all(v.known for v in ins)
    sub = inner_jaxpr(eqn)
    if sub is not None:
      composite = self.composites.get(str(eqn.params.get("name", "")).split(":")[0])
      if composite is not None and not known:
        return composite(self, eqn, ins)
      return self.run(sub[0], ins, sub[1])
    if known and not symbolic_params(eqn) and all(is_concrete(v.aval.shape) for v in eqn.outvars):
      return fold(eqn, ins)
    emitter = self.emitters.get(name)
    if emitter is None:
      raise NotExportable(
        f"the JAX primitive {name!r} has no ONNX emitter (resfuse_jax.serving.onnx_emitters); "
        "add one, or export without ONNX (export --onnx=no)"
      )
    return emitter(self, eqn, ins)


def symbolic_params(eqn) -> bool:
  """Whether a parameter holds a symbolic dimension (``dim_as_value``, a reshape to ``n``)."""

  def symbolic(p) -> bool:
    if isinstance(p, (tuple, list)):
      return any(symbolic(q) for q in p)
    return hasattr(p, "_get_vars")

  return any(symbolic(p) for p in eqn.params.values())


def fold(eqn, ins: list[Value]) -> list[Value]:
  """Evaluates an equation whose inputs are all known, with JAX itself."""
  out = eqn.primitive.bind(*[jnp.asarray(v.const) for v in ins], **eqn.params)
  outs = out if eqn.primitive.multiple_results else [out]
  return [Value(var.aval, const=np.asarray(o)) for var, o in zip(eqn.outvars, outs)]
