"""A model's window function as an ONNX graph, written from its Flax parameters.

For serving without JAX (onnxruntime, TensorRT, Triton, C++ or .NET): the graph mirrors
the Flax modules block by block (residual unit, ResFuse level, decoder) in ONNX's
NCDHW layout with the textbook operators: Conv, ConvTranspose, InstanceNormalization.
Each runtime then uses its own fast kernels. Every conv plan of the JAX model
(`layers.ConvPlan`) computes the same function from the same parameters, so there is
one graph per architecture. Needs the ``onnx`` package only (the ``deploy`` extra):
neither TensorFlow nor PyTorch.

Graph: ``pre``, ``post`` float32 [n, 1, d, h, w] -> ``logits`` and ``probabilities``
(sigmoid) float32 [n, R, d, h, w], ``n`` symbolic, the window fixed. The graph is
float32 whatever ``train.compute_dtype`` the model was trained in.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from resfuse_jax.errors import ConfigError
from resfuse_jax.models import tsf_seq2seq
from resfuse_jax.models.a2fnet import A2FNet
from resfuse_jax.models.resfuse import ResFuse
from resfuse_jax.models.resunet import ResUNet
from resfuse_jax.models.tsf_seq2seq import TSFSeq2Seq

OPSET = 18  # Split's num_outputs; every operator used is unchanged up to opset 23
IR_VERSION = 8  # the oldest IR that carries opset 18: the widest runtime support
# Registry names (every resfuse ablation included). LiTS is missing: its deformable
# aggregation needs a 5-D GridSample, which not every ONNX runtime has.
EXPORTABLE = ("resfuse", "resunet", "resunet_early", "a2fnet", "tsf_seq2seq")
INPUTS = ("pre", "post")
OUTPUTS = ("logits", "probabilities")
# flax.linen.InstanceNorm's epsilon, read from the module so a Flax change cannot drift.
EPSILON = float(nn.InstanceNorm.__dataclass_fields__["epsilon"].default)

Params = Mapping[str, Any]


class NotExportable(ConfigError):
  """The model has no ONNX form (yet); the message names the ones that do."""


class Graph:
  """Nodes and initializers under construction; every helper returns its output's name."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._names = itertools.count()

  def _name(self, hint: str) -> str:
    return f"{hint}_{next(self._names)}"

  def const(self, array: np.ndarray, hint: str = "w") -> str:
    """A float32 initializer (parameters are float32 whatever the compute dtype)."""
    name = self._name(hint)
    self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
    return name

  def axes(self, *axes: int) -> str:
    """An int64 initializer: the ``axes`` input of Unsqueeze and the Reduce operators."""
    name = self._name("axes")
    self.initializers.append(numpy_helper.from_array(np.array(axes, np.int64), name))
    return name

  def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs):
    outputs = [self._name(op_type.lower()) for _ in range(n_out)]
    self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))
    return outputs[0] if n_out == 1 else outputs


# Blocks: (graph, parameters of the Flax module, input names) -> output name, NCDHW.


def conv3(g: Graph, p: Params, x: str, strides: int) -> str:
  """`layers.Conv3`: k3, SAME (stride 2 on even sizes pads (0, 1), as XLA and the s2d form)."""
  kernel = np.asarray(p["kernel"]).transpose(4, 3, 0, 1, 2)  # DHWIO -> OIDHW
  inputs = [x, g.const(kernel)] + ([g.const(p["bias"], "b")] if "bias" in p else [])
  pads = [1] * 6 if strides == 1 else [0, 0, 0, 1, 1, 1]
  return g.op("Conv", inputs, kernel_shape=[3, 3, 3], strides=[strides] * 3, pads=pads)


def conv1(g: Graph, p: Params, x: str, strides: int = 1) -> str:
  """`layers.Conv1`: a Dense over channels; stride 2 reads every second voxel, as x[::2]."""
  dense = p["dense"]
  kernel = np.asarray(dense["kernel"]).T[:, :, None, None, None]  # [I, O] -> [O, I, 1, 1, 1]
  inputs = [x, g.const(kernel)] + ([g.const(dense["bias"], "b")] if "bias" in dense else [])
  return g.op("Conv", inputs, kernel_shape=[1, 1, 1], strides=[strides] * 3)


