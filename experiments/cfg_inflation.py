r"""Does classifier-free guidance inflate silhouettes? The guided estimate at the truth.

SDS moves a render x along w(t) (eps_hat - eps), that is toward the guided
one-step estimate of the clean image,

    x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t),
    eps_hat = eps_u + w (eps_c - eps_u).

At the ground truth (x a GT render: the object exactly its true size) an
unbiased guide's x0_hat shows the object at that size on average; where it
shows more foreground, SDS grows the object past its true silhouette. This
script noises GT renders of held-out prompts (one random shapes-world camera
each, the caption with that camera's view suffix), predicts x0_hat under
several CFG weights w (both branches come from one UNet call, so every weight
sees the same x_t), and reports the foreground area of x0_hat (pixels farther
than --threshold from the background color in [0, 1] RGB) over the GT
masks' area, per weight and noise level. (w = 1 is the conditional model
alone.) `--rescales` adds CFG rescale (Lin et al., arXiv 2305.08891;
diffusers' `guidance_rescale`): eps_hat is scaled to the conditional eps's
standard deviation per image and a fraction phi of that mixed in.
`--negative=next_prompt` puts a negative prompt in eps_u's place: the next
held-out prompt's caption, with this image's view suffix (a contrast
between prompts instead of against the empty caption).
Measurements: docs/results/compositional_scale.md ("The halo is classifier-free
guidance").

  python -m experiments.cfg_inflation --out_dir=runs/cfg_inflation
  python -m experiments.cfg_inflation --weights=3,5,10 --rescales=0,0.5,0.7,1
  python -m experiments.cfg_inflation --weights=1,2,3,5 --negative=next_prompt

Writes results.json into --out_dir: area_ratio[weight][level] (no rescale),
rescaled[phi][weight][level] for each nonzero phi, the settings and seconds.
"""

import functools
import json
import pathlib
import time
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from att3d_jax import xla_cpu
from att3d_jax.eval import shapes_eval
from att3d_jax.guidance import sds
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.shapes import diffusion
from att3d_jax.shapes import prompt_sets
from att3d_jax.shapes import scenes

DEFAULT_WEIGHTS = (1.0, 3.0, 5.0, 10.0)
DEFAULT_T_FRACTIONS = (0.2, 0.4, 0.6, 0.8)
# Every GT object and hat pixel of the shapes world lies farther than this
# from the background color (the nearest, white in full shade at 0.6 x its
# albedo, lies 0.35 away), so on clean renders the thresholded area is the
# GT mask's.
DEFAULT_THRESHOLD = 0.2
# What the unguided branch eps_u is conditioned on (`run`'s `negative`).
NEGATIVES = ("empty", "next_prompt")


def rescale_guided(eps_hat: jax.Array, eps_cond: jax.Array, phi) -> jax.Array:
  """CFG rescale of [B, C, H, W] estimates: phi eps_hat std(eps_cond) /
  std(eps_hat) + (1 - phi) eps_hat, the standard deviations per image."""
  axes = tuple(range(1, eps_hat.ndim))
  ratio = jnp.std(eps_cond, axis=axes, keepdims=True) / jnp.std(eps_hat, axis=axes, keepdims=True)
  return phi * ratio * eps_hat + (1.0 - phi) * eps_hat


