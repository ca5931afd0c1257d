"""Attention layers of the diffusers UNet: transformer blocks (SD) and added-KV attention (IF).

Flax submodule names mirror diffusers' module paths (`to_q`, `to_out.0`, `ff.net.0.proj`,
`transformer_blocks.0`, ...), so that a parameter path joined by "." is the PyTorch
state-dict key up to the leaf rename done in convert.py.

All layers work on channels-last arrays: token sequences `[batch, length, channels]` and
images `[batch, height, width, channels]`. Attention logits and the softmax are computed in
float32 whatever the compute dtype, which is what diffusers' `upcast_attention` and
`upcast_softmax` ask for and changes nothing in float32.

Attention implementations (`IMPLEMENTATIONS`, config.guidance.attention):
  "xla": `dot_product_attention` below: batched matmuls and a softmax that XLA fuses;
      the fastest on CPU.
  "dot_product": `jax.nn.dot_product_attention` with JAX's default implementation
      (today XLA's, with the same float32 logits and softmax).
  "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused
      (flash) attention: NVIDIA GPUs only, bfloat16/float16 compute, head width <= 128.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from att3d_jax.guidance import unet_blocks

Dtype = Any

# diffusers turns a {1 keep, 0 discard} mask into this additive logit bias.
MASKED_LOGIT_BIAS = -10000.0
IMPLEMENTATIONS = ('xla', 'dot_product', 'cudnn')


def mask_to_bias(mask: jax.Array | None) -> jax.Array | None:
  """Key-padding mask `[batch, keys]` (1 keep, 0 discard) -> additive logit bias, float32."""
  if mask is None:
    return None
  return (1.0 - mask.astype(jnp.float32)) * MASKED_LOGIT_BIAS


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, num_heads: int,
                          bias: jax.Array | None = None) -> jax.Array:
  """Multi-head softmax attention over the full key sequence.

  Args:
    query: [batch, queries, num_heads * head_dim].
    key, value: [batch, keys, num_heads * head_dim].
    num_heads: heads the last axis is split into (head-major, like diffusers' reshape).
    bias: optional [batch, keys] float32 additive logit bias (see `mask_to_bias`).

  Returns:
    [batch, queries, num_heads * head_dim] in the dtype of `value`.
  """
  batch, num_queries, width = query.shape
  head_dim = width // num_heads
  # [batch, length, heads * head_dim] -> [batch, heads, length, head_dim]; explicit transposes
  # and batched matmuls compile to faster CPU code than the equivalent einsums.
  heads_first = lambda x: x.reshape(*x.shape[:2], num_heads, head_dim).transpose(0, 2, 1, 3)
  # Scaling the queries, not the logits, keeps the scale off the [queries, keys] tensor.
  query = heads_first(query * jnp.asarray(head_dim**-0.5, query.dtype))
  logits = jnp.matmul(query, heads_first(key).transpose(0, 1, 3, 2),
                      preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias[:, None, None, :]
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  out = jnp.matmul(weights, heads_first(value))
  return out.transpose(0, 2, 1, 3).reshape(batch, num_queries, width)


def check_implementation(implementation: str) -> None:
  """ValueError naming the flag unless `implementation` is one of IMPLEMENTATIONS."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'--config.guidance.attention={implementation!r} is not an attention '
                     f'implementation; use one of {IMPLEMENTATIONS} (see guidance/attention.py).')


def attend(query: jax.Array, key: jax.Array, value: jax.Array, num_heads: int,
           bias: jax.Array | None = None, implementation: str = 'xla') -> jax.Array:
  """`dot_product_attention` through the chosen implementation (module docstring).

  Args: as `dot_product_attention`; implementation: one of IMPLEMENTATIONS.

  Returns:
    [batch, queries, num_heads * head_dim] in the dtype of `value`.
  """
  check_implementation(implementation)
  if implementation == 'xla':
    return dot_product_attention(query, key, value, num_heads, bias)
  if implementation == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError(
        '--config.guidance.attention="cudnn" is cuDNN\'s fused attention, which needs an '
        f'NVIDIA GPU (JAX backend: {jax.default_backend()!r}); use "dot_product" or "xla".')
  batch, num_queries, width = query.shape
  num_keys = key.shape[1]
  # cuDNN's fused attention differentiates a biased attention only over even query and key
  # lengths (IF's added-KV attention has 64 * 64 + 77 keys): pad both to even, the padded
  # key masked out by the bias, the padded query row dropped from the output.
  query, key, value = (_pad_to_even(x) for x in (query, key, value))
  if key.shape[1] != num_keys:
    if bias is None:
      bias = jnp.zeros((batch, num_keys), jnp.float32)
    bias = jnp.pad(bias, ((0, 0), (0, 1)), constant_values=MASKED_LOGIT_BIAS)
  split_heads = lambda x: x.reshape(*x.shape[:2], num_heads, width // num_heads)
  if bias is not None:  # [batch, keys] -> [batch, 1, queries, keys] (cuDNN wants every query)
    bias = jnp.broadcast_to(bias[:, None, None, :].astype(query.dtype),
                            (batch, 1, query.shape[1], key.shape[1]))
  out = jax.nn.dot_product_attention(
      split_heads(query), split_heads(key), split_heads(value), bias=bias,
      implementation='cudnn' if implementation == 'cudnn' else None)
  return out.reshape(batch, -1, width)[:, :num_queries]


def _pad_to_even(tokens: jax.Array) -> jax.Array:
  """[batch, length, width] with one zero token appended when length is odd."""
  if tokens.shape[1] % 2 == 0:
    return tokens
  return jnp.pad(tokens, ((0, 0), (0, 1), (0, 0)))


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  """torch.nn.LayerNorm(eps=1e-5): flax reduces in float32 (force_float32_reductions) and
  normalizes the float32-promoted input, so only the output is rounded to `dtype`."""
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, force_float32_reductions=True,
                      name=name, dtype=dtype, param_dtype=param_dtype)


