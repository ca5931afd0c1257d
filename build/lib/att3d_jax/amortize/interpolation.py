"""Interpolation training and guidance-weight amortization (ATT3D Sec. 3.3).

Per step, mixing weights alpha ~ Dirichlet(kappa * 1_k) over k sampled prompts
are drawn, and either the text embeddings are mixed before the mapping network
(latent interpolation, m(sum_i alpha_i c_i)) or the SDS losses of the k prompts
are mixed (loss interpolation, sum_i alpha_i L_i). Small kappa puts alpha near
the simplex's vertices (mostly the endpoint prompts), large kappa near its
center (midpoints). Guidance-weight amortization samples the CFG weight per
step; the caller appends it to the mapping network's input.
"""

import chex
import jax
import jax.numpy as jnp


def sample_weights(key: jax.Array, num_prompts_k: int, kappa: float,
                   batch: int) -> jax.Array:
  """alpha: [batch, k] ~ Dirichlet(kappa * ones(k)); rows sum to 1."""
  if num_prompts_k < 1 or kappa <= 0:
    raise ValueError(f"need num_prompts_k >= 1 and kappa > 0, got "
                     f"num_prompts_k={num_prompts_k}, kappa={kappa}.")
  concentration = jnp.full((num_prompts_k,), kappa, jnp.float32)
  return jax.random.dirichlet(key, concentration, (batch,), jnp.float32)


def mix_embeddings(embeddings: jax.Array, alpha: jax.Array) -> jax.Array:
  """Latent interpolation: sum_i alpha_i c_i.

  Args:
    embeddings: [batch, k, ...] the k prompts' embeddings per batch row.
    alpha: [batch, k] mixing weights.

  Returns:
    [batch, ...] mixed embeddings.
  """
  chex.assert_equal_shape_prefix([embeddings, alpha], 2)
  weights = alpha.reshape(alpha.shape + (1,) * (embeddings.ndim - 2))
  return jnp.sum(weights.astype(embeddings.dtype) * embeddings, axis=1)


def mix_losses(losses: jax.Array, alpha: jax.Array) -> jax.Array:
  """Loss interpolation: sum_i alpha_i L_i. losses, alpha: [batch, k] -> [batch]."""
  chex.assert_equal_shape([losses, alpha])
  return jnp.sum(alpha.astype(losses.dtype) * losses, axis=1)


def sample_guidance_weight(key: jax.Array, batch: int, low: float, high: float,
                           log_uniform: bool = False) -> jax.Array:
  """CFG weights [batch] uniform in [low, high], or log-uniform (uniform in
  log w, which spends as many samples on 5-10 as on 50-100)."""
  valid = (0 < low <= high) if log_uniform else (low <= high)
  if not valid:
    raise ValueError(f"need {'0 < ' if log_uniform else ''}low <= high for the "
                     f"guidance-weight range, got low={low}, high={high}.")
  if log_uniform:
    return jnp.exp(jax.random.uniform(key, (batch,), jnp.float32,
                                      jnp.log(low), jnp.log(high)))
  return jax.random.uniform(key, (batch,), jnp.float32, low, high)
