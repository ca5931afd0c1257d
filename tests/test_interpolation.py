"""Tests of interpolation sampling and mixing (amortize/interpolation.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.amortize import interpolation


@pytest.mark.parametrize("k", [2, 4])
def test_dirichlet_weights_lie_on_simplex_with_mean_one_over_k(k):
  alpha = np.asarray(interpolation.sample_weights(jax.random.key(0), k, 1.0, 20000))
  assert alpha.shape == (20000, k)
  assert (alpha >= 0).all()
  np.testing.assert_allclose(alpha.sum(axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(alpha.mean(axis=0), 1.0 / k, atol=0.01)


def test_kappa_moves_weights_from_vertices_to_center():
  def max_weight(kappa):
    alpha = interpolation.sample_weights(jax.random.key(1), 3, kappa, 5000)
    return np.asarray(alpha.max(axis=1))
  small, large = max_weight(0.05), max_weight(100.0)
  # Mostly at an endpoint prompt (measured 0.75; uniform kappa=1 gives ~0.01).
  assert np.mean(small > 0.95) > 0.6
  assert np.mean(max_weight(1.0) > 0.95) < 0.05
  assert np.mean(np.abs(large - 1 / 3) < 0.1) > 0.95  # Near the midpoint.


def test_mix_with_one_hot_returns_endpoint_and_is_linear():
  key_a, key_b, key_w = jax.random.split(jax.random.key(2), 3)
  embeddings = jax.random.normal(key_a, (5, 3, 7, 4))
  one_hot = jax.nn.one_hot(jnp.array([0, 2, 1, 1, 0]), 3)
  mixed = interpolation.mix_embeddings(embeddings, one_hot)
  np.testing.assert_array_equal(mixed, embeddings[jnp.arange(5), jnp.array([0, 2, 1, 1, 0])])
  alpha = interpolation.sample_weights(key_w, 3, 1.0, 5)
  expected = np.einsum("bk,bkij->bij", np.asarray(alpha), np.asarray(embeddings))
  np.testing.assert_allclose(interpolation.mix_embeddings(embeddings, alpha), expected,
                             rtol=1e-5, atol=1e-6)
  # Linear in the embeddings.
  other = jax.random.normal(key_b, embeddings.shape)
  np.testing.assert_allclose(
      interpolation.mix_embeddings(2.0 * embeddings - other, alpha),
      2.0 * interpolation.mix_embeddings(embeddings, alpha) -
      interpolation.mix_embeddings(other, alpha), rtol=1e-5, atol=1e-5)
  losses = jax.random.uniform(key_b, (5, 3))
  np.testing.assert_allclose(interpolation.mix_losses(losses, one_hot),
                             losses[jnp.arange(5), jnp.array([0, 2, 1, 1, 0])])
  np.testing.assert_allclose(interpolation.mix_losses(losses, alpha),
                             np.sum(np.asarray(alpha) * np.asarray(losses), axis=1),
                             rtol=1e-6)


@pytest.mark.parametrize("log_uniform", [False, True])
def test_guidance_weight_sampler_range(log_uniform):
  weights = np.asarray(interpolation.sample_guidance_weight(
      jax.random.key(3), 10000, 5.0, 100.0, log_uniform=log_uniform))
  assert weights.shape == (10000,)
  assert weights.min() >= 5.0 and weights.max() <= 100.0
  assert weights.min() < 6.0 and weights.max() > 95.0
  # Uniform: median at the midpoint; log-uniform: at the geometric mean.
  expected_median = np.sqrt(5.0 * 100.0) if log_uniform else 52.5
  np.testing.assert_allclose(np.median(weights), expected_median, rtol=0.05)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="kappa"):
    interpolation.sample_weights(jax.random.key(0), 2, 0.0, 4)
  with pytest.raises(ValueError, match="low=10"):
    interpolation.sample_guidance_weight(jax.random.key(0), 4, 10.0, 5.0)
  with pytest.raises(ValueError, match="low=0"):
    interpolation.sample_guidance_weight(jax.random.key(0), 4, 0.0, 5.0, log_uniform=True)