def instance_norm(g: Graph, p: Params, x: str) -> str:
  return g.op(
    "InstanceNormalization", [x, g.const(p["scale"]), g.const(p["bias"], "b")], epsilon=EPSILON
  )


def norm_relu(g: Graph, p: Params, x: str) -> str:
  return g.op("Relu", [instance_norm(g, p, x)])


def up_conv(g: Graph, p: Params, x: str) -> str:
  """`layers.UpConv`: its [I, 8F] kernel (channels (pd, ph, pw, F)) as ConvTranspose k2 s2."""
  dense = np.asarray(p["dense"]["kernel"])
  i, f = dense.shape[0], dense.shape[1] // 8
  kernel = dense.reshape(i, 2, 2, 2, f).transpose(0, 4, 1, 2, 3)  # [I, F, pd, ph, pw]
  return g.op(
    "ConvTranspose",
    [x, g.const(kernel), g.const(p["bias"], "b")],
    kernel_shape=[2, 2, 2],
    strides=[2, 2, 2],
  )


def residual_branch(g: Graph, p: Params, x: str, strides: int, preactivate: bool) -> str:
  """`layers.ResidualBranch`, F(x)."""
  if preactivate:
    x = norm_relu(g, p["norm_in"], x)
  x = conv3(g, p["conv_a"], x, strides)
  return conv3(g, p["conv_b"], norm_relu(g, p["norm_mid"], x), 1)


def projection(g: Graph, p: Params | None, x: str, strides: int) -> str:
  """`layers.Projection`, P(x): identity when the shape keeps (it then has no parameters)."""
  if p is None:
    return x
  return instance_norm(g, p["norm"], conv1(g, p["conv"], x, strides))


def residual_unit(g: Graph, p: Params, x: str, strides: int, preactivate: bool) -> str:
  f = residual_branch(g, p["residual"], x, strides, preactivate)
  return g.op("Add", [f, projection(g, p.get("projection"), x, strides)])


def encoder_strides(level: int) -> tuple[int, bool]:
  """(stride, preactivate) of encoder level ``level``, as in every encoder here."""
  return (1, False) if level == 0 else (2, True)


def resunet_encoder(g: Graph, p: Params, x: str, levels: int) -> list[str]:
  skips = []
  for level in range(levels):
    x = residual_unit(g, p[f"level{level}"], x, *encoder_strides(level))
    skips.append(x)
  return skips


def decoder_levels(g: Graph, p: Params, skips: list[str]) -> list[str]:
  """`layers.Decoder` without its head: every level's output, full resolution first."""
  x, levels = skips[-1], [skips[-1]]
  for level in range(len(skips) - 2, -1, -1):
    x = g.op("Concat", [up_conv(g, p[f"up{level}"], x), skips[level]], axis=1)
    x = residual_unit(g, p[f"level{level}"], x, 1, True)
    levels.insert(0, x)
  return levels


def segmentation_head(g: Graph, p: Params, x: str) -> str:
  """`layers.segmentation_head`: norm -> ReLU -> conv1 (parameters ``norm_out``, ``head``)."""
  return conv1(g, p["head"], norm_relu(g, p["norm_out"], x))


def decoder(g: Graph, p: Params, skips: list[str]) -> str:
  """`layers.Decoder` with its head: up, concatenate the skip, residual unit; conv1 head."""
  return segmentation_head(g, p, decoder_levels(g, p, skips)[0])


