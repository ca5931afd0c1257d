"""Flax port of diffusers' `UNet2DConditionModel` (SD 1.x/2.x, DeepFloyd IF stage I).

    from att3d_jax.guidance import load_unet
    unet = load_unet('/path/to/pipeline')          # or the pipeline's unet/ folder
    eps = unet(sample, timesteps, text_embeddings)  # NCHW in, NCHW float32 out, like diffusers

`unet.module.apply({'params': unet.params}, ...)` is the differentiable function with the same
arguments. The model is built from the folder's config.json (`UNetConfig`); values this port
does not implement raise NotImplementedError naming the field. Internally the computation is
channels-last (NHWC); `dtype` is the compute dtype (bfloat16 on accelerators, float32 on CPU)
and `param_dtype` the storage dtype of the params. Whatever the dtype, GroupNorm and LayerNorm
statistics and normalization and the attention logits and softmax are computed in float32
(rounded to `dtype` after), as diffusers' bfloat16 models do; `attention` picks the attention
implementation (attention.IMPLEMENTATIONS).
"""

import dataclasses
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from att3d_jax.guidance import attention as attention_lib
from att3d_jax.guidance import convert
from att3d_jax.guidance import embeddings
from att3d_jax.guidance import unet_blocks

Dtype = Any

# diffusers block type -> (attention kind, resampler kind); see unet_blocks.py. The IF-style
# blocks (resnet resamplers) also take resnet_skip_time_act and resnet_out_scale_factor.
DOWN_BLOCK_TYPES = {
    'DownBlock2D': (None, 'conv'),
    'CrossAttnDownBlock2D': ('transformer', 'conv'),
    'ResnetDownsampleBlock2D': (None, 'resnet'),
    'SimpleCrossAttnDownBlock2D': ('added_kv', 'resnet'),
}
UP_BLOCK_TYPES = {
    'UpBlock2D': (None, 'conv'),
    'CrossAttnUpBlock2D': ('transformer', 'conv'),
    'ResnetUpsampleBlock2D': (None, 'resnet'),
    'SimpleCrossAttnUpBlock2D': ('added_kv', 'resnet'),
}
MID_BLOCK_TYPES = {
    'UNetMidBlock2DCrossAttn': 'transformer',
    'UNetMidBlock2DSimpleCrossAttn': 'added_kv',
    'UNetMidBlock2D': None,
}
CLASS_EMBED_TYPES = (None, 'timestep', 'identity', 'projection', 'simple_projection')


def _freeze(value: Any) -> Any:
  """JSON lists -> tuples (recursively), so that the config is hashable."""
  return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