def _dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True):
  return nn.Dense(features, use_bias=use_bias, name=name, dtype=dtype, param_dtype=param_dtype)


class Attention(nn.Module):
  """diffusers `Attention` with the default processor: q from x, k/v from a context.

  Attributes:
    num_heads: attention heads.
    head_dim: channels per head (inner width = num_heads * head_dim).
    use_bias: biases on to_q/to_k/to_v (the output projection always has one).
    implementation: one of IMPLEMENTATIONS.
  """
  num_heads: int
  head_dim: int
  use_bias: bool = False
  implementation: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden_states: jax.Array, context: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    """hidden_states: [batch, length, channels]; context: [batch, keys, context_dim] or None
    (self-attention); bias: [batch, keys]. Returns [batch, length, channels]."""
    context = hidden_states if context is None else context
    inner = self.num_heads * self.head_dim
    dense = lambda n, name, b=self.use_bias: _dense(n, name, self.dtype, self.param_dtype, b)
    query = dense(inner, 'to_q')(hidden_states)
    key = dense(inner, 'to_k')(context)
    value = dense(inner, 'to_v')(context)
    out = attend(query, key, value, self.num_heads, bias, self.implementation)
    return dense(hidden_states.shape[-1], 'to_out.0', True)(out)


class GEGLU(nn.Module):
  """Gated GELU (exact erf GELU, like torch's default): proj -> value * gelu(gate)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jnp.split(_dense(2 * self.features, 'proj', self.dtype, self.param_dtype)(x), 2,
                            axis=-1)
    return value * unet_blocks.activation('gelu')(gate)


class FeedForward(nn.Module):
  """diffusers `FeedForward` with the GEGLU activation, inner width `mult` * channels."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = GEGLU(self.mult * x.shape[-1], name='net.0', dtype=self.dtype,
                   param_dtype=self.param_dtype)(x)
    return _dense(x.shape[-1], 'net.2', self.dtype, self.param_dtype)(hidden)


class BasicTransformerBlock(nn.Module):
  """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual.

  With `only_cross_attention` the first attention also attends to the context (no
  self-attention at all), as in diffusers; its key-padding mask is not applied there.
  """
  num_heads: int
  head_dim: int
  only_cross_attention: bool = False
  implementation: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               context_bias: jax.Array | None = None) -> jax.Array:
    """x: [batch, length, channels]; context: [batch, keys, context_dim];
    context_bias: [batch, keys]."""
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layer_norm(name, **kwargs)
    attention = lambda name: Attention(self.num_heads, self.head_dim,
                                       implementation=self.implementation, name=name, **kwargs)
    x = attention('attn1')(norm('norm1')(x), context if self.only_cross_attention else None) + x
    x = attention('attn2')(norm('norm2')(x), context, context_bias) + x
    return FeedForward(name='ff', **kwargs)(norm('norm3')(x)) + x


class Transformer2DModel(nn.Module):
  """GroupNorm -> projection in -> transformer blocks -> projection out, plus the input.

  Attributes:
    num_heads, head_dim: attention shape; the inner width is their product.
    num_layers: BasicTransformerBlocks.
    norm_num_groups: groups of the input GroupNorm (its epsilon is fixed to 1e-6 in diffusers).
    use_linear_projection: Dense projections (SD 2.x) instead of 1x1 convolutions (SD 1.x).
  """
  num_heads: int
  head_dim: int
  num_layers: int = 1
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  implementation: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               context_bias: jax.Array | None = None) -> jax.Array:
    """x: [batch, height, width, channels] -> same shape."""
    batch, height, width, channels = x.shape
    inner = self.num_heads * self.head_dim
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.use_linear_projection:
      project = lambda n, name: nn.Dense(n, name=name, **kwargs)
    else:
      project = lambda n, name: nn.Conv(n, (1, 1), name=name, **kwargs)
    hidden = unet_blocks.group_norm(self.norm_num_groups, 1e-6, 'norm', **kwargs)(x)
    hidden = project(inner, 'proj_in')(hidden).reshape(batch, height * width, inner)
    for i in range(self.num_layers):
      hidden = BasicTransformerBlock(self.num_heads, self.head_dim, self.only_cross_attention,
                                     self.implementation, name=f'transformer_blocks.{i}',
                                     **kwargs)(
                                         hidden, context, context_bias)
    hidden = project(channels, 'proj_out')(hidden.reshape(batch, height, width, inner))
    return hidden + x