def resfuse_level(
  g: Graph, p: Params, main: str, aux: str, level: int, fusion: str, fuse: bool
) -> tuple[str, str]:
  """`resfuse.ResFuseLevel`: F_l on both branches in one batched call; m + W_l(a)."""
  strides, preactivate = encoder_strides(level)
  both = g.op("Concat", [main, aux], axis=0)
  f_main, f_aux = g.op(
    "Split",
    [residual_branch(g, p["residual"], both, strides, preactivate)],
    2,
    axis=0,
    num_outputs=2,
  )
  proj = p.get("projection")
  p_aux = projection(g, proj, aux, strides)
  if not fuse:
    return g.op("Add", [f_main, projection(g, proj, main, strides)]), g.op("Add", [f_aux, p_aux])
  if fusion == "identity":
    w_aux = p_aux
  elif fusion == "conv":
    w_aux = conv1(g, p["fusion"]["conv"], aux, strides)
  elif fusion == "gate":
    both_channels = g.op("Concat", [main, aux], axis=1)
    gate = g.op("Sigmoid", [conv1(g, p["fusion"]["gate"], both_channels, strides)])
    w_aux = g.op("Mul", [gate, p_aux])
  else:
    raise NotExportable(f"ResFuse fusion {fusion!r} has no ONNX form")
  return g.op("Add", [f_main, w_aux]), g.op("Add", [f_aux, p_aux])


def resfuse(g: Graph, model: ResFuse, p: Params, pre: str, post: str) -> str:
  main, aux, skips = post, pre, []
  for level in range(len(model.features)):
    fuse = model.fuse_levels is None or level in model.fuse_levels
    main, aux = resfuse_level(
      g, p["encoder"][f"level{level}"], main, aux, level, model.fusion, fuse
    )
    skips.append(main)
  return decoder(g, p["decoder"], skips)


def resunet(g: Graph, model: ResUNet, p: Params, pre: str, post: str) -> str:
  if model.inputs == "post":
    x = post
  elif model.inputs == "pre+post":
    x = g.op("Concat", [pre, post], axis=1)
  else:
    raise NotExportable(f"ResUNet inputs {model.inputs!r} have no ONNX form")
  return decoder(g, p["decoder"], resunet_encoder(g, p["encoder"], x, len(model.features)))


def a2fnet(g: Graph, model: A2FNet, p: Params, pre: str, post: str) -> str:
  """`a2fnet.A2FNet`'s output path (its auxiliary heads only train)."""
  levels, feats = [], []
  for name, x in (("pre", pre), ("post", post)):
    skips = resunet_encoder(g, p[f"{name}_encoder"], x, len(model.features))
    levels.append(decoder_levels(g, p[f"{name}_decoder"], skips))
  half = g.const(np.float32(0.5), "half")
  averaged = [g.op("Mul", [g.op("Add", [a, b]), half]) for a, b in zip(*levels)]
  average = decoder_levels(g, p["average_decoder"], averaged)[0]
  logits = []
  for name, own in (("pre", levels[0][0]), ("post", levels[1][0])):
    q = p[f"{name}_attention"]
    x = conv3(g, q["conv_a"], g.op("Concat", [own, average], axis=1), 1)
    logits.append(g.op("Relu", [conv3(g, q["conv_b"], norm_relu(g, q["norm"], x), 1)]))
    feats.append(own)
  axis0 = g.axes(0)
  stack = lambda xs: g.op("Concat", [g.op("Unsqueeze", [x, axis0]) for x in xs], axis=0)  # noqa: E731
  weights = g.op("Softmax", [stack(logits)], axis=0)  # across the sequences
  fused = g.op("ReduceSum", [g.op("Mul", [weights, stack(feats)]), axis0], keepdims=0)
  x = conv3(g, p["fused_conv"], g.op("Concat", [fused, average], axis=1), 1)
  return segmentation_head(g, p["fused_head"], x)


def leaky_relu(g: Graph, x: str) -> str:
  return g.op("LeakyRelu", [x], alpha=0.2)


def dense(g: Graph, p: Params, x: str, extra_bias: np.ndarray | None = None) -> str:
  """nn.Dense on [n, features]; ``extra_bias`` folds a constant part of the input in."""
  bias = np.asarray(p["bias"]) + (0 if extra_bias is None else extra_bias)
  return g.op("Gemm", [x, g.const(p["kernel"]), g.const(bias, "b")])


