"""SDS: the gradient w.r.t. the render is w(t) (eps_hat - eps), by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.guidance import schedule
from att3d_jax.guidance import sds
from att3d_jax.guidance import vae as vae_lib

ALPHAS_CUMPROD = schedule.alphas_cumprod_from_config({"beta_schedule": "squaredcos_cap_v2"})


def _stub_eps_np(noisy, timesteps, text):
  """A nonlinear stand-in for the UNet (so that differentiating through it would
  change the gradient), predicting 2C channels like IF (learned variance)."""
  t = timesteps.astype(np.float32)[:, None, None, None] / 1000.0
  text_term = np.tanh(text.mean(axis=(1, 2)))[:, None, None, None]
  eps = np.sin(3.0 * noisy) * (1.0 + t) + text_term * noisy ** 2
  return np.concatenate([eps, 1e3 * np.ones_like(eps)], axis=1)


@jax.custom_vjp
def _stub_eps(noisy, timesteps, text):
  t = timesteps.astype(jnp.float32)[:, None, None, None] / 1000.0
  text_term = jnp.tanh(text.mean(axis=(1, 2)))[:, None, None, None]
  eps = jnp.sin(3.0 * noisy) * (1.0 + t) + text_term * noisy ** 2
  return jnp.concatenate([eps, 1e3 * jnp.ones_like(eps)], axis=1)


def _never_differentiated(*args):
  raise AssertionError("SDS differentiated through the UNet")


# The stub refuses reverse-mode differentiation: SDS must never build the UNet's VJP.
_stub_eps.defvjp(lambda *args: (_stub_eps(*args), None), _never_differentiated)


def _inputs(batch=3, size=8, length=5, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
  text_cond = rng.normal(size=(batch, length, dim)).astype(np.float32)
  text_uncond = rng.normal(size=(1, length, dim)).astype(np.float32)  # a negative prompt
  return images, text_cond, text_uncond


def test_pixel_gradient_is_weighted_eps_residual():
  images, text_cond, text_uncond = _inputs()
  guidance_scale = np.array([1.0, 7.5, 100.0], np.float32)  # per sample, all used below
  key = jax.random.PRNGKey(7)

  def loss_fn(images):
    x = sds.pixel_model_input(images)
    return sds.sds_loss(_stub_eps, x, key, jnp.asarray(text_cond), jnp.asarray(text_uncond),
                        alphas_cumprod=ALPHAS_CUMPROD, guidance_scale=jnp.asarray(guidance_scale),
                        t_range=(0.02, 0.98), weighting="sds")

  grad, aux = jax.jit(jax.grad(loss_fn, has_aux=True))(jnp.asarray(images))

  # By hand, with the documented key layout (timestep key, noise key).
  t_key, noise_key = jax.random.split(key)
  timesteps = np.asarray(sds.sample_timesteps(t_key, 3, 1000, (0.02, 0.98)))
  np.testing.assert_array_equal(aux["t"], timesteps)
  noise = np.asarray(jax.random.normal(noise_key, (3, 3, 8, 8), jnp.float32))
  x = 2.0 * images.transpose(0, 3, 1, 2) - 1.0
  alpha_bar = ALPHAS_CUMPROD[timesteps][:, None, None, None]
  noisy = np.sqrt(alpha_bar) * x + np.sqrt(1 - alpha_bar) * noise
  eps_cond = _stub_eps_np(noisy, timesteps, text_cond)[:, :3]
  eps_uncond = _stub_eps_np(noisy, timesteps, np.broadcast_to(text_uncond, text_cond.shape))[:, :3]
  eps_hat = eps_uncond + guidance_scale[:, None, None, None] * (eps_cond - eps_uncond)
  sds_grad = (1 - alpha_bar) * (eps_hat - noise)  # w(t) = 1 - alpha_bar (DreamFusion)
  expected = 2.0 * sds_grad.transpose(0, 2, 3, 1)  # d x / d image = 2

  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["weight"], 1 - alpha_bar[:, 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(aux["grad_norm"], np.sqrt((sds_grad ** 2).sum(axis=(1, 2, 3))),
                             rtol=1e-4)
  np.testing.assert_allclose(
      aux["guidance_rms"], np.sqrt(((eps_cond - eps_uncond) ** 2).mean(axis=(1, 2, 3))), rtol=1e-4)


def _sds_grad_fn(batch, seed, key):
  """grad(guidance_scale, **sds_loss options) -> (d loss / d x, aux) on fixed inputs."""
  images, text_cond, text_uncond = _inputs(batch=batch, seed=seed)
  x = sds.pixel_model_input(jnp.asarray(images))

  def grad(guidance_scale, **options):
    loss_fn = lambda x: sds.sds_loss(_stub_eps, x, key, text_cond, text_uncond,
                                     alphas_cumprod=ALPHAS_CUMPROD, guidance_scale=guidance_scale,
                                     **options)
    return jax.jit(jax.grad(loss_fn, has_aux=True))(x)

  return grad


def test_scalar_guidance_and_weightings():
  sds_grad = _sds_grad_fn(2, 1, jax.random.PRNGKey(0))
  grad = lambda scale, weighting: sds_grad(scale, weighting=weighting)
  scalar, aux = grad(5.0, "uniform")
  per_sample, _ = grad(jnp.array([5.0, 5.0]), "uniform")
  np.testing.assert_array_equal(scalar, per_sample)
  alpha_bar = ALPHAS_CUMPROD[np.asarray(aux["t"])][:, None, None, None]
  fantasia, _ = grad(5.0, "fantasia3d")
  np.testing.assert_allclose(fantasia, np.sqrt(alpha_bar) * (1 - alpha_bar) * scalar, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="unknown SDS weighting 'snr'.*uniform"):
    grad(5.0, "snr")


def test_guidance_interval_guides_only_the_samples_inside_it():
  sds_grad = _sds_grad_fn(8, 3, jax.random.PRNGKey(4))
  grad = lambda scale, interval: sds_grad(scale, guidance_interval=interval)

  guided, aux = grad(7.0, (0.0, 1.0))
  unguided, _ = grad(1.0, (0.0, 1.0))
  interval = (0.3, 0.6)
  mixed, mixed_aux = grad(7.0, interval)
  t_fraction = np.asarray(aux["t"]) / 1000
  inside = (t_fraction >= interval[0]) & (t_fraction <= interval[1])
  assert 0 < inside.sum() < len(inside)  # the key draws samples on both sides
  np.testing.assert_array_equal(mixed_aux["t"], aux["t"])  # the same noise and t
  np.testing.assert_allclose(mixed, np.where(inside[:, None, None, None], guided, unguided),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(mixed_aux["guidance_scale"], np.where(inside, 7.0, 1.0))
  np.testing.assert_array_equal(aux["guidance_scale"], np.full(8, 7.0))
  for bad in [(0.6, 0.3), (-0.1, 0.5), (0.2, 1.5)]:
    with pytest.raises(ValueError, match="guidance_interval"):
      grad(7.0, bad)


def test_resize_and_learned_variance_channels():
  images, text_cond, text_uncond = _inputs(batch=1, size=16, seed=2)
  x = sds.pixel_model_input(jnp.asarray(images), image_size=8)
  assert x.shape == (1, 3, 8, 8)
  assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0

  def eps_only(noisy, timesteps, text):  # the same prediction without variance channels
    return _stub_eps(noisy, timesteps, text)[:, :3]

  def grad(eps_fn):
    loss_fn = lambda images: sds.sds_loss(
        eps_fn, sds.pixel_model_input(images, image_size=8), jax.random.PRNGKey(1), text_cond,
        text_uncond, alphas_cumprod=ALPHAS_CUMPROD, guidance_scale=10.0)[0]
    return jax.jit(jax.grad(loss_fn))(jnp.asarray(images))

  with_variance = grad(_stub_eps)
  assert with_variance.shape == images.shape
  np.testing.assert_array_equal(with_variance, grad(eps_only))
  assert np.abs(with_variance).max() < 100  # the 1e3 variance channels were dropped


def test_timestep_sampling_and_annealing():
  t = np.asarray(sds.sample_timesteps(jax.random.PRNGKey(0), 20000, 1000, (0.02, 0.98)))
  assert t.dtype == np.int32 and t.min() == 20 and t.max() == 980
  assert abs(t.mean() - 500) < 5
  start = sds.annealed_t_range((0.02, 0.98), 0.5, 0.0)
  end = sds.annealed_t_range((0.02, 0.98), 0.5, 1.0)
  np.testing.assert_allclose([start[1], end[1], start[0]], [0.98, 0.5, 0.02], rtol=1e-6)
  t = np.asarray(sds.sample_timesteps(jax.random.PRNGKey(1), 5000, 1000, end))
  assert t.min() == 20 and t.max() == 500


def test_latent_mode_gradient_flows_through_encoder():
  module = vae_lib.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                                 norm_num_groups=4)
  # Random encoder params from the abstract shapes (compiling module.init is slow).
  shapes = jax.eval_shape(functools.partial(module.init, method=vae_lib.AutoencoderKL.encode),
                          jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)
  vae = vae_lib.VAE(module=module, params=params, scaling_factor=0.18215)
  images, text_cond, text_uncond = _inputs(batch=2, size=16, seed=3)
  sds_key = jax.random.PRNGKey(2)

  def latents_of(images):
    return sds.latent_model_input(vae, images, image_size=8)

  def loss_of_latents(latents):
    return sds.sds_loss(_stub_eps, latents, sds_key, text_cond, text_uncond,
                        alphas_cumprod=ALPHAS_CUMPROD, guidance_scale=7.5)[0]

  @jax.jit
  def gradients(images):
    grad = jax.grad(lambda images: loss_of_latents(latents_of(images)))(images)
    # Expected: the SDS gradient on the latents pulled back through the encoder.
    latents, pullback = jax.vjp(latents_of, images)
    posterior = vae.encode(sds.pixel_model_input(images, 8))
    return grad, pullback(jax.grad(loss_of_latents)(latents))[0], latents, posterior

  grad, expected, latents, posterior = gradients(jnp.asarray(images))
  assert grad.shape == images.shape and np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
  # The latents are the posterior mean times scaling_factor.
  assert latents.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(latents, 0.18215 * posterior.mean, rtol=1e-5, atol=1e-6)
