"""Diffusion noise schedules and a DDIM sampler with classifier-free guidance.

The schedule is read from a diffusers folder's `scheduler/scheduler_config.json`
and reproduces `diffusers.DDPMScheduler.alphas_cumprod` (float32 betas computed
the same way; the cumulative products agree to ~5e-7, torch's float32 cumprod
accumulating in a different order). The DDIM sampler follows
`diffusers.DDIMScheduler.step` for epsilon-prediction models; it serves previews
and model tests, not training (training uses SDS, see sds.py).

Conventions: images and latents are NCHW like diffusers; timesteps are int32
indices into `alphas_cumprod` ([num_train_timesteps]).
"""

import json
import math
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# eps_fn(noisy [B, C, H, W], timesteps [B] int32, text [B, L, D]) -> [B, C' >= C, H, W]
EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the Glide/improved-DDPM cosine schedule (Nichol & Dhariwal eq. 17)."""

  def alpha_bar(fraction):
    return math.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2

  steps = np.arange(num_train_timesteps)
  betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps),
               max_beta) for i in steps]
  # diffusers computes these in Python floats and stores them as float32.
  return np.asarray(betas, np.float32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescales betas so that the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
  sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
  first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
  sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
  alpha_bar = sqrt_alpha_bar ** 2
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return (1.0 - alphas).astype(np.float32)


def alphas_cumprod_from_config(config: Mapping) -> np.ndarray:
  """`alpha_bar_t = prod_{s <= t} (1 - beta_s)` for a diffusers scheduler config.

  Args:
    config: the parsed scheduler_config.json. Keys used (diffusers defaults when
      absent): num_train_timesteps (1000), beta_schedule ("linear"), beta_start
      (1e-4), beta_end (0.02), trained_betas (None), rescale_betas_zero_snr (False).

  Returns:
    alphas_cumprod: [num_train_timesteps] float32.
  """
  num_train_timesteps = int(config.get("num_train_timesteps", 1000))
  beta_schedule = config.get("beta_schedule", "linear")
  beta_start = float(config.get("beta_start", 1e-4))
  beta_end = float(config.get("beta_end", 0.02))
  if config.get("trained_betas") is not None:
    betas = np.asarray(config["trained_betas"], np.float32)
  elif beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
  elif beta_schedule == "scaled_linear":
    # Latent diffusion: linear in sqrt(beta).
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                        dtype=np.float32) ** 2
  elif beta_schedule == "squaredcos_cap_v2":
    betas = _cosine_betas(num_train_timesteps)
  else:
    raise ValueError(
        f"unsupported beta_schedule {beta_schedule!r} in the scheduler config; "
        f"supported: {BETA_SCHEDULES} (or trained_betas).")
  if config.get("rescale_betas_zero_snr", False):
    betas = _zero_terminal_snr(betas)
  return np.cumprod(1.0 - betas, dtype=np.float32)


def load_scheduler_config(folder: str) -> dict:
  """Reads scheduler_config.json from a diffusers pipeline folder, its
  `scheduler/` subfolder, or the json file itself."""
  candidates = [folder] if folder.endswith(".json") else [
      os.path.join(folder, "scheduler", "scheduler_config.json"),
      os.path.join(folder, "scheduler_config.json")]
  for path in candidates:
    if os.path.isfile(path):
      with open(path) as f:
        return json.load(f)
  raise FileNotFoundError(
      f"no scheduler config found for {folder!r} (looked for {candidates}). Pass "
      "--config.guidance.path=/local/diffusers/folder, a diffusers pipeline folder "
      "laid out as scheduler/scheduler_config.json, unet/config.json, "
      "unet/diffusion_pytorch_model.safetensors.")


def load_alphas_cumprod(folder: str) -> np.ndarray:
  """alphas_cumprod [num_train_timesteps] float32 of a diffusers folder's scheduler."""
  return alphas_cumprod_from_config(load_scheduler_config(folder))


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
  """The descending timesteps `DDIMScheduler.set_timesteps` visits.

  Returns:
    timesteps: [num_steps] int32, from noisiest to cleanest.
  """
  if not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps="
                     f"{num_train_timesteps}].")
  if spacing == "leading":
    step_ratio = num_train_timesteps // num_steps
    timesteps = np.arange(num_steps)[::-1] * step_ratio + steps_offset
  elif spacing == "trailing":
    step_ratio = num_train_timesteps / num_steps
    timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)) - 1
  elif spacing == "linspace":
    timesteps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
  else:
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of "
                     f"{TIMESTEP_SPACINGS}.")
  return timesteps.astype(np.int32)


def drop_learned_variance(model_output: jax.Array, num_channels: int) -> jax.Array:
  """Keeps the epsilon channels of a model that also predicts its variance.

  Models with learned variance (DeepFloyd IF: 6 output channels for 3 input
  channels) stack [eps, variance] along the channel axis; diffusers' pipelines
  split them the same way.

  Args:
    model_output: [B, C_out, H, W] with C_out in {num_channels, 2 * num_channels}.
  Returns:
    eps: [B, num_channels, H, W].
  """
  out_channels = model_output.shape[1]
  if out_channels == 2 * num_channels:
    return model_output[:, :num_channels]
  if out_channels != num_channels:
    raise ValueError(
        f"the model returned {out_channels} channels for a {num_channels}-channel "
        f"input; expected {num_channels} (epsilon) or {2 * num_channels} "
        "(epsilon + learned variance).")
  return model_output


