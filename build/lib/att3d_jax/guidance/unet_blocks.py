"""Residual blocks, resamplers and the down/mid/up blocks of the diffusers UNet, in Flax.

Arrays are channels-last: `[batch, height, width, channels]`. Submodule names mirror
diffusers (`resnets.0`, `attentions.1`, `downsamplers.0.conv`, ...), see convert.py.

One Flax block class stands for several diffusers block types that differ only in the
attention after each resnet and in the resampler:

  diffusers type               attention      resampler
  DownBlock2D                  none           conv (Downsample2D)
  CrossAttnDownBlock2D         transformer    conv
  ResnetDownsampleBlock2D      none           resnet (ResnetBlock2D(down=True))
  SimpleCrossAttnDownBlock2D   added_kv       resnet
  (and the same for the Up blocks and the two cross-attention mid blocks)

The attention modules are built by `attention.CrossAttentionSettings`; this file does not
import attention.py, which uses the GroupNorm defined here.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'silu': nn.silu,
    'swish': nn.silu,
    # The exact (erf) GELU of torch.nn.GELU(), written out: on CPU it compiles to code twice
    # as fast as jax.nn.gelu(approximate=False).
    'gelu': lambda x: 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2)))),
    'mish': lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    'relu': nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """diffusers' `get_activation` (names are case-insensitive)."""
  if name.lower() not in ACTIVATIONS:
    raise NotImplementedError(
        f'activation {name!r} is not supported; use one of {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name.lower()]


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """Nearest-neighbour resize like `F.interpolate(mode="nearest")`.

  Args:
    x: [batch, height, width, channels].
    size: output (height, width); None doubles both.
  """
  batch, height, width, channels = x.shape
  if size is None:
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)

  def source_index(in_size, out_size):  # torch: floor(dst * in / out), in float32.
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(index, in_size - 1)

  x = jnp.take(x, source_index(height, size[0]), axis=1)
  return jnp.take(x, source_index(width, size[1]), axis=2)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.AvgPool2d(2, 2)` on [batch, height, width, channels] (odd sizes drop the last row/col)."""
  batch, height, width, channels = x.shape
  x = x[:, :height // 2 * 2, :width // 2 * 2]
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


def conv(features: int, kernel_size: int, name: str, dtype: Dtype, param_dtype: Dtype,
         stride: int = 1, padding: int | tuple[tuple[int, int], tuple[int, int]] | None = None):
  """A torch-style Conv2d: symmetric padding (kernel_size - 1) // 2 unless given."""
  if padding is None:
    padding = (kernel_size - 1) // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
                 name=name, dtype=dtype, param_dtype=param_dtype)


def group_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
                    eps: float) -> jax.Array:
  """torch.nn.GroupNorm on channels-last arrays, statistics in float32 (two-pass variance).

  Args:
    x: [batch, ..., channels]; statistics over all but the batch axis, per channel group.
    scale, bias: [channels].

  Returns:
    float32 array of x's shape.
  """
  batch, channels = x.shape[0], x.shape[-1]
  group_size = channels // num_groups
  flat = x.reshape(batch, -1, channels).astype(jnp.float32)
  count = flat.shape[1] * group_size

  def per_group(channel_sums):  # [batch, channels] -> group means, repeated per channel.
    sums = channel_sums.reshape(batch, num_groups, group_size).sum(-1)
    return jnp.repeat(sums / count, group_size, axis=-1)

  # Per-channel sums first, then [batch, channels] scale/shift vectors: the full-size work is
  # plain column reductions and one multiply-add, which vectorize well on CPU.
  centered = flat - per_group(flat.sum(1))[:, None, :]
  inverse_std = jax.lax.rsqrt(per_group(jnp.square(centered).sum(1)) + eps)
  out = centered * (inverse_std * scale.astype(jnp.float32))[:, None, :] + bias.astype(jnp.float32)
  return out.reshape(x.shape)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm (affine) on channels-last arrays; params `scale` and `bias`."""
  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, ..., channels] -> same shape, in `dtype`."""
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f'GroupNorm {self.name}: {channels} channels do not split into '
                       f'{self.num_groups} groups.')
    scale = self.param('scale', nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
    return group_normalize(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def group_norm(num_groups: int, eps: float, name: str, dtype: Dtype, param_dtype: Dtype):
  """The GroupNorm submodule `name` (shorthand used by the UNet and VAE blocks)."""
  return GroupNorm(num_groups, eps, name=name, dtype=dtype, param_dtype=param_dtype)


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D`: norm-act-conv, time embedding, norm-act-conv, plus a shortcut.

  Attributes:
    out_channels: output channels; a 1x1 `conv_shortcut` is added when they differ from the input.
    groups, eps: GroupNorm settings of norm1 (and norm2, unless `groups_out` is given).
    act_fn: activation name (see ACTIVATIONS).
    time_embedding_norm: "default" adds the projected embedding before norm2; "scale_shift"
      applies norm2(h) * (1 + scale) + shift (DeepFloyd IF).
    skip_time_act: project the time embedding without applying the activation first.
    output_scale_factor: the sum is divided by it (IF uses sqrt(2)).
    resample: None, "up" (nearest x2) or "down" (2x2 average pool) applied after norm1.
  """
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  act_fn: str = 'silu'
  time_embedding_norm: str = 'default'
  skip_time_act: bool = False
  output_scale_factor: float = 1.0
  groups_out: int | None = None
  resample: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    """x: [batch, height, width, in_channels]; temb: [batch, temb_channels] or None (no
    time_emb_proj, as in the VAE). Returns [batch, height', width', out_channels]."""
    if self.time_embedding_norm not in ('default', 'scale_shift'):
      raise NotImplementedError(
          f'resnet_time_scale_shift={self.time_embedding_norm!r} is not supported; use "default" '
          'or "scale_shift".')
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = activation(self.act_fn)
    hidden = act(group_norm(self.groups, self.eps, 'norm1', **kwargs)(x))
    if self.resample == 'up':
      x, hidden = upsample_nearest(x), upsample_nearest(hidden)
    elif self.resample == 'down':
      x, hidden = avg_pool_2x2(x), avg_pool_2x2(hidden)
    elif self.resample is not None:
      raise ValueError(f'resample must be None, "up" or "down", got {self.resample!r}.')
    hidden = conv(self.out_channels, 3, 'conv1', **kwargs)(hidden)
    norm2 = group_norm(self.groups_out or self.groups, self.eps, 'norm2', **kwargs)
    if temb is None:
      hidden = norm2(hidden)
    else:
      scale_shift = self.time_embedding_norm == 'scale_shift'
      temb = temb if self.skip_time_act else act(temb)
      temb = nn.Dense(self.out_channels * (2 if scale_shift else 1), name='time_emb_proj',
                      **kwargs)(temb)[:, None, None, :]
      if scale_shift:
        scale, shift = jnp.split(temb, 2, axis=-1)
        hidden = norm2(hidden) * (1 + scale) + shift
      else:
        hidden = norm2(hidden + temb)
    hidden = conv(self.out_channels, 3, 'conv2', **kwargs)(act(hidden))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, 'conv_shortcut', **kwargs)(x)
    return (x + hidden) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 convolution `conv`; padding 0 means torch's (0, 1, 0, 1) pad (VAE style)."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    padding = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
    return conv(self.out_channels, 3, 'conv', self.dtype, self.param_dtype, stride=2,
                padding=padding)(x)


class Upsample2D(nn.Module):
  """Nearest x2 (or to `size`) resize followed by a 3x3 convolution `conv`."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    x = upsample_nearest(x, size)
    return conv(self.out_channels, 3, 'conv', self.dtype, self.param_dtype)(x)


