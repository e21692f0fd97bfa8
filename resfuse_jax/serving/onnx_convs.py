"""Convolutions and contractions as ONNX, channels first.

``conv_general_dilated`` becomes Conv (ConvTranspose when the input is dilated) reading
the channel-first activation as it is; a known [I, O] ``dot_general`` over the channel
axis (``nn.Dense``, the 1x1x1 convolutions) becomes a 1x1x1 Conv, strided when it reads
``x[::2]``. Each is emitted on first use, so the bias ``add`` after it becomes its bias
input, as runtimes expect.
"""

from __future__ import annotations

import numpy as np

from resfuse_jax.serving.onnx_emitters import (
  elementwise,
  emits,
  out_value,
)
from resfuse_jax.serving.onnx_translate import NotExportable, Translator, Value

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
