"""A model's window function as an ONNX graph, produced from the model itself.

For serving without JAX (onnxruntime, OpenVINO, TensorRT, Triton, C++ or .NET). The
registered Flax model is traced with `jax.make_jaxpr` (symbolic batch ``n``) and the
jaxpr translated primitive by primitive (`onnx_translate`, `onnx_emitters`), so a
change to a module reaches the graph with no second copy of the architecture. Two
choices keep the graph as fast as a hand-written one (BUILD_NOTES, "Redesign 2: ONNX
from the model itself"): the model is traced with the textbook conv plan (`EXPORT_PLAN`:
stride-2 Conv and ConvTranspose, which every runtime has kernels for, instead of the
space-to-depth rewrites XLA needs), and each ``flax.linen.InstanceNorm`` is traced as a
named call that becomes one ``InstanceNormalization``. Every conv plan computes the
same function from the same parameters.

Graph: ``pre``, ``post`` float32 [n, 1, d, h, w] -> ``logits`` and ``probabilities``
(sigmoid) float32 [n, R, d, h, w], ``n`` symbolic, the window fixed. The graph is
float32 whatever ``train.compute_dtype`` the model was trained in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper

from resfuse_jax.inference.onnx_runtime import INPUTS, OUTPUTS
from resfuse_jax.models import convolution
from resfuse_jax.serving import onnx_convs, onnx_emitters, onnx_gather, onnx_shapes  # noqa: F401  (they register emitters)
from resfuse_jax.serving.onnx_translate import NotExportable, Translator, Value, channels_first

__all__ = ["EXPORT_PLAN", "INPUTS", "IR_VERSION", "NotExportable", "OPSET", "OUTPUTS", "to_onnx"]

OPSET = 18  # Split's num_outputs, Reduce* axes as inputs; unchanged up to opset 23
IR_VERSION = 8  # the oldest IR that carries opset 18: the widest runtime support
# Fastest under onnxruntime and OpenVINO (benchmarks/onnx_routes.py): textbook operators.
EXPORT_PLAN = convolution.ConvPlan(conv="xla", downsample="strided", upsample="transpose")
NORM_CALL = "instance_norm"  # the name of the traced call; ":<epsilon>" follows it
# One table: onnx_shapes and onnx_convs register their emitters into onnx_emitters' on import.
EMITTERS = {**onnx_emitters.EMITTERS, "gather": onnx_gather.gather}


class _NormsAsCalls:
  """A Flax interceptor: each InstanceNorm runs as ``jit`` named ``instance_norm:<eps>``,
  computing Flax's own function, so the translator sees the module, not its arithmetic."""

  def __init__(self):
    self.inside = False

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    plain = (
      type(module) is nn.InstanceNorm
      and context.method_name == "__call__"
      and module.use_scale
      and module.use_bias
      and module.axis_name is None
      and tuple(np.atleast_1d(module.feature_axes)) == (-1,)
    )
    if self.inside or not plain or len(args) != 1 or kwargs:
      return next_fun(*args, **kwargs)
    params = module.variables["params"]
    unbound = module.clone(parent=None)

    def norm(x, scale, bias):
      self.inside = True
      try:
        return unbound.apply({"params": {"scale": scale, "bias": bias}}, x)
      finally:
        self.inside = False

    norm.__name__ = f"{NORM_CALL}:{module.epsilon!r}"
    return jax.jit(norm)(args[0], params["scale"], params["bias"])


def instance_norm(t: Translator, eqn, ins: list[Value]) -> list[Value]:
  """The traced ``instance_norm`` call -> InstanceNormalization on channels-first x."""
  x, scale, bias = ins
  epsilon = float(str(eqn.params["name"]).split(":", 1)[1])
  perm = channels_first(x.ndim)
  inputs = [t.onnx(x, perm), t.onnx(scale), t.onnx(bias)]
  y = t.op("InstanceNormalization", inputs, epsilon=epsilon)
  return [Value(eqn.outvars[0].aval, y, perm=perm)]