def guided_eps(eps_fn: EpsFn, noisy: jax.Array, timesteps: jax.Array,
               text_cond: jax.Array, text_uncond: jax.Array,
               guidance_scale) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Classifier-free guidance with one batched model call (Ho & Salimans 2022).

  eps_hat = eps_uncond + s * (eps_cond - eps_uncond).

  Args:
    eps_fn: the denoiser, see `EpsFn`.
    noisy: [B, C, H, W] noisy samples.
    timesteps: [B] int32.
    text_cond: [B, L, D] prompt embeddings.
    text_uncond: [B, L, D] (or broadcastable, e.g. [1, L, D]) embeddings of the
      empty or negative prompt.
    guidance_scale: scalar or [B] (one weight per sample).

  Returns:
    (eps_hat, eps_cond, eps_uncond), each [B, C, H, W] float32, learned-variance
    channels dropped.
  """
  batch, channels = noisy.shape[:2]
  text_uncond = jnp.broadcast_to(text_uncond, text_cond.shape)
  model_output = eps_fn(jnp.concatenate([noisy, noisy]),
                        jnp.concatenate([timesteps, timesteps]),
                        jnp.concatenate([text_cond, text_uncond]))
  eps = drop_learned_variance(model_output, channels).astype(jnp.float32)
  eps_cond, eps_uncond = eps[:batch], eps[batch:]
  scale = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (batch,))
  eps_hat = eps_uncond + scale[:, None, None, None] * (eps_cond - eps_uncond)
  return eps_hat, eps_cond, eps_uncond


def ddim_step(sample: jax.Array, eps: jax.Array, alpha_bar_t: jax.Array,
              alpha_bar_prev: jax.Array, eta: float,
              variance_noise: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One DDIM update (Song et al. 2021, eq. 12), as DDIMScheduler.step computes it.

  Args:
    sample: [B, C, H, W] x_t.
    eps: [B, C, H, W] predicted noise.
    alpha_bar_t, alpha_bar_prev: scalars, alpha_bar at t and at the previous
      (less noisy) timestep.
    eta: 0 for deterministic DDIM, 1 for DDPM-like stochasticity.
    variance_noise: [B, C, H, W] standard normal, used when eta > 0.

  Returns:
    (x_prev, predicted x_0), each [B, C, H, W].
  """
  x0 = (sample - jnp.sqrt(1 - alpha_bar_t) * eps) / jnp.sqrt(alpha_bar_t)
  variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
  std = eta * jnp.sqrt(variance)
  x_prev = jnp.sqrt(alpha_bar_prev) * x0 + jnp.sqrt(1 - alpha_bar_prev - std ** 2) * eps
  return x_prev + std * variance_noise, x0


def ddim_sample(eps_fn: EpsFn, key: jax.Array, shape: tuple[int, ...],
                text_cond: jax.Array, text_uncond: jax.Array, guidance_scale,
                num_steps: int, alphas_cumprod, eta: float = 0.0,
                spacing: str = "leading", steps_offset: int = 0) -> jax.Array:
  """Samples with DDIM and classifier-free guidance.

  Matches diffusers' DDIMScheduler (set_alpha_to_one=True, clip_sample=False,
  prediction_type="epsilon") driven by the same noise. Random numbers: `key` is
  split into `num_steps + 1` keys; key 0 draws the initial x_T ~ N(0, I), key
  i + 1 draws step i's variance noise (used only when eta > 0).

  Args:
    eps_fn: the denoiser, see `EpsFn`; learned-variance channels are dropped.
    key: PRNG key.
    shape: (B, C, H, W) of the samples.
    text_cond: [B, L, D]; text_uncond: [B, L, D] or broadcastable.
    guidance_scale: scalar or [B].
    num_steps: number of denoising steps.
    alphas_cumprod: [num_train_timesteps].
    eta: DDIM stochasticity.
    spacing, steps_offset: as the scheduler config's timestep_spacing and
      steps_offset.

  Returns:
    x_0 samples: [B, C, H, W] float32 (not clipped).
  """
  alphas_cumprod = jnp.asarray(alphas_cumprod, jnp.float32)
  num_train_timesteps = alphas_cumprod.shape[0]
  timesteps = ddim_timesteps(num_train_timesteps, num_steps, spacing, steps_offset)
  # DDIMScheduler steps back by a fixed stride; the last step lands on alpha_bar = 1.
  prev_timesteps = timesteps - num_train_timesteps // num_steps
  alpha_bar = alphas_cumprod[timesteps]
  alpha_bar_prev = jnp.where(prev_timesteps >= 0,
                             alphas_cumprod[np.maximum(prev_timesteps, 0)], 1.0)
  keys = jax.random.split(key, num_steps + 1)
  sample = jax.random.normal(keys[0], shape, jnp.float32)

  def body(sample, step):
    timestep, a_t, a_prev, step_key = step
    batch_timesteps = jnp.full((shape[0],), timestep, jnp.int32)
    eps, _, _ = guided_eps(eps_fn, sample, batch_timesteps, text_cond, text_uncond,
                           guidance_scale)
    noise = jax.random.normal(step_key, shape, jnp.float32)
    sample, _ = ddim_step(sample, eps, a_t, a_prev, eta, noise)
    return sample, None

  sample, _ = jax.lax.scan(
      body, sample, (jnp.asarray(timesteps), alpha_bar, alpha_bar_prev, keys[1:]))
  return sample
