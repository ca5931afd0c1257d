"""Score distillation sampling (SDS) with classifier-free guidance.

DreamFusion (Poole et al. 2022, eq. 3): for a differentiable render x, noise it
to x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps at a random t, and push
x along

    grad_x L_SDS = w(t) (eps_hat(x_t; y, t) - eps),

where eps_hat is the frozen UNet's guided noise prediction. The UNet Jacobian is
dropped: its output is wrapped in `stop_gradient` and the loss is the surrogate
`sum(stop_gradient(grad) * x)`, whose gradient with respect to x is exactly the
SDS gradient (then chained through whatever produced x: the [0, 1] -> [-1, 1]
map and resize in pixel mode, the VAE encoder in latent mode).

Two ways to get the model input x from renders:
  * pixel mode (DeepFloyd IF, the shapes model): `pixel_model_input`, images in
    [0, 1] -> [-1, 1] at the model's resolution (64x64 for IF stage I);
  * latent mode (Stable Diffusion): `latent_model_input`, images -> VAE encoder
    -> posterior mean, shifted and scaled (512x512 renders in real use).
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from att3d_jax.guidance import schedule

# w(t) as a function of alpha_bar_t.
WEIGHTINGS = ("sds", "uniform", "fantasia3d")


def sds_weight(alpha_bar: jax.Array, weighting: str) -> jax.Array:
  """The SDS weighting w(t).

  "sds": 1 - alpha_bar (DreamFusion's choice, = sigma_t^2);
  "uniform": 1;
  "fantasia3d": sqrt(alpha_bar) (1 - alpha_bar) (Fantasia3D / threestudio).
  """
  if weighting == "sds":
    return 1.0 - alpha_bar
  if weighting == "uniform":
    return jnp.ones_like(alpha_bar)
  if weighting == "fantasia3d":
    return jnp.sqrt(alpha_bar) * (1.0 - alpha_bar)
  raise ValueError(f"unknown SDS weighting {weighting!r}; expected one of {WEIGHTINGS}.")


def annealed_t_range(t_range: Sequence[float], t_max_final: float,
                     train_fraction) -> tuple[jax.Array, jax.Array]:
  """Linearly lowers t_max from t_range[1] to t_max_final over training.

  Large t early shapes coarse geometry, small t later refines detail
  (DreamTime, Huang et al. 2023; threestudio's max_step_percent schedule).

  Args:
    t_range: (t_min, t_max) as fractions of num_train_timesteps.
    t_max_final: t_max at the end of training, in [t_min, t_max].
    train_fraction: step / num_steps, scalar in [0, 1] (may be traced).

  Returns:
    (t_min, t_max) scalars for `sds_loss`.
  """
  t_min, t_max = t_range
  fraction = jnp.clip(jnp.asarray(train_fraction, jnp.float32), 0.0, 1.0)
  return jnp.float32(t_min), t_max + (t_max_final - t_max) * fraction


def sample_timesteps(key: jax.Array, batch: int, num_train_timesteps: int,
                     t_range) -> jax.Array:
  """t ~ U{floor(t_min T), ..., floor(t_max T)}, one per sample.

  Args:
    t_range: (t_min, t_max) fractions of T = num_train_timesteps; may be traced.

  Returns:
    timesteps: [batch] int32 in [0, T - 1].
  """
  t_min, t_max = t_range
  lowest = jnp.floor(jnp.asarray(t_min, jnp.float32) * num_train_timesteps)
  highest = jnp.minimum(jnp.floor(jnp.asarray(t_max, jnp.float32) * num_train_timesteps),
                        num_train_timesteps - 1)
  uniform = jax.random.uniform(key, (batch,), jnp.float32)
  timesteps = jnp.minimum(lowest + jnp.floor(uniform * (highest - lowest + 1)), highest)
  return timesteps.astype(jnp.int32)


def pixel_model_input(images: jax.Array, image_size: int | None = None) -> jax.Array:
  """Renders -> pixel-space diffusion input.

  Args:
    images: [B, H, W, 3] in [0, 1], as the renderer produces them.
    image_size: the model's resolution (64 for IF stage I); bilinear resize when
      it differs from H, W. None keeps the size.

  Returns:
    [B, 3, image_size, image_size] NCHW in [-1, 1].
  """
  batch, height, width, channels = images.shape
  if image_size is not None and (height, width) != (image_size, image_size):
    images = jax.image.resize(images, (batch, image_size, image_size, channels), "bilinear")
  return jnp.transpose(2.0 * images - 1.0, (0, 3, 1, 2))


def latent_model_input(vae, images: jax.Array, image_size: int | None = 512) -> jax.Array:
  """Renders -> Stable Diffusion latents, differentiable through the encoder.

  The posterior MEAN, not a sample: `Guidance.model_input` takes no PRNG key,
  and the mean is the deterministic (lower-variance) choice; the SDS noise is
  added afterwards anyway.

  Args:
    vae: a loaded VAE (`att3d_jax.guidance.vae.load_vae`).
    images: [B, H, W, 3] in [0, 1].
    image_size: the VAE's input resolution (512 for SD); None keeps the size.

  Returns:
    latents: [B, latent_channels, image_size / 8, image_size / 8] (for SD):
    (posterior mean - shift_factor) * scaling_factor.
  """
  posterior = vae.encode(pixel_model_input(images, image_size))
  return (posterior.mean - vae.shift_factor) * vae.scaling_factor


def sds_loss(eps_fn: schedule.EpsFn, x: jax.Array, key: jax.Array,
             text_cond: jax.Array, text_uncond: jax.Array, *,
             alphas_cumprod: jax.Array, guidance_scale,
             t_range=(0.02, 0.98), weighting: str = "sds",
             guidance_interval: Sequence[float] = (0.0, 1.0)) -> tuple[jax.Array, dict]:
  """SDS loss whose gradient w.r.t. x is exactly w(t) (eps_hat - eps).

  One UNet call evaluates the conditional and unconditional branches together.

  Args:
    eps_fn: frozen denoiser eps_fn(noisy [2B, C, H, W], t [2B], text [2B, L, D]);
      learned-variance output channels are dropped. Never differentiated.
    x: [B, C, H, W] model input: pixels in [-1, 1] or scaled latents.
    key: PRNG key, split into (timestep key, noise key).
    text_cond: [B, L, D] prompt embeddings (view-dependent prompts included).
    text_uncond: [B, L, D] or broadcastable: the empty-prompt embedding, or a
      negative prompt's.
    alphas_cumprod: [num_train_timesteps].
    guidance_scale: CFG weight, scalar or [B] (per-sample, for amortizing over
      guidance weights).
    t_range: (t_min, t_max), fractions of num_train_timesteps; see
      `annealed_t_range` for a decreasing t_max.
    weighting: w(t), one of WEIGHTINGS.
    guidance_interval: (low, high) fractions of num_train_timesteps: samples
      whose t lies outside [low, high] get CFG weight 1, the conditional model
      alone (guidance in a limited interval, Kynkaanniemi et al. 2024, arXiv
      2404.07724). (0, 1), the default, guides every sample.

  Returns:
    loss: scalar surrogate sum_b <stop_gradient(grad_b), x_b>. Only its gradient
      is meaningful; its value depends on x.
    aux: diagnostics, each [B]:
      loss_per_sample: the surrogate per sample (differentiable, so per-sample
        weights, e.g. for loss interpolation, can be applied to it);
      t: int32 timesteps; weight: w(t); guidance_scale: the CFG weight used;
      grad_norm: ||w(t) (eps_hat - eps)||_2;
      guidance_rms: RMS of eps_cond - eps_uncond (how much the text steers);
      cond_error_rms: RMS of eps_cond - eps (denoising error given the text).
  """
  low, high = guidance_interval
  if not 0.0 <= low < high <= 1.0:
    raise ValueError(f"guidance_interval={tuple(guidance_interval)} must be (low, high) with "
                     "0 <= low < high <= 1 (fractions of the noise schedule).")
  alphas_cumprod = jnp.asarray(alphas_cumprod, jnp.float32)
  batch, num_train_timesteps = x.shape[0], alphas_cumprod.shape[0]
  t_key, noise_key = jax.random.split(key)
  timesteps = sample_timesteps(t_key, batch, num_train_timesteps, t_range)
  t_fraction = timesteps.astype(jnp.float32) / num_train_timesteps
  guided = (t_fraction >= low) & (t_fraction <= high)
  scale = jnp.where(guided, jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (batch,)),
                    1.0)
  noise = jax.random.normal(noise_key, x.shape, jnp.float32)
  alpha_bar = alphas_cumprod[timesteps][:, None, None, None]
  # The UNet sees a constant: no tangents enter it, so its Jacobian is never built.
  noisy = jax.lax.stop_gradient(jnp.sqrt(alpha_bar) * x + jnp.sqrt(1.0 - alpha_bar) * noise)
  eps_hat, eps_cond, eps_uncond = jax.lax.stop_gradient(schedule.guided_eps(
      eps_fn, noisy, timesteps, text_cond, text_uncond, scale))
  weight = sds_weight(alpha_bar[:, 0, 0, 0], weighting)
  grad = weight[:, None, None, None] * (eps_hat - noise)
  loss_per_sample = jnp.sum(grad * x, axis=(1, 2, 3))

  def rms(v):
    return jnp.sqrt(jnp.mean(jnp.square(v), axis=(1, 2, 3)))

  aux = dict(
      loss_per_sample=loss_per_sample,
      t=timesteps,
      weight=weight,
      guidance_scale=scale,
      grad_norm=jnp.sqrt(jnp.sum(jnp.square(grad), axis=(1, 2, 3))),
      guidance_rms=rms(eps_cond - eps_uncond),
      cond_error_rms=rms(eps_cond - noise),
  )
  return jnp.sum(loss_per_sample), aux