@functools.partial(jax.jit, static_argnums=0)
def guided_foreground(eps_fn, alphas_cumprod: jax.Array, images: jax.Array,
                      conditioning: jax.Array, uncond: jax.Array, timesteps: jax.Array,
                      noise: jax.Array, weights: jax.Array, rescales: jax.Array,
                      background: jax.Array, threshold: float) -> jax.Array:
  """Foreground pixel counts of guided one-step estimates.

  Args:
    eps_fn: the denoiser (noisy [N, 3, H, W], t [N], conditioning [N, ...]) -> eps.
    alphas_cumprod: [num_train_timesteps].
    images: [B, 3, H, W] clean model inputs in [-1, 1].
    conditioning: [B, ...] each image's caption; uncond: [1, ...] the empty one,
      or [B, ...] a negative caption per image.
    timesteps: [T] int32.
    noise: [T, S, B, 3, H, W]: S noise draws per level.
    weights: [W] CFG weights.
    rescales: [P] CFG rescale fractions phi (0: plain CFG).
    background: [3] the background color in [0, 1].
    threshold: foreground = farther than this from `background` in [0, 1] RGB.

  Returns:
    [P, W, T, S] foreground pixels of x0_hat summed over the B images.
  """
  batch = images.shape[0]
  text = jnp.concatenate([conditioning, jnp.broadcast_to(uncond, conditioning.shape)])
  color = (2.0 * background - 1.0)[None, :, None, None]  # in model-input units

  def one_draw(t, draw_noise):
    alpha = alphas_cumprod[t]
    noisy = jnp.sqrt(alpha) * images + jnp.sqrt(1.0 - alpha) * draw_noise
    eps = eps_fn(jnp.concatenate([noisy, noisy]), jnp.full((2 * batch,), t), text)[:, :3]
    eps_c, eps_u = eps[:batch], eps[batch:]

    def area(phi, weight):
      eps_hat = rescale_guided(eps_u + weight * (eps_c - eps_u), eps_c, phi)
      x0 = (noisy - jnp.sqrt(1.0 - alpha) * eps_hat) / jnp.sqrt(alpha)
      # Distances in [-1, 1] units are twice those in [0, 1] RGB.
      return jnp.sum(jnp.linalg.norm(x0 - color, axis=1) > 2.0 * threshold)

    return jax.vmap(lambda phi: jax.vmap(lambda w: area(phi, w))(weights))(rescales)  # [P, W]

  per_level = [jax.vmap(lambda n, t=t: one_draw(t, n))(noise[i])  # [S, P, W]
               for i, t in enumerate(timesteps)]
  return jnp.transpose(jnp.stack(per_level), (2, 3, 0, 1))


def negative_conditioning(model: diffusion.ShapesDiffusionModel, prompts: Sequence[str],
                          view_labels: Sequence[str], conditioning: jax.Array,
                          negative: str) -> jax.Array:
  """eps_u's conditioning for image i (prompt i seen from view i, captioned as
  `conditioning` [B, ...]): "empty", the unconditional input [1, ...] as in
  diffusion.as_guidance; "next_prompt", prompt i + 1 (cyclically) with view i's
  suffix, [B, ...]."""
  if negative == "empty":
    return jnp.zeros_like(conditioning[:1])
  if negative == "next_prompt":
    return model.conditioning([prompts[(i + 1) % len(prompts)] + cameras_lib.view_suffix(v)
                               for i, v in enumerate(view_labels)])
  raise ValueError(f"unknown negative {negative!r}; expected one of {NEGATIVES}")


def run(model_dir: str, prompts: Sequence[str], weights: Sequence[float],
        t_fractions: Sequence[float], num_noise: int, threshold: float, seed: int,
        rescales: Sequence[float] = (), negative: str = "empty") -> dict:
  """Area ratios of guided x0_hat to the GT masks; returns them with the settings.

  `negative`: one of NEGATIVES, what eps_u is conditioned on (module docstring).
  """
  start = time.perf_counter()
  model = diffusion.ShapesDiffusionModel(model_dir)
  size = model.image_size
  camera_key, noise_key = jax.random.split(jax.random.PRNGKey(seed))
  cameras = cameras_lib.sample_cameras(
      camera_key, len(prompts), scenes.CAMERA_ELEVATION_RANGE_DEG,
      scenes.CAMERA_AZIMUTH_RANGE_DEG, scenes.CAMERA_DISTANCE_RANGE,
      scenes.CAMERA_FOV_Y_RANGE_DEG)
  labels = cameras_lib.view_labels(cameras)
  rgb, masks = [], []
  for index, prompt in enumerate(prompts):  # prompt i seen from camera i
    camera = jax.tree.map(lambda a, i=index: a[i:i + 1], cameras)
    truth = shapes_eval.ground_truth([prompt], camera, size, size)
    rgb.append(truth["rgb"][0, 0])
    masks.append(truth["mask"][0, 0])
  images = sds.pixel_model_input(jnp.asarray(np.stack(rgb)))
  gt_area = float(np.sum(np.stack(masks) > 0.5))
  conditioning = model.conditioning([p + cameras_lib.view_suffix(v)
                                     for p, v in zip(prompts, labels)])
  num_timesteps = model.alphas_cumprod.shape[0]
  timesteps = jnp.asarray([int(round(t * (num_timesteps - 1))) for t in t_fractions], jnp.int32)
  noise = jax.random.normal(noise_key, (len(t_fractions), num_noise) + images.shape)
  uncond = negative_conditioning(model, prompts, labels, conditioning, negative)
  areas = np.asarray(guided_foreground(
      model.eps_fn(), model.alphas_cumprod, images, conditioning, uncond, timesteps, noise,
      jnp.asarray(weights, jnp.float32), jnp.asarray([0.0, *rescales], jnp.float32),
      jnp.asarray(scenes.BACKGROUND_RGB, jnp.float32), threshold))
  ratio = areas.mean(axis=3) / gt_area  # [1 + len(rescales), W, T]

  def table(rows):
    return {str(w): {str(t): float(r) for t, r in zip(t_fractions, row)}
            for w, row in zip(weights, rows)}

  return {"area_ratio": table(ratio[0]),
          "rescaled": {str(phi): table(rows) for phi, rows in zip(rescales, ratio[1:])},
          "gt_area_pixels": gt_area, "model_dir": model_dir, "num_prompts": len(prompts),
          "weights": list(weights), "rescales": list(rescales), "negative": negative,
          "t_fractions": list(t_fractions), "num_noise": num_noise,
          "threshold": threshold, "seed": seed,
          "seconds": round(time.perf_counter() - start, 1)}