@dataclasses.dataclass(frozen=True)
class ResnetSettings:
  """The ResnetBlock2D attributes shared by all resnets of a block."""
  groups: int
  eps: float
  act_fn: str
  time_embedding_norm: str = 'default'
  skip_time_act: bool = False
  output_scale_factor: float = 1.0


class DownBlock(nn.Module):
  """`num_layers` x (resnet [+ attention]) then an optional downsampler.

  Attributes:
    downsample: None, "conv" (Downsample2D `downsamplers.0`) or "resnet" (a ResnetBlock2D
      with average-pool downsampling, as in IF's ResnetDownsample/SimpleCrossAttnDown blocks).
  """
  out_channels: int
  num_layers: int
  resnet: ResnetSettings
  attention: Any = None  # attention.CrossAttentionSettings, or None for no attention.
  downsample: str | None = None
  downsample_padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array,
               context_bias: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """x: [batch, height, width, channels]; temb: [batch, temb_channels]; context:
    [batch, keys, context_dim]. Returns the output and the skip activations for the up path."""
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resnet = functools.partial(ResnetBlock2D, self.out_channels, **dataclasses.asdict(self.resnet),
                               **kwargs)
    skips = []
    for i in range(self.num_layers):
      x = resnet(name=f'resnets.{i}')(x, temb)
      if self.attention is not None:
        x = self.attention.build(self.out_channels, self.resnet.groups, i, f'attentions.{i}',
                                 **kwargs)(x, context, context_bias)
      skips.append(x)
    if self.downsample == 'conv':
      x = Downsample2D(self.out_channels, self.downsample_padding, name='downsamplers.0',
                       **kwargs)(x)
    elif self.downsample == 'resnet':
      x = resnet(resample='down', name='downsamplers.0')(x, temb)
    elif self.downsample is not None:
      raise ValueError(f'downsample must be None, "conv" or "resnet", got {self.downsample!r}.')
    if self.downsample is not None:
      skips.append(x)
    return x, tuple(skips)