def _thaw(value: Any) -> Any:
  return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _unsupported(field: str, value: Any, supported: str) -> NotImplementedError:
  return NotImplementedError(
      f'UNet config {field}={value!r} is not supported by the Flax port; supported: {supported}.')


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """diffusers' UNet2DConditionModel config (config.json); same field names and defaults."""
  sample_size: int | tuple[int, int] | None = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                                       'CrossAttnDownBlock2D', 'DownBlock2D')
  mid_block_type: str | None = 'UNetMidBlock2DCrossAttn'
  up_block_types: tuple[str, ...] = ('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                                     'CrossAttnUpBlock2D')
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0  # Inference only: dropout is never applied.
  act_fn: str = 'silu'
  norm_num_groups: int | None = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple[int, ...] = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  reverse_transformer_layers_per_block: tuple[tuple[int, ...], ...] | None = None
  encoder_hid_dim: int | None = None
  encoder_hid_dim_type: str | None = None
  # Despite its name, the number of heads of the SD transformer blocks (a diffusers naming
  # bug kept for compatibility); the head width of the IF added-KV attention.
  attention_head_dim: int | tuple[int | None, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  dual_cross_attention: bool = False
  use_linear_projection: bool = False
  class_embed_type: str | None = None
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  num_class_embeds: int | None = None
  upcast_attention: bool = False  # Attention softmax is always computed in float32.
  resnet_time_scale_shift: str = 'default'
  resnet_skip_time_act: bool = False
  resnet_out_scale_factor: float = 1.0
  time_embedding_type: str = 'positional'
  time_embedding_dim: int | None = None
  time_embedding_act_fn: str | None = None
  timestep_post_act: str | None = None
  time_cond_proj_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  projection_class_embeddings_input_dim: int | None = None
  attention_type: str = 'default'
  class_embeddings_concat: bool = False
  mid_block_only_cross_attention: bool | None = None
  cross_attention_norm: str | None = None
  addition_embed_type_num_heads: int = 64

  def __post_init__(self):
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name, _freeze(getattr(self, field.name)))
    self._check_supported()

  def _check_supported(self):
    """Raises NotImplementedError for config values the port does not implement."""
    fixed = dict(time_embedding_type='positional', time_cond_proj_dim=None,
                 num_attention_heads=None, dual_cross_attention=False, attention_type='default',
                 reverse_transformer_layers_per_block=None)
    for field, default in fixed.items():
      if getattr(self, field) != default:
        raise _unsupported(field, getattr(self, field), repr(default))
    for i, name in enumerate(self.down_block_types):
      if _strip_unet_res(name) not in DOWN_BLOCK_TYPES:
        raise _unsupported(f'down_block_types[{i}]', name, ', '.join(DOWN_BLOCK_TYPES))
    for i, name in enumerate(self.up_block_types):
      if _strip_unet_res(name) not in UP_BLOCK_TYPES:
        raise _unsupported(f'up_block_types[{i}]', name, ', '.join(UP_BLOCK_TYPES))
    if self.mid_block_type is not None and self.mid_block_type not in MID_BLOCK_TYPES:
      raise _unsupported('mid_block_type', self.mid_block_type,
                         f'{", ".join(MID_BLOCK_TYPES)}, None')
    if self.norm_num_groups is None:
      raise _unsupported('norm_num_groups', None, 'an int')
    for field in ('act_fn', 'time_embedding_act_fn', 'timestep_post_act'):
      value = getattr(self, field)
      if value is not None and value.lower() not in unet_blocks.ACTIVATIONS:
        raise _unsupported(field, value, ', '.join(unet_blocks.ACTIVATIONS))
    if self.resnet_time_scale_shift not in ('default', 'scale_shift'):
      raise _unsupported('resnet_time_scale_shift', self.resnet_time_scale_shift,
                         '"default", "scale_shift"')
    if self.class_embed_type not in CLASS_EMBED_TYPES:
      raise _unsupported('class_embed_type', self.class_embed_type, repr(CLASS_EMBED_TYPES))
    if (self.class_embed_type in ('projection', 'simple_projection') and
        self.projection_class_embeddings_input_dim is None):
      raise ValueError(f'class_embed_type={self.class_embed_type!r} needs '
                       'projection_class_embeddings_input_dim in the config.')
    if self.addition_embed_type not in (None, 'text'):
      raise _unsupported('addition_embed_type', self.addition_embed_type, 'None, "text"')
    if self.encoder_hid_dim_type not in (None, 'text_proj'):
      raise _unsupported('encoder_hid_dim_type', self.encoder_hid_dim_type, 'None, "text_proj"')
    if self.encoder_hid_dim_type is not None and self.encoder_hid_dim is None:
      raise ValueError(f'encoder_hid_dim_type={self.encoder_hid_dim_type!r} needs encoder_hid_dim.')
    if self.cross_attention_norm not in (None, 'layer_norm', 'group_norm'):
      raise _unsupported('cross_attention_norm', self.cross_attention_norm,
                         'None, "layer_norm", "group_norm"')
    if any(isinstance(n, tuple) for n in self.per_block(self.transformer_layers_per_block)):
      raise _unsupported('transformer_layers_per_block', self.transformer_layers_per_block,
                         'an int or one int per block')
    num_blocks = len(self.block_out_channels)
    for field in ('down_block_types', 'up_block_types', 'only_cross_attention', 'layers_per_block',
                  'attention_head_dim', 'cross_attention_dim', 'transformer_layers_per_block'):
      value = getattr(self, field)
      if isinstance(value, tuple) and len(value) != num_blocks:
        raise ValueError(f'UNet config {field}={value!r} must have one entry per block '
                         f'({num_blocks}, as block_out_channels={self.block_out_channels}).')

  @classmethod
  def from_dict(cls, config: dict[str, Any]) -> 'UNetConfig':
    """From a config.json dict; `_`-prefixed metadata is dropped, unknown fields are logged
    and ignored (as diffusers does)."""
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if k not in names and not k.startswith('_'))
    if unknown:
      logging.warning('UNet config fields unknown to the Flax port are ignored: %s', unknown)
    return cls(**{k: v for k, v in config.items() if k in names})

  def to_dict(self) -> dict[str, Any]:
    """The config.json dict that diffusers' `UNet2DConditionModel.from_pretrained` reads."""
    config = {field.name: _thaw(getattr(self, field.name)) for field in dataclasses.fields(self)}
    return {'_class_name': 'UNet2DConditionModel', **config}

  def per_block(self, value: Any) -> tuple[Any, ...]:
    """A per-block tuple from an int/bool/str config value (tuples pass through)."""
    return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

  @property
  def num_blocks(self) -> int:
    return len(self.block_out_channels)

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def context_dim(self) -> int:
    """Width of the `encoder_hidden_states` the model takes."""
    if self.encoder_hid_dim is not None:
      return self.encoder_hid_dim
    return self.per_block(self.cross_attention_dim)[0]