def main(argv):
  del argv
  xla_cpu.use_eigen_convolutions()  # before the first computation (faster UNet convs on CPU)
  prompts = prompt_sets.load_prompt_set(_PROMPT_SET.value).heldout[::_EVERY.value]
  rescales = [float(phi) for phi in _RESCALES.value if float(phi) != 0.0]
  summary = run(_MODEL_DIR.value, prompts, [float(w) for w in _WEIGHTS.value],
                [float(t) for t in _T_FRACTIONS.value], _NUM_NOISE.value, _THRESHOLD.value,
                _SEED.value, rescales, _NEGATIVE.value)
  out_dir = pathlib.Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
  print(f"x0_hat foreground / GT mask area ({summary['num_prompts']} prompts, "
        f"{summary['seconds']} s)")
  def print_rows(rows):  # one line per weight: the ratio at each level
    for weight, row in rows.items():
      print(f"{weight:>10} | " + " ".join(f"{r:7.3f}" for r in row.values()))

  print("CFG weight | " + " ".join(f"t={t:<5}" for t in summary["t_fractions"]))
  print_rows(summary["area_ratio"])
  for phi, rows in summary["rescaled"].items():
    print(f"CFG rescale phi = {phi}:")
    print_rows(rows)


if __name__ == "__main__":
  # Flags here, not at import: the tests import every experiment into one
  # process, and absl refuses a second definition of a name such as model_dir.
  _MODEL_DIR = flags.DEFINE_string("model_dir", "weights/shapes", "diffusers folder of the model")
  _PROMPT_SET = flags.DEFINE_string("prompt_set", "shapes_2400",
                                    "shapes-world prompt set whose held-out prompts are rendered")
  _EVERY = flags.DEFINE_integer("every", 4, "every n-th held-out prompt (shapes_2400: 100)")
  _WEIGHTS = flags.DEFINE_list("weights", [str(w) for w in DEFAULT_WEIGHTS], "CFG weights")
  _T_FRACTIONS = flags.DEFINE_list("t_fractions", [str(t) for t in DEFAULT_T_FRACTIONS],
                                   "timesteps as fractions of the schedule")
  _RESCALES = flags.DEFINE_list("rescales", [], "CFG rescale fractions phi to add (0 = none)")
  _NEGATIVE = flags.DEFINE_enum("negative", "empty", NEGATIVES,
                                "eps_u's caption: the empty one, or the next prompt's")
  _NUM_NOISE = flags.DEFINE_integer("num_noise", 4, "noise draws per level")
  _THRESHOLD = flags.DEFINE_float("threshold", DEFAULT_THRESHOLD,
                                  "foreground: this far from the background in [0, 1] RGB")
  _SEED = flags.DEFINE_integer("seed", 0, "cameras and noise derive from it")
  _OUT_DIR = flags.DEFINE_string("out_dir", "runs/cfg_inflation", "where results.json goes")
  app.run(main)