class MidBlock(nn.Module):
  """resnet, then `num_attention_layers` x (attention, resnet).

  Covers UNetMidBlock2DCrossAttn ("transformer"), UNetMidBlock2DSimpleCrossAttn ("added_kv")
  and the attention-free UNetMidBlock2D (attention None, num_attention_layers 0).
  """
  resnet: ResnetSettings
  attention: Any = None  # attention.CrossAttentionSettings, or None for no attention.
  num_attention_layers: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array,
               context_bias: jax.Array | None = None) -> jax.Array:
    """x: [batch, height, width, channels] -> same shape."""
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    resnet = functools.partial(ResnetBlock2D, channels, **dataclasses.asdict(self.resnet), **kwargs)
    x = resnet(name='resnets.0')(x, temb)
    for i in range(self.num_attention_layers):
      x = self.attention.build(channels, self.resnet.groups, i, f'attentions.{i}', **kwargs)(
          x, context, context_bias)
      x = resnet(name=f'resnets.{i + 1}')(x, temb)
    return x


class UpBlock(nn.Module):
  """`num_layers` x (concat a skip, resnet [+ attention]) then an optional upsampler.

  Attributes:
    upsample: None, "conv" (Upsample2D `upsamplers.0`, honours `upsample_size`) or "resnet"
      (ResnetBlock2D with nearest x2 upsampling; like diffusers it ignores `upsample_size`).
  """
  out_channels: int
  num_layers: int
  resnet: ResnetSettings
  attention: Any = None  # attention.CrossAttentionSettings, or None for no attention.
  upsample: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
               context: jax.Array, context_bias: jax.Array | None = None,
               upsample_size: tuple[int, int] | None = None) -> jax.Array:
    """x: [batch, height, width, channels]; skips: `num_layers` skip activations, consumed
    last first. Returns [batch, height', width', out_channels]."""
    if len(skips) != self.num_layers:
      raise ValueError(f'expected {self.num_layers} skip activations, got {len(skips)}.')
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resnet = functools.partial(ResnetBlock2D, self.out_channels, **dataclasses.asdict(self.resnet),
                               **kwargs)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = resnet(name=f'resnets.{i}')(x, temb)
      if self.attention is not None:
        x = self.attention.build(self.out_channels, self.resnet.groups, i, f'attentions.{i}',
                                 **kwargs)(x, context, context_bias)
    if self.upsample == 'conv':
      x = Upsample2D(self.out_channels, name='upsamplers.0', **kwargs)(x, upsample_size)
    elif self.upsample == 'resnet':
      x = resnet(resample='up', name='upsamplers.0')(x, temb)
    elif self.upsample is not None:
      raise ValueError(f'upsample must be None, "conv" or "resnet", got {self.upsample!r}.')
    return x