def _strip_unet_res(block_type: str) -> str:
  # diffusers accepts a legacy "UNetRes" prefix on block type names.
  return block_type[len('UNetRes'):] if block_type.startswith('UNetRes') else block_type


def _resnet_settings(config: UNetConfig, if_style: bool,
                     output_scale_factor: float | None = None) -> unet_blocks.ResnetSettings:
  """diffusers passes resnet_skip_time_act / resnet_out_scale_factor to IF-style blocks only."""
  if output_scale_factor is None:
    output_scale_factor = config.resnet_out_scale_factor if if_style else 1.0
  return unet_blocks.ResnetSettings(
      groups=config.norm_num_groups, eps=config.norm_eps, act_fn=config.act_fn,
      time_embedding_norm=config.resnet_time_scale_shift,
      skip_time_act=config.resnet_skip_time_act and if_style,
      output_scale_factor=output_scale_factor)


def _attention_settings(config: UNetConfig, kind: str | None, block: int, channels: int,
                        num_layers: int, transformer_block: int | None = None,
                        only_cross_attention: bool = False, implementation: str = 'xla'
                        ) -> attention_lib.CrossAttentionSettings | None:
  """Attention of block `block`; `transformer_block` indexes the head count and layer count of
  the SD transformers (reversed on the up path), `block` the IF head width (never reversed,
  as in diffusers)."""
  head_dims = config.per_block(config.attention_head_dim)
  if kind == 'transformer':
    index = block if transformer_block is None else transformer_block
    layers = config.per_block(config.transformer_layers_per_block)[index]
    return attention_lib.CrossAttentionSettings(
        'transformer', num_heads=head_dims[index], transformer_layers=(layers,) * num_layers,
        use_linear_projection=config.use_linear_projection,
        only_cross_attention=only_cross_attention, implementation=implementation)
  if kind == 'added_kv':
    head_dim = head_dims[block] if head_dims[block] is not None else channels
    return attention_lib.CrossAttentionSettings(
        'added_kv', head_dim=head_dim, only_cross_attention=only_cross_attention,
        cross_attention_norm=config.cross_attention_norm, implementation=implementation)
  return None


