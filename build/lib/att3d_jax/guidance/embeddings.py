"""Timestep and conditioning embeddings of the diffusers UNet, in Flax."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from att3d_jax.guidance import attention as attention_lib
from att3d_jax.guidance import unet_blocks

Dtype = Any


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `Timesteps`.

  frequency_k = max_period ** (-k / (dim / 2 - freq_shift)), k = 0 .. dim/2 - 1; the output is
  [sin, cos] (or [cos, sin] with `flip_sin_to_cos`), zero-padded to odd `dim`.

  Args:
    timesteps: [batch].
    dim: embedding width.

  Returns:
    [batch, dim] float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


class TimestepEmbedding(nn.Module):
  """linear_1 -> act -> linear_2 [-> post_act]: maps any vector to the time-embedding width."""
  features: int
  act_fn: str = 'silu'
  post_act_fn: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, in_features] -> [batch, features]."""
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.features, name='linear_1', **kwargs)(x)
    x = nn.Dense(self.features, name='linear_2', **kwargs)(unet_blocks.activation(self.act_fn)(x))
    if self.post_act_fn is not None:
      x = unet_blocks.activation(self.post_act_fn)(x)
    return x


class AttentionPooling(nn.Module):
  """DeepFloyd IF's attention pooling: a class token (token mean + a learned position
  embedding) attends over itself and the tokens; its output is the pooled vector."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: [batch, length, width] -> [batch, width]."""
    width = tokens.shape[-1]
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = lambda key, shape, dtype: jax.random.normal(key, shape, dtype) * width**-0.5
    position = self.param('positional_embedding', init, (1, width), self.param_dtype)
    class_token = tokens.mean(axis=1, keepdims=True) + position.astype(tokens.dtype)
    tokens = jnp.concatenate([class_token, tokens], axis=1)
    query = nn.Dense(width, name='q_proj', **kwargs)(class_token)
    key = nn.Dense(width, name='k_proj', **kwargs)(tokens)
    value = nn.Dense(width, name='v_proj', **kwargs)(tokens)
    return attention_lib.dot_product_attention(query, key, value, self.num_heads)[:, 0]


class TextTimeEmbedding(nn.Module):
  """addition_embed_type="text": LayerNorm -> attention pooling -> Dense -> LayerNorm."""
  features: int
  num_heads: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: [batch, length, width] text states -> [batch, features]."""
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, **kwargs)
    pooled = AttentionPooling(self.num_heads, name='pool', **kwargs)(norm('norm1')(tokens))
    return norm('norm2')(nn.Dense(self.features, name='proj', **kwargs)(pooled))
