"""Flax port of diffusers' `AutoencoderKL` (the Stable Diffusion VAE) and its loader.

The encoder turns [-1, 1] images into a diagonal Gaussian over latents (latent
SDS differentiates through it); the decoder turns latents back into images (for
previews). Submodule names mirror diffusers' module paths (`encoder.down_blocks.0.
resnets.1.conv1`, `decoder.mid_block.attentions.0.to_q`, ...) so that convert.py
maps the PyTorch weights one to one; the building blocks (ResnetBlock2D, the
resamplers, the attention) are the UNet's, from unet_blocks.py and attention.py.

Inside the modules arrays are channels-last `[batch, height, width, channels]`;
the `VAE` wrapper takes and returns NCHW like diffusers.
"""

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from att3d_jax.guidance import attention as attention_lib
from att3d_jax.guidance import convert
from att3d_jax.guidance import unet_blocks

Dtype = Any
# diffusers builds every VAE resnet and norm with this epsilon.
VAE_NORM_EPS = 1e-6


class VAEAttention(nn.Module):
  """The VAE mid block's single-head spatial self-attention, with a residual.

  diffusers: `Attention(channels, heads=1, dim_head=channels, norm_num_groups,
  residual_connection=True, bias=True)`; parameters group_norm, to_q, to_k,
  to_v, to_out.0 all live directly under this module.
  """
  channels: int
  norm_num_groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.group_norm = unet_blocks.group_norm(self.norm_num_groups, VAE_NORM_EPS, 'group_norm',
                                             self.dtype, self.param_dtype)
    self.attention = attention_lib.Attention(1, self.channels, use_bias=True, dtype=self.dtype,
                                             param_dtype=self.param_dtype)
    nn.share_scope(self, self.attention)  # to_q etc. sit next to group_norm, as in diffusers

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, height, width, channels] -> same shape."""
    batch, height, width, channels = x.shape
    tokens = self.group_norm(x).reshape(batch, height * width, channels)
    return self.attention(tokens).reshape(x.shape) + x


class VAEMidBlock(nn.Module):
  """diffusers `UNetMidBlock2D` without a time embedding: resnet, [attention], resnet."""
  resnet: unet_blocks.ResnetSettings
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, height, width, channels] -> same shape."""
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    x = unet_blocks.ResnetBlock2D(channels, **dataclasses.asdict(self.resnet), name='resnets.0',
                                  **kwargs)(x)
    if self.add_attention:
      x = VAEAttention(channels, self.resnet.groups, name='attentions.0', **kwargs)(x)
    return unet_blocks.ResnetBlock2D(channels, **dataclasses.asdict(self.resnet),
                                     name='resnets.1', **kwargs)(x)


class UpDecoderBlock(nn.Module):
  """diffusers `UpDecoderBlock2D`: resnets (no skip connections), then an optional
  nearest x2 upsample + conv."""
  out_channels: int
  num_layers: int
  resnet: unet_blocks.ResnetSettings
  add_upsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = unet_blocks.ResnetBlock2D(self.out_channels, **dataclasses.asdict(self.resnet),
                                    name=f'resnets.{i}', **kwargs)(x)
    if self.add_upsample:
      x = unet_blocks.Upsample2D(self.out_channels, name='upsamplers.0', **kwargs)(x)
    return x


