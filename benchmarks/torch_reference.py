"""ResUNet and ResFuse written in PyTorch, layer for layer as `resfuse_jax.models`.

The reference a PyTorch user would otherwise write (idiomatic torch layers, no
rewrites), used only to time our JAX step against. The parameter count of each
model is checked equal to ours before anything is timed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-6  # flax InstanceNorm's epsilon


def norm(c: int) -> nn.Module:
  return nn.InstanceNorm3d(c, eps=EPS, affine=True)


class ResidualBranch(nn.Module):
  def __init__(self, cin: int, c: int, stride: int, preactivate: bool):
    super().__init__()
    self.norm_in = norm(cin) if preactivate else None
    self.conv_a = nn.Conv3d(cin, c, 3, stride, padding=1)
    self.norm_mid = norm(c)
    self.conv_b = nn.Conv3d(c, c, 3, 1, padding=1)

  def forward(self, x):
    if self.norm_in is not None:
      x = F.relu(self.norm_in(x))
    return self.conv_b(F.relu(self.norm_mid(self.conv_a(x))))


class Projection(nn.Module):
  def __init__(self, cin: int, c: int, stride: int):
    super().__init__()
    self.identity = stride == 1 and cin == c
    if not self.identity:
      self.conv = nn.Conv3d(cin, c, 1, stride, bias=False)
      self.norm = norm(c)

  def forward(self, x):
    return x if self.identity else self.norm(self.conv(x))


class ResidualUnit(nn.Module):
  def __init__(self, cin: int, c: int, stride: int, preactivate: bool):
    super().__init__()
    self.residual = ResidualBranch(cin, c, stride, preactivate)
    self.projection = Projection(cin, c, stride)

  def forward(self, x):
    return self.residual(x) + self.projection(x)


class Decoder(nn.Module):
  def __init__(self, features, num_outputs: int):
    super().__init__()
    self.up = nn.ModuleList(
      nn.ConvTranspose3d(features[i + 1], features[i], 2, 2) for i in range(len(features) - 1)
    )
    self.levels = nn.ModuleList(
      ResidualUnit(2 * features[i], features[i], 1, True) for i in range(len(features) - 1)
    )
    self.norm_out = norm(features[0])
    self.head = nn.Conv3d(features[0], num_outputs, 1)

  def forward(self, skips):
    x = skips[-1]
    for level in range(len(skips) - 2, -1, -1):
      x = self.levels[level](torch.cat([self.up[level](x), skips[level]], 1))
    return self.head(F.relu(self.norm_out(x)))


class ResUNet(nn.Module):
  def __init__(self, features, num_outputs: int):
    super().__init__()
    chans = (1, *features)
    self.encoder = nn.ModuleList(
      ResidualUnit(chans[i], chans[i + 1], 1 if i == 0 else 2, i > 0) for i in range(len(features))
    )
    self.decoder = Decoder(features, num_outputs)

  def forward(self, pre, post):
    x, skips = post, []
    for unit in self.encoder:
      x = unit(x)
      skips.append(x)
    return self.decoder(skips)


class ResFuseLevel(nn.Module):
  def __init__(self, cin: int, c: int, stride: int, preactivate: bool):
    super().__init__()
    self.residual = ResidualBranch(cin, c, stride, preactivate)
    self.projection = Projection(cin, c, stride)
    self.fusion = nn.Conv3d(cin, c, 1, stride)  # W_l, the learned 1x1x1 conv

  def forward(self, main, aux):
    n = main.shape[0]
    f = self.residual(torch.cat([main, aux], 0))  # shared weights, one batched call
    return f[:n] + self.fusion(aux), f[n:] + self.projection(aux)


class ResFuse(nn.Module):
  def __init__(self, features, num_outputs: int):
    super().__init__()
    chans = (1, *features)
    self.encoder = nn.ModuleList(
      ResFuseLevel(chans[i], chans[i + 1], 1 if i == 0 else 2, i > 0) for i in range(len(features))
    )
    self.decoder = Decoder(features, num_outputs)

  def forward(self, pre, post):
    main, aux, skips = post, pre, []
    for level in self.encoder:
      main, aux = level(main, aux)
      skips.append(main)
    return self.decoder(skips)


MODELS = {"resunet": ResUNet, "resfuse": ResFuse}


def build(name: str, features, num_outputs: int, channels_last: bool = True) -> nn.Module:
  model = MODELS[name](tuple(features), num_outputs)
  return model.to(memory_format=torch.channels_last_3d) if channels_last else model


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
  """Batch soft Dice + BCE on sigmoid region outputs, as `resfuse_jax.losses.dice_bce_loss`."""
  probs = torch.sigmoid(logits)
  axes = (0, 2, 3, 4)
  inter = (probs * targets).sum(axes)
  denom = probs.sum(axes) + targets.sum(axes)
  dice = 1.0 - ((2.0 * inter + 1e-5) / (denom + 1e-5)).mean()
  return dice + F.binary_cross_entropy_with_logits(logits, targets)


def labels_to_regions(label: torch.Tensor, regions) -> torch.Tensor:
  masks = [torch.isin(label, torch.tensor(values, device=label.device)) for values in regions]
  return torch.stack(masks, 1).float()


def make_train_step(
  model: nn.Module, regions, lr: float = 1e-3, clip: float = 1.0, dtype: str = "float32"
):
  """AdamW + global-norm clipping, the optimiser of `resfuse_jax.train.make_optimizer`.

  ``dtype="bfloat16"``: the forward under bf16 autocast (the loss in float32), PyTorch's
  usual mixed precision; the step returns once the device has finished it.
  """
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)

  def step(pre, post, label):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(pre.device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = model(pre, post)
    loss = dice_bce_loss(logits.float(), labels_to_regions(label, regions))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if pre.device.type == "cuda":
      torch.cuda.synchronize()
    return loss.detach()

  return step