class AddedKVAttention(nn.Module):
  """diffusers `Attention` with `AttnAddedKVProcessor` (DeepFloyd IF's Simple* blocks).

  The image tokens attend to the projected text tokens (add_k_proj / add_v_proj)
  concatenated in front of their own keys and values (to_k / to_v), unless
  `only_cross_attention`. A GroupNorm precedes the projections and the input is added back.

  Attributes:
    head_dim: channels per head; heads = channels // head_dim.
    norm_num_groups: groups of the input GroupNorm (epsilon 1e-5, diffusers' default here).
    cross_attention_norm: None, "layer_norm" or "group_norm" (32 groups) on the text tokens.
    implementation: one of IMPLEMENTATIONS.
  """
  head_dim: int
  norm_num_groups: int = 32
  only_cross_attention: bool = False
  cross_attention_norm: str | None = None
  implementation: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               context_bias: jax.Array | None = None) -> jax.Array:
    """x: [batch, height, width, channels]; context: [batch, keys, context_dim];
    context_bias: [batch, keys]. Returns x's shape."""
    batch, height, width, channels = x.shape
    num_heads = channels // self.head_dim
    inner = num_heads * self.head_dim
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda n, name: _dense(n, name, **kwargs)
    if self.cross_attention_norm == 'layer_norm':
      context = layer_norm('norm_cross', **kwargs)(context)
    elif self.cross_attention_norm == 'group_norm':
      context = unet_blocks.group_norm(32, 1e-5, 'norm_cross', **kwargs)(context)
    elif self.cross_attention_norm is not None:
      raise NotImplementedError(
          f'cross_attention_norm={self.cross_attention_norm!r} is not supported; use None, '
          '"layer_norm" or "group_norm".')
    hidden = unet_blocks.group_norm(self.norm_num_groups, 1e-5, 'group_norm', **kwargs)(x)
    hidden = hidden.reshape(batch, height * width, channels)
    query = dense(inner, 'to_q')(hidden)
    key = dense(inner, 'add_k_proj')(context)
    value = dense(inner, 'add_v_proj')(context)
    if not self.only_cross_attention:
      key = jnp.concatenate([key, dense(inner, 'to_k')(hidden)], axis=1)
      value = jnp.concatenate([value, dense(inner, 'to_v')(hidden)], axis=1)
      if context_bias is not None:  # The image tokens are never masked.
        context_bias = jnp.pad(context_bias, ((0, 0), (0, height * width)))
    out = attend(query, key, value, num_heads, context_bias, self.implementation)
    out = dense(channels, 'to_out.0')(out).reshape(batch, height, width, channels)
    return out + x


@dataclasses.dataclass(frozen=True)
class CrossAttentionSettings:
  """The attention that follows each resnet of a block.

  Attributes:
    kind: "transformer" (Transformer2DModel, SD) or "added_kv" (AddedKVAttention, IF).
    num_heads: "transformer" only; head_dim = channels // num_heads.
    head_dim: "added_kv" only; heads = channels // head_dim.
    transformer_layers: "transformer" only; BasicTransformerBlocks per resnet layer.
    use_linear_projection: "transformer" only.
    only_cross_attention: no self-attention (both kinds).
    cross_attention_norm: "added_kv" only: None, "layer_norm" or "group_norm".
    implementation: how attention is computed, one of IMPLEMENTATIONS.
  """
  kind: str
  num_heads: int | None = None
  head_dim: int | None = None
  transformer_layers: tuple[int, ...] = (1,)
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  cross_attention_norm: str | None = None
  implementation: str = 'xla'

  def build(self, channels: int, norm_num_groups: int, layer: int, name: str, dtype: Dtype,
            param_dtype: Dtype) -> nn.Module:
    """The attention module after resnet `layer` of a block with `channels` channels."""
    kwargs = dict(name=name, dtype=dtype, param_dtype=param_dtype)
    if self.kind == 'transformer':
      return Transformer2DModel(
          self.num_heads, channels // self.num_heads, num_layers=self.transformer_layers[layer],
          norm_num_groups=norm_num_groups, use_linear_projection=self.use_linear_projection,
          only_cross_attention=self.only_cross_attention, implementation=self.implementation,
          **kwargs)
    if self.kind == 'added_kv':
      return AddedKVAttention(
          self.head_dim, norm_num_groups=norm_num_groups,
          only_cross_attention=self.only_cross_attention,
          cross_attention_norm=self.cross_attention_norm, implementation=self.implementation,
          **kwargs)
    raise ValueError(f'attention kind must be "transformer" or "added_kv", got {self.kind!r}.')