class Encoder(nn.Module):
  """diffusers `Encoder` (double_z): image -> [mean, logvar] moments.

  The down blocks are `DownEncoderBlock2D`s: the UNet's DownBlock without time
  embedding or attention, downsampling with torch's asymmetric (0, 1) padding.
  """
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int
  act_fn: str
  mid_block_add_attention: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, height, width, in_channels] -> [batch, h, w, 2 * latent_channels]."""
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resnet = unet_blocks.ResnetSettings(self.norm_num_groups, VAE_NORM_EPS, self.act_fn)
    x = unet_blocks.conv(self.block_out_channels[0], 3, 'conv_in', **kwargs)(x)
    num_blocks = len(self.block_out_channels)
    for i, channels in enumerate(self.block_out_channels):
      x, _ = unet_blocks.DownBlock(
          channels, self.layers_per_block, resnet,
          downsample='conv' if i < num_blocks - 1 else None, downsample_padding=0,
          name=f'down_blocks.{i}', **kwargs)(x, None, None)
    x = VAEMidBlock(resnet, self.mid_block_add_attention, name='mid_block', **kwargs)(x)
    x = unet_blocks.group_norm(self.norm_num_groups, VAE_NORM_EPS, 'conv_norm_out', **kwargs)(x)
    x = unet_blocks.activation(self.act_fn)(x)
    return unet_blocks.conv(2 * self.latent_channels, 3, 'conv_out', **kwargs)(x)


class Decoder(nn.Module):
  """diffusers `Decoder` (group norm): latents -> image."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  norm_num_groups: int
  act_fn: str
  mid_block_add_attention: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """z: [batch, h, w, latent_channels] -> [batch, height, width, out_channels]."""
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resnet = unet_blocks.ResnetSettings(self.norm_num_groups, VAE_NORM_EPS, self.act_fn)
    reversed_channels = tuple(reversed(self.block_out_channels))
    x = unet_blocks.conv(reversed_channels[0], 3, 'conv_in', **kwargs)(z)
    x = VAEMidBlock(resnet, self.mid_block_add_attention, name='mid_block', **kwargs)(x)
    for i, channels in enumerate(reversed_channels):
      # diffusers' decoder blocks have one resnet more than the encoder's.
      x = UpDecoderBlock(channels, self.layers_per_block + 1, resnet,
                         add_upsample=i < len(reversed_channels) - 1, name=f'up_blocks.{i}',
                         **kwargs)(x)
    x = unet_blocks.group_norm(self.norm_num_groups, VAE_NORM_EPS, 'conv_norm_out', **kwargs)(x)
    x = unet_blocks.activation(self.act_fn)(x)
    return unet_blocks.conv(self.out_channels, 3, 'conv_out', **kwargs)(x)


class DiagonalGaussian(NamedTuple):
  """The encoder's posterior q(z | x); arrays [batch, latent_channels, h, w] (NCHW)."""
  mean: jax.Array
  logvar: jax.Array  # clipped to [-30, 20] like diffusers

  def sample(self, key: jax.Array) -> jax.Array:
    """z = mean + std * n, n ~ N(0, I) (reparameterized: differentiable in mean, logvar)."""
    noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
    return self.mean + jnp.exp(0.5 * self.logvar) * noise


class AutoencoderKL(nn.Module):
  """diffusers `AutoencoderKL`, channels-last. Attributes follow its config.json."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  act_fn: str = 'silu'
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shared = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  act_fn=self.act_fn, mid_block_add_attention=self.mid_block_add_attention,
                  **kwargs)
    self.encoder = Encoder(latent_channels=self.latent_channels, **shared)
    self.decoder = Decoder(out_channels=self.out_channels, **shared)
    self.quant_conv = (unet_blocks.conv(2 * self.latent_channels, 1, 'quant_conv', **kwargs)
                       if self.use_quant_conv else None)
    self.post_quant_conv = (unet_blocks.conv(self.latent_channels, 1, 'post_quant_conv', **kwargs)
                            if self.use_post_quant_conv else None)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images: [batch, height, width, in_channels] in [-1, 1] -> (mean, logvar), each
    [batch, height / 2^(blocks - 1), width / 2^(blocks - 1), latent_channels]."""
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents: [batch, h, w, latent_channels] (unscaled) -> images [batch, H, W, out_channels]."""
    if self.post_quant_conv is not None:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Reconstruction from the posterior mean; used to initialize all parameters."""
    return self.decode(self.encode(images)[0])


# config.json keys that choose the architecture; anything else must be a default.
_ARCHITECTURE_KEYS = ('in_channels', 'out_channels', 'block_out_channels', 'layers_per_block',
                      'act_fn', 'latent_channels', 'norm_num_groups', 'use_quant_conv',
                      'use_post_quant_conv', 'mid_block_add_attention')