def task_attention(g: Graph, p: Params, x: str, code: np.ndarray) -> str:
  """`tsf_seq2seq.TaskAttention`; the task code is a constant, so its share of the channel
  MLP's first layer is folded into that layer's bias (no broadcast over a symbolic batch)."""
  x = leaky_relu(g, conv3(g, p["conv"], x, 1))
  c = np.asarray(p["channel_fc1"]["kernel"]).shape[0] - code.shape[0]  # pooled channels
  fc1 = {"kernel": np.asarray(p["channel_fc1"]["kernel"])[:c], "bias": p["channel_fc1"]["bias"]}
  code_bias = code @ np.asarray(p["channel_fc1"]["kernel"])[c:]
  spatial_axes = g.axes(2, 3, 4)

  def mlp(pooled: str) -> str:
    return dense(g, p["channel_fc2"], leaky_relu(g, dense(g, fc1, pooled, code_bias)))

  pooled = [g.op(op, [x, spatial_axes], keepdims=0) for op in ("ReduceMean", "ReduceMax")]
  channel = g.op("Sigmoid", [g.op("Add", [mlp(pooled[0]), mlp(pooled[1])])])  # [n, C]
  channel = g.op("Unsqueeze", [channel, spatial_axes])
  x = g.op("Mul", [x, channel])
  channel_axis = g.axes(1)
  maps = g.op(
    "Concat",
    [g.op(op, [x, channel_axis], keepdims=1) for op in ("ReduceMean", "ReduceMax")],
    axis=1,
  )
  return g.op("Mul", [x, g.op("Sigmoid", [conv3(g, p["spatial"], maps, 1)])])


def tsf(g: Graph, model: TSFSeq2Seq, p: Params, pre: str, post: str) -> str:
  """`tsf_seq2seq.TSFSeq2Seq`'s output path: the attention-refined skips through the decoder."""
  both = g.op("Concat", [pre, post], axis=0)
  encoded = resunet_encoder(g, p["encoder"], both, len(model.features))
  code = np.asarray(p["task_code"], np.float32)
  w = p["sequence_weights"]
  scores = code @ np.asarray(w["kernel"]) + np.asarray(w["bias"])
  weights = np.exp(scores - scores.max())
  weights = (weights / weights.sum()).astype(np.float32)  # constant: a learned task code
  assert len(weights) == tsf_seq2seq.NUM_SEQUENCES
  refined = []
  for level, e in enumerate(encoded):
    e_pre, e_post = g.op("Split", [e], 2, axis=0, num_outputs=2)
    fused = g.op(
      "Add",
      [g.op("Mul", [e_pre, g.const(weights[0], "a")]), g.op("Mul", [e_post, g.const(weights[1])])],
    )
    both_channels = g.op("Concat", [e_pre, e_post], axis=1)
    residual = task_attention(g, p[f"attention{level}"], both_channels, code)
    refined.append(g.op("Add", [fused, residual]))
  return decoder(g, p["decoder"], refined)


def to_onnx(
  model: nn.Module,
  params: Params,
  window: tuple[int, int, int],
  name: str = "",
  metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
  """The checked ONNX model of ``model`` (a built registry model) with ``params``.

  ``window``: the tile size (d, h, w) the graph is fixed to; ``metadata``: string
  key-value pairs stored as the model's ``metadata_props``. Raises `NotExportable`,
  naming the models that export, for any other architecture.
  """
  emit = {ResFuse: resfuse, ResUNet: resunet, A2FNet: a2fnet, TSFSeq2Seq: tsf}.get(type(model))
  if emit is None:
    raise NotExportable(
      f"model {name or type(model).__name__!r} has no ONNX export; the models that export are "
      f"{', '.join(EXPORTABLE)} (every resfuse ablation included). Export it without ONNX "
      "(export --onnx=no) to serve it with the JAX backend"
    )
  params = jax_free(params)
  g = Graph()
  logits = emit(g, model, params, *INPUTS)
  g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
  g.nodes.append(helper.make_node("Sigmoid", ["logits"], ["probabilities"]))
  num_outputs = model.num_outputs
  graph = helper.make_graph(
    g.nodes,
    name or "resfuse_jax",
    [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 1, *window]) for n in INPUTS],
    [
      helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", num_outputs, *window])
      for n in OUTPUTS
    ],
    g.initializers,
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


def jax_free(tree: Any) -> Any:
  """A parameter tree as nested dicts of numpy arrays (from jax arrays, FrozenDicts)."""
  if isinstance(tree, Mapping):
    return {k: jax_free(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)
