"""Schedules and the DDIM sampler against diffusers' PyTorch schedulers."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from att3d_jax.guidance import schedule

SCHEDULE_CONFIGS = [
    dict(beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02),
    # Stable Diffusion.
    dict(beta_schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085,
         beta_end=0.012),
    # DeepFloyd IF.
    dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000),
    dict(beta_schedule="scaled_linear", num_train_timesteps=500, beta_start=0.00085,
         beta_end=0.012, rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("config", SCHEDULE_CONFIGS, ids=lambda c: c["beta_schedule"])
def test_alphas_cumprod_matches_ddpm_scheduler(tmp_path, config):
  reference = diffusers.DDPMScheduler(**config)
  reference.save_pretrained(tmp_path / "scheduler")
  ours = schedule.load_alphas_cumprod(str(tmp_path))
  assert ours.dtype == np.float32 and ours.shape == (config["num_train_timesteps"],)
  np.testing.assert_allclose(ours, reference.alphas_cumprod.numpy(), rtol=0, atol=1e-6)


def test_unknown_schedule_and_missing_folder_are_explained(tmp_path):
  with pytest.raises(ValueError, match="sigmoid.*squaredcos_cap_v2"):
    schedule.alphas_cumprod_from_config({"beta_schedule": "sigmoid"})
  with pytest.raises(FileNotFoundError, match="--config.guidance.path.*scheduler_config.json"):
    schedule.load_alphas_cumprod(str(tmp_path))


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_ddim_timesteps_match_diffusers(spacing, offset):
  reference = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
  reference.set_timesteps(7)
  np.testing.assert_array_equal(schedule.ddim_timesteps(1000, 7, spacing, offset),
                                reference.timesteps.numpy())


# A toy "denoiser": linear in the sample, depends on t and on the text, and
# predicts 2C channels like a learned-variance model (the extra ones are junk).
def _toy_eps_np(noisy, timesteps, text):
  t = timesteps.astype(np.float32)[:, None, None, None] / 1000.0
  text_term = text.mean(axis=(1, 2))[:, None, None, None]
  eps = 0.3 * noisy * (1.0 + t) + text_term + 0.1 * np.sin(noisy)
  return np.concatenate([eps, 100.0 + eps], axis=1)


def _toy_eps_jax(noisy, timesteps, text):
  t = timesteps.astype(jnp.float32)[:, None, None, None] / 1000.0
  text_term = text.mean(axis=(1, 2))[:, None, None, None]
  eps = 0.3 * noisy * (1.0 + t) + text_term + 0.1 * jnp.sin(noisy)
  return jnp.concatenate([eps, 100.0 + eps], axis=1)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_sample_matches_ddim_scheduler(eta):
  num_steps, shape = 6, (2, 3, 4, 4)
  config = dict(beta_schedule="squaredcos_cap_v2", clip_sample=False,
                set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
  rng = np.random.default_rng(0)
  text_cond = rng.normal(size=(2, 5, 8)).astype(np.float32)
  text_uncond = np.zeros((1, 5, 8), np.float32)
  guidance_scale = np.array([3.0, 7.5], np.float32)  # one weight per sample
  key = jax.random.PRNGKey(1)

  ours = schedule.ddim_sample(
      _toy_eps_jax, key, shape, jnp.asarray(text_cond), jnp.asarray(text_uncond),
      jnp.asarray(guidance_scale), num_steps,
      schedule.alphas_cumprod_from_config(config), eta=eta)

  # The same random numbers, per the documented key layout.
  keys = jax.random.split(key, num_steps + 1)
  noises = [np.array(jax.random.normal(k, shape, jnp.float32)) for k in keys]
  scheduler = diffusers.DDIMScheduler(**config)
  scheduler.set_timesteps(num_steps)
  sample = noises[0]
  for i, t in enumerate(scheduler.timesteps.numpy()):
    batch_t = np.full((2,), t, np.int64)
    eps_cond = _toy_eps_np(sample, batch_t, text_cond)[:, :3]
    eps_uncond = _toy_eps_np(sample, batch_t, np.broadcast_to(text_uncond, text_cond.shape))[:, :3]
    eps = eps_uncond + guidance_scale[:, None, None, None] * (eps_cond - eps_uncond)
    sample = scheduler.step(torch.from_numpy(eps), int(t), torch.from_numpy(sample), eta=eta,
                            variance_noise=torch.from_numpy(noises[i + 1])).prev_sample.numpy()
  np.testing.assert_allclose(np.asarray(ours), sample, rtol=0, atol=1e-5)


def test_drop_learned_variance_rejects_odd_channel_counts():
  x = jnp.zeros((1, 5, 2, 2))
  with pytest.raises(ValueError, match="returned 5 channels for a 3-channel"):
    schedule.drop_learned_variance(x, 3)
  np.testing.assert_array_equal(
      schedule.drop_learned_variance(jnp.arange(6.0).reshape(1, 6, 1, 1), 3),
      jnp.arange(3.0).reshape(1, 3, 1, 1))