class UNet2DConditionModel(nn.Module):
  """The conditional UNet; see the module docstring.

  Attributes:
    config: the parsed config.json.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    attention: attention implementation, one of attention.IMPLEMENTATIONS.
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = 'xla'

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               class_labels: jax.Array | None = None,
               encoder_attention_mask: jax.Array | None = None) -> jax.Array:
    """Predicts the model output (noise, or noise and variance) like diffusers' `.sample`.

    Args:
      sample: [batch, in_channels, height, width] noisy images or latents.
      timesteps: scalar or [batch] diffusion timesteps (may be fractional).
      encoder_hidden_states: [batch, keys, context_dim] text embeddings.
      class_labels: needed when the config has a class embedding: [batch] timesteps or class
        ids, or [batch, projection_class_embeddings_input_dim] for "projection".
      encoder_attention_mask: optional [batch, keys], 1 keep / 0 discard.

    Returns:
      [batch, out_channels, height, width] float32.
    """
    config = self.config
    attention_lib.check_implementation(self.attention)
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = unet_blocks.activation(config.act_fn)
    batch = sample.shape[0]
    x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
    if config.center_input_sample:
      x = 2 * x - 1.0
    context = jnp.asarray(encoder_hidden_states, self.dtype)
    context_bias = attention_lib.mask_to_bias(encoder_attention_mask)

    # Time, class and text embeddings, summed (or concatenated) into one vector per sample.
    sinusoid = lambda t: embeddings.timestep_embedding(
        jnp.broadcast_to(jnp.ravel(t), (batch,)), config.block_out_channels[0],
        config.flip_sin_to_cos, config.freq_shift).astype(self.dtype)
    emb = embeddings.TimestepEmbedding(config.time_embed_dim, config.act_fn,
                                       config.timestep_post_act, name='time_embedding',
                                       **kwargs)(sinusoid(timesteps))
    class_emb = self._class_embedding(class_labels, sinusoid)
    if class_emb is not None:
      class_emb = class_emb.astype(self.dtype)
      emb = (jnp.concatenate([emb, class_emb], axis=-1) if config.class_embeddings_concat
             else emb + class_emb)
    if config.addition_embed_type == 'text':
      emb = emb + embeddings.TextTimeEmbedding(config.time_embed_dim,
                                               config.addition_embed_type_num_heads,
                                               name='add_embedding', **kwargs)(context)
    if config.time_embedding_act_fn is not None:
      emb = unet_blocks.activation(config.time_embedding_act_fn)(emb)
    if config.encoder_hid_dim is not None:
      context = nn.Dense(config.cross_attention_dim, name='encoder_hid_proj', **kwargs)(context)

    x = unet_blocks.conv(config.block_out_channels[0], config.conv_in_kernel, 'conv_in',
                         **kwargs)(x)

    num_blocks = config.num_blocks
    layers_per_block = config.per_block(config.layers_per_block)
    only_cross = config.per_block(config.only_cross_attention)
    skips = [x]
    for i, block_type in enumerate(config.down_block_types):
      attention, resample = DOWN_BLOCK_TYPES[_strip_unet_res(block_type)]
      channels = config.block_out_channels[i]
      x, block_skips = unet_blocks.DownBlock(
          channels, layers_per_block[i], _resnet_settings(config, resample == 'resnet'),
          _attention_settings(config, attention, i, channels, layers_per_block[i],
                              only_cross_attention=only_cross[i], implementation=self.attention),
          downsample=resample if i < num_blocks - 1 else None,
          downsample_padding=config.downsample_padding, name=f'down_blocks.{i}', **kwargs)(
              x, emb, context, context_bias)
      skips.extend(block_skips)

    if config.mid_block_type is not None:
      attention = MID_BLOCK_TYPES[config.mid_block_type]
      mid_only_cross = config.mid_block_only_cross_attention
      if mid_only_cross is None:
        mid_only_cross = (config.only_cross_attention
                          if isinstance(config.only_cross_attention, bool) else False)
      x = unet_blocks.MidBlock(
          _resnet_settings(config, attention == 'added_kv', config.mid_block_scale_factor),
          _attention_settings(config, attention, num_blocks - 1, x.shape[-1], 1,
                              only_cross_attention=attention == 'added_kv' and mid_only_cross,
                              implementation=self.attention),
          num_attention_layers=0 if attention is None else 1, name='mid_block', **kwargs)(
              x, emb, context, context_bias)

    # Sizes that are not multiples of the total upsampling are restored from the skips.
    num_upsamplers = num_blocks - 1
    forward_upsample_size = any(s % 2**num_upsamplers for s in sample.shape[2:])
    for i, block_type in enumerate(config.up_block_types):
      attention, resample = UP_BLOCK_TYPES[_strip_unet_res(block_type)]
      reversed_index = num_blocks - 1 - i
      channels = config.block_out_channels[reversed_index]
      num_layers = layers_per_block[reversed_index] + 1
      block_skips, skips = tuple(skips[-num_layers:]), skips[:-num_layers]
      is_final = i == num_blocks - 1
      upsample_size = skips[-1].shape[1:3] if forward_upsample_size and not is_final else None
      x = unet_blocks.UpBlock(
          channels, num_layers, _resnet_settings(config, resample == 'resnet'),
          _attention_settings(config, attention, i, channels, num_layers,
                              transformer_block=reversed_index,
                              only_cross_attention=only_cross[reversed_index],
                              implementation=self.attention),
          upsample=None if is_final else resample, name=f'up_blocks.{i}', **kwargs)(
              x, block_skips, emb, context, context_bias, upsample_size)

    x = act(unet_blocks.group_norm(config.norm_num_groups, config.norm_eps, 'conv_norm_out',
                                   **kwargs)(x))
    x = unet_blocks.conv(config.out_channels, config.conv_out_kernel, 'conv_out', **kwargs)(x)
    return jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32)

  def _class_embedding(self, class_labels, sinusoid) -> jax.Array | None:
    config = self.config
    kind = config.class_embed_type
    if kind is None and config.num_class_embeds is None:
      return None
    if class_labels is None:
      raise ValueError(f'this UNet (class_embed_type={kind!r}, num_class_embeds='
                       f'{config.num_class_embeds}) needs class_labels.')
    kwargs = dict(name='class_embedding', dtype=self.dtype, param_dtype=self.param_dtype)
    if kind is None:
      return nn.Embed(config.num_class_embeds, config.time_embed_dim, **kwargs)(class_labels)
    if kind == 'timestep':
      return embeddings.TimestepEmbedding(config.time_embed_dim, config.act_fn, **kwargs)(
          sinusoid(class_labels))
    if kind == 'projection':  # diffusers builds this one with the default "silu".
      return embeddings.TimestepEmbedding(config.time_embed_dim, **kwargs)(
          class_labels.astype(self.dtype))
    if kind == 'simple_projection':
      return nn.Dense(config.time_embed_dim, **kwargs)(class_labels.astype(self.dtype))
    return class_labels  # "identity"


def example_inputs(config: UNetConfig, batch_size: int = 1, size: int | None = None,
                   sequence_length: int = 1) -> dict[str, jax.Array]:
  """Zero inputs of the right shapes (for `init` / `jax.eval_shape`), keyed like `__call__`."""
  size = size or 2**(config.num_blocks - 1)
  inputs = dict(sample=jnp.zeros((batch_size, config.in_channels, size, size), jnp.float32),
                timesteps=jnp.zeros((batch_size,), jnp.float32),
                encoder_hidden_states=jnp.zeros((batch_size, sequence_length, config.context_dim),
                                                jnp.float32))
  kind = config.class_embed_type
  if kind == 'timestep':
    inputs['class_labels'] = jnp.zeros((batch_size,), jnp.float32)
  elif kind in ('projection', 'simple_projection'):
    inputs['class_labels'] = jnp.zeros(
        (batch_size, config.projection_class_embeddings_input_dim), jnp.float32)
  elif kind == 'identity':
    inputs['class_labels'] = jnp.zeros((batch_size, config.time_embed_dim), jnp.float32)
  elif config.num_class_embeds is not None:
    inputs['class_labels'] = jnp.zeros((batch_size,), jnp.int32)
  return inputs


def param_shapes(module: UNet2DConditionModel) -> Any:
  """The params tree of `module` as `jax.ShapeDtypeStruct`s (nothing is computed)."""
  return jax.eval_shape(module.init, jax.random.key(0), **example_inputs(module.config))['params']


class LoadedUNet:
  """A UNet with its params: call it like diffusers' UNet (NCHW arrays, jitted).

  Attributes:
    module: the Flax `UNet2DConditionModel`.
    params: its params tree.
    config: the parsed `UNetConfig`.
  """

  def __init__(self, module: UNet2DConditionModel, params: Any):
    self.module = module
    self.params = params
    self.config = module.config
    self._apply = jax.jit(module.apply)

  def __call__(self, sample, timesteps, encoder_hidden_states, class_labels=None,
               encoder_attention_mask=None) -> jax.Array:
    """See `UNet2DConditionModel.__call__`; inputs may be numpy arrays or Python scalars."""
    as_float = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    if class_labels is not None:
      class_labels = jnp.asarray(class_labels)
    return self._apply({'params': self.params}, as_float(sample), as_float(timesteps),
                       as_float(encoder_hidden_states), class_labels,
                       as_float(encoder_attention_mask))


def load_unet(folder: str, dtype: Dtype = jnp.float32, attention: str = 'xla') -> LoadedUNet:
  """Loads a diffusers UNet2DConditionModel folder into the Flax port.

  Args:
    folder: a diffusers pipeline folder (with unet/) or its unet/ folder.
    dtype: compute and parameter dtype (jnp.bfloat16 on accelerators).
    attention: attention implementation, one of attention.IMPLEMENTATIONS.

  Raises:
    FileNotFoundError: the folder lacks config.json or the safetensors weights.
    NotImplementedError: the config uses a feature the port does not implement.
    ValueError: the weights do not match the config (missing/unexpected keys, shapes).
  """
  folder = convert.model_folder(folder, 'unet')
  with open(os.path.join(folder, convert.CONFIG_NAME)) as f:
    config = UNetConfig.from_dict(json.load(f))
  attention_lib.check_implementation(attention)
  module = UNet2DConditionModel(config, dtype=dtype, param_dtype=dtype, attention=attention)
  params = convert.torch_to_flax(convert.read_safetensors(folder), param_shapes(module))
  params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)
  return LoadedUNet(module, params)


def save_unet(folder: str, module_config: UNetConfig, params: Any) -> None:
  """Writes config.json + diffusion_pytorch_model.safetensors (float32) into `folder`,
  loadable by diffusers' `UNet2DConditionModel.from_pretrained(folder)` and by `load_unet`."""
  convert.write_diffusers_folder(folder, module_config.to_dict(), params)