def module_from_config(config: dict, dtype: Dtype = jnp.float32) -> AutoencoderKL:
  """An AutoencoderKL module for a diffusers VAE config.json; unsupported variants raise."""
  num_blocks = len(config.get('block_out_channels', (64,)))
  for key, expected in (('down_block_types', 'DownEncoderBlock2D'),
                        ('up_block_types', 'UpDecoderBlock2D')):
    found = config.get(key, [expected] * num_blocks)
    if any(block != expected for block in found) or len(found) != num_blocks:
      raise NotImplementedError(
          f'VAE config {key}={found} is not supported: expected {num_blocks} x {expected!r} '
          '(the Stable Diffusion AutoencoderKL).')
  for key in ('latents_mean', 'latents_std'):
    if config.get(key) is not None:
      raise NotImplementedError(f'VAE config {key}={config[key]} (per-channel latent '
                                'normalization) is not supported; only scaling_factor/shift_factor.')
  kwargs = {key: config[key] for key in _ARCHITECTURE_KEYS if key in config}
  if 'block_out_channels' in kwargs:
    kwargs['block_out_channels'] = tuple(kwargs['block_out_channels'])
  return AutoencoderKL(**kwargs, dtype=dtype)


# Jitted so that eager use (previews, tests) compiles once instead of dispatching
# op by op; inside an outer jit they simply inline.
@functools.partial(jax.jit, static_argnums=0)
def _encode(module: AutoencoderKL, params: Any, images: jax.Array):
  mean, logvar = module.apply({'params': params}, jnp.transpose(images, (0, 2, 3, 1)),
                              method=AutoencoderKL.encode)
  return jnp.transpose(mean, (0, 3, 1, 2)), jnp.transpose(logvar, (0, 3, 1, 2))


@functools.partial(jax.jit, static_argnums=0)
def _decode(module: AutoencoderKL, params: Any, latents: jax.Array) -> jax.Array:
  images = module.apply({'params': params}, jnp.transpose(latents, (0, 2, 3, 1)),
                        method=AutoencoderKL.decode)
  return jnp.transpose(images, (0, 3, 1, 2))


@flax.struct.dataclass
class VAE:
  """A loaded VAE: the Flax module, its params and the latent scaling.

  A pytree whose only leaves are the params, so it can be passed to jitted
  functions as an argument. Public methods take and return NCHW arrays like
  diffusers. Latents seen by the UNet are `(z - shift_factor) * scaling_factor`.
  """
  module: AutoencoderKL = flax.struct.field(pytree_node=False)
  params: Any
  scaling_factor: float = flax.struct.field(pytree_node=False)
  shift_factor: float = flax.struct.field(pytree_node=False, default=0.0)

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """images: [batch, 3, H, W] in [-1, 1] -> posterior over unscaled latents
    [batch, latent_channels, H / f, W / f] (f = 8 for SD)."""
    mean, logvar = _encode(self.module, self.params, images)
    return DiagonalGaussian(mean, logvar)

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents: [batch, latent_channels, h, w] unscaled -> images [batch, 3, 8h, 8w], ~[-1, 1]."""
    return _decode(self.module, self.params, latents)

  def encode_latents(self, images: jax.Array, key: jax.Array) -> jax.Array:
    """images [batch, 3, H, W] in [-1, 1] -> sampled, scaled latents for the UNet."""
    return (self.encode(images).sample(key) - self.shift_factor) * self.scaling_factor

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """Scaled UNet latents -> images [batch, 3, H, W], ~[-1, 1]."""
    return self.decode(latents / self.scaling_factor + self.shift_factor)


def load_vae(folder: str, dtype: Dtype = jnp.float32) -> VAE:
  """Loads a diffusers AutoencoderKL from a pipeline folder or its `vae/` subfolder.

  Raises:
    FileNotFoundError: no config.json / weights; names the flag and the layout.
    ValueError: missing, unexpected or mis-shaped weights (lists the first ones).
    NotImplementedError: a VAE variant this port does not cover.
  """
  vae_folder = convert.model_folder(folder, 'vae')
  with open(os.path.join(vae_folder, convert.CONFIG_NAME)) as f:
    config = json.load(f)
  module = module_from_config(config, dtype)
  size = 2 ** len(module.block_out_channels)  # parameter shapes do not depend on it
  sample = jax.ShapeDtypeStruct((1, size, size, module.in_channels), jnp.float32)
  expected = jax.eval_shape(module.init, jax.random.PRNGKey(0), sample)['params']
  params = convert.torch_to_flax(convert.read_safetensors(vae_folder), expected)
  return VAE(module=module, params=jax.tree_util.tree_map(jnp.asarray, params),
             scaling_factor=float(config.get('scaling_factor', 0.18215)),
             shift_factor=float(config.get('shift_factor') or 0.0))