def export_form(model: nn.Module, plan: convolution.ConvPlan = EXPORT_PLAN) -> nn.Module:
  """``model`` computing in float32 with ``plan``, without remat (same parameters)."""
  fields = {f.name for f in dataclasses.fields(model)}
  changes = {"conv_impl": plan, "dtype": jnp.float32, "remat": False}
  return model.clone(**{k: v for k, v in changes.items() if k in fields})


def trace(model: nn.Module, params: Any, window, fuse_norms: bool = True):
  """The closed jaxpr of (params, pre, post) -> (logits, probabilities), batch symbolic."""
  (n,) = jax.export.symbolic_shape("n")
  tile = jax.ShapeDtypeStruct((n, *window, 1), jnp.float32)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32), params)

  def window_fn(p, pre, post):
    logits = model.apply({"params": p}, pre, post)
    return logits, jax.nn.sigmoid(logits)

  if not fuse_norms:
    return jax.make_jaxpr(window_fn)(shapes, tile, tile)
  with nn.intercept_methods(_NormsAsCalls()):
    return jax.make_jaxpr(window_fn)(shapes, tile, tile)


def graph_nodes(model, params, window, plan, fuse_norms) -> Translator:
  """The translated nodes; the graph's outputs are named `OUTPUTS`."""
  model = export_form(model, plan)
  closed = trace(model, params, window, fuse_norms)
  leaves = jax.tree.leaves(params)
  composites = {NORM_CALL: instance_norm} if fuse_norms else {}
  t = Translator(EMITTERS, composites, batch=(INPUTS[0], 0))
  invars = closed.jaxpr.invars
  values = [Value(v.aval, const=np.asarray(p, np.float32)) for v, p in zip(invars, leaves)]
  values += [Value(v.aval, name, perm=channels_first(5)) for v, name in zip(invars[-2:], INPUTS)]
  outs = t.run(closed.jaxpr, values, closed.consts)
  for out, name in zip(outs, OUTPUTS):
    t.nodes.append(helper.make_node("Identity", [t.onnx(out, channels_first(out.ndim))], [name]))
  return t


def to_onnx(
  model: nn.Module,
  params: Any,
  window: tuple[int, int, int],
  name: str = "",
  metadata: Mapping[str, str] | None = None,
  *,
  plan: convolution.ConvPlan = EXPORT_PLAN,
  fuse_norms: bool = True,
) -> onnx.ModelProto:
  """The checked ONNX model of ``model`` (a built registry model) with ``params``.

  ``window``: the tile size (d, h, w) the graph is fixed to; ``metadata``: string
  key-value pairs stored as ``metadata_props``; ``plan`` and ``fuse_norms``: the traced
  form (the defaults are the fastest, see the module docstring). Raises `NotExportable`
  naming the first JAX primitive the translator has no emitter for.
  """
  t = graph_nodes(model, params, tuple(int(w) for w in window), plan, fuse_norms)
  window = [int(w) for w in window]
  tensor = lambda n, c: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", c, *window])  # noqa: E731
  graph = helper.make_graph(
    t.nodes,
    name or "resfuse_jax",
    [tensor(n, 1) for n in INPUTS],
    [tensor(n, model.num_outputs) for n in OUTPUTS],
    t.used_initializers(),
  )
  proto = helper.make_model(
    graph,
    opset_imports=[helper.make_opsetid("", OPSET)],
    producer_name="resfuse_jax",
    doc_string=(
      "pre, post float32 [n, 1, d, h, w] (preprocessed, see metadata) -> logits, "
      "probabilities float32 [n, R, d, h, w]"
    ),
  )
  proto.ir_version = IR_VERSION
  helper.set_model_props(proto, dict(metadata or {}))
  onnx.checker.check_model(proto, full_check=True)
  return proto
