r"""Which factor values the shapes guidance model's text tells apart, by noise level.

A diffusion classifier (Li et al., "Your Diffusion Model is Secretly a
Zero-Shot Classifier", arXiv 2303.16203) on ground-truth renders: each prompt's
scene is rendered from random shapes-world cameras, noised to x_t with noise
eps at each of several timesteps t, and denoised under every candidate caption
(the scene with one factor changed: the 8 shapes for `--factor=shape`, plus
the camera's view suffix). The caption with the smallest conditional error
|eps_theta(x_t, t, c) - eps|^2, all candidates sharing the same (t, eps), is
the model's choice: summed over the t levels, and at each level alone.

Why per level: SDS's gradient is the guided eps at the sampled t, and the
coarse shape of the field is settled in the first, high-noise part of
training (t_max anneals from 0.98). A value the model cannot tell from the
others at large t gets no text signal while the shape forms
(docs/results/compositional_scale.md: the torus).

  python -m experiments.guidance_classifier --factor=shape --prompts_per_value=8 \
      --out_dir=runs/guidance_classifier

With --azimuths_deg the cameras are fixed instead (one per azimuth, at
--elevation_deg), to see which views carry the signal: a torus's hole shows
from the front and back only.

Writes results.json into --out_dir: per factor value the accuracy over all t,
at each t and at each (camera, t), the confusion counts, chance and the settings.
"""

import collections
import dataclasses
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

FACTOR_VALUES = {"color": tuple(scenes.COLORS), "shape": scenes.SHAPES,
                 "size": tuple(scenes.SIZES), "hat": scenes.HATS,
                 "hat_color": tuple(scenes.COLORS)}
HAT_FILTERS = {"any": lambda scene: True, "with": lambda scene: scene.hat is not None,
               "none": lambda scene: scene.hat is None}
DEFAULT_T_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def factor_applies(scene: scenes.Scene, factor: str) -> bool:
  """Whether `scene` has `factor` to change: a hatless scene has no hat or hat color."""
  return scene.hat is not None or factor not in ("hat", "hat_color")


def candidate_scenes(scene: scenes.Scene, factor: str) -> list[scenes.Scene]:
  """The scenes that differ from `scene` in `factor` only, `scene` among them,
  in FACTOR_VALUES order."""
  if factor not in FACTOR_VALUES:
    raise ValueError(f"unknown factor {factor!r}; expected one of {tuple(FACTOR_VALUES)}")
  if not factor_applies(scene, factor):
    raise ValueError(f"{scenes.prompt_of(scene)!r} has no hat: factor {factor!r} does not apply")
  return [dataclasses.replace(scene, **{factor: value}) for value in FACTOR_VALUES[factor]]


def choose_prompts(prompts: Sequence[str], factor: str, per_value: int,
                   hats: str = "any") -> list[str]:
  """The first `per_value` prompts (in `prompts` order) of each value of
  `factor`, grouped by value in FACTOR_VALUES order; prompts the factor does
  not apply to (hatless ones for hat factors) are skipped, and so are those
  `hats` leaves out: "any" keeps all, "with" only prompts with a hat, "none"
  only hatless ones (4% of the world's scenes)."""
  if hats not in HAT_FILTERS:
    raise ValueError(f"unknown hats={hats!r}; expected one of {tuple(HAT_FILTERS)}")
  by_value = collections.defaultdict(list)
  for prompt in prompts:
    scene = scenes.parse_prompt(prompt)
    if factor_applies(scene, factor) and HAT_FILTERS[hats](scene):
      by_value[getattr(scene, factor)].append(prompt)
  missing = [value for value in FACTOR_VALUES[factor] if len(by_value[value]) < per_value]
  if missing:
    raise ValueError(f"fewer than {per_value} prompts with {factor} in {missing}")
  return [p for value in FACTOR_VALUES[factor] for p in by_value[value][:per_value]]


@functools.partial(jax.jit, static_argnums=0)
def denoising_errors(eps_fn, alphas_cumprod: jax.Array, images: jax.Array,
                     conditioning: jax.Array, timesteps: jax.Array,
                     noise: jax.Array) -> jax.Array:
  """Conditional denoising errors of every candidate caption.

  Args:
    eps_fn: the denoiser (noisy [N, 3, H, W], t [N], conditioning [N, ...]) -> eps.
    alphas_cumprod: [num_train_timesteps].
    images: [V, 3, H, W] clean model inputs, one per view.
    conditioning: [K, V, ...] candidate k's caption for view v.
    timesteps: [T] int32.
    noise: [T, V, 3, H, W], shared by the K candidates.

  Returns:
    [V, K, T]: mean over pixels of (eps_fn(x_t, t, c_kv) - noise)^2.
  """
  num_candidates, num_views = conditioning.shape[:2]
  flat_conditioning = conditioning.reshape((num_candidates * num_views,) + conditioning.shape[2:])

  def one_level(t, level_noise):
    alpha = alphas_cumprod[t]
    noisy = jnp.sqrt(alpha) * images + jnp.sqrt(1.0 - alpha) * level_noise  # [V, 3, H, W]
    batch = jnp.broadcast_to(noisy[None], (num_candidates,) + noisy.shape)
    eps = eps_fn(batch.reshape((num_candidates * num_views,) + noisy.shape[1:]),
                 jnp.full((num_candidates * num_views,), t), flat_conditioning)
    eps = eps.reshape((num_candidates,) + noisy.shape)
    return jnp.mean(jnp.square(eps - level_noise[None]), axis=(2, 3, 4)).T  # [V, K]

  return jnp.stack([one_level(timesteps[i], noise[i]) for i in range(timesteps.shape[0])],
                   axis=-1)


def summarize(errors: np.ndarray, truth: np.ndarray, factor: str,
              t_fractions: Sequence[float]) -> dict:
  """errors [P, V, K, T] and each prompt's true candidate index truth [P] ->
  per factor value: accuracy over all t (errors summed over T), at each t, at
  each (view, t) ([V][T]), and the confusion counts of the all-t choices."""
  values = FACTOR_VALUES[factor]
  choice_all = np.argmin(errors.sum(axis=3), axis=2)  # [P, V]
  choice_t = np.argmin(errors, axis=2)  # [P, V, T]
  per_value = {}
  for index, value in enumerate(values):
    rows = truth == index
    if not rows.any():
      continue
    per_value[value] = {
        "num_images": int(rows.sum() * errors.shape[1]),
        "accuracy": float(np.mean(choice_all[rows] == index)),
        "accuracy_by_t": [float(a) for a in np.mean(choice_t[rows] == index, axis=(0, 1))],
        "accuracy_by_view": np.mean(choice_t[rows] == index, axis=0).tolist(),
        "chosen": dict(collections.Counter(values[c] for c in choice_all[rows].ravel())),
    }
  return {"factor": factor, "t_fractions": list(t_fractions), "chance": 1.0 / len(values),
          "accuracy": float(np.mean(choice_all == truth[:, None])),
          "accuracy_by_t": [float(a) for a in np.mean(choice_t == truth[:, None, None],
                                                      axis=(0, 1))],
          "per_value": per_value}


def classifier_cameras(key: jax.Array, num_views: int, azimuths_deg: Sequence[float] = (),
                       elevation_deg: float = 15.0) -> cameras_lib.Cameras:
  """`num_views` random shapes-world cameras drawn with `key`, or, if azimuths_deg
  is given, one camera per azimuth at elevation_deg and the middle of the
  world's distance and field-of-view ranges."""
  if not azimuths_deg:
    return cameras_lib.sample_cameras(
        key, num_views, scenes.CAMERA_ELEVATION_RANGE_DEG, scenes.CAMERA_AZIMUTH_RANGE_DEG,
        scenes.CAMERA_DISTANCE_RANGE, scenes.CAMERA_FOV_Y_RANGE_DEG)
  return cameras_lib.orbit_cameras(
      np.deg2rad(elevation_deg), np.deg2rad(np.asarray(azimuths_deg, np.float32)),
      np.mean(scenes.CAMERA_DISTANCE_RANGE), np.deg2rad(np.mean(scenes.CAMERA_FOV_Y_RANGE_DEG)))


def run(model_dir: str, prompts: Sequence[str], factor: str, prompts_per_value: int,
        num_views: int, t_fractions: Sequence[float], seed: int,
        azimuths_deg: Sequence[float] = (), elevation_deg: float = 15.0,
        hats: str = "any") -> dict:
  """Classifies the chosen prompts' GT renders from `classifier_cameras`;
  returns `summarize`'s dict plus the settings and seconds."""
  start = time.perf_counter()
  model = diffusion.ShapesDiffusionModel(model_dir)
  eps_fn = model.eps_fn()
  chosen = choose_prompts(prompts, factor, prompts_per_value, hats)
  camera_key, noise_key = jax.random.split(jax.random.PRNGKey(seed))
  size = model.image_size
  cameras = classifier_cameras(camera_key, num_views, azimuths_deg, elevation_deg)
  num_views = cameras.fov_y.shape[0]
  labels = cameras_lib.view_labels(cameras)
  num_timesteps = model.alphas_cumprod.shape[0]
  timesteps = jnp.asarray([int(round(t * (num_timesteps - 1))) for t in t_fractions], jnp.int32)
  truth = np.zeros(len(chosen), np.int32)
  errors = []
  for row, prompt in enumerate(chosen):
    scene = scenes.parse_prompt(prompt)
    candidates = candidate_scenes(scene, factor)
    truth[row] = candidates.index(scene)
    rgb = shapes_eval.ground_truth([prompt], cameras, size, size)["rgb"][0]  # [V, H, W, 3]
    images = sds.pixel_model_input(jnp.asarray(rgb))
    captions = [scenes.prompt_of(c) + cameras_lib.view_suffix(v)
                for c in candidates for v in labels]
    conditioning = model.conditioning(captions)
    conditioning = conditioning.reshape((len(candidates), num_views) + conditioning.shape[1:])
    noise = jax.random.normal(jax.random.fold_in(noise_key, row),
                              (len(t_fractions),) + images.shape)
    errors.append(np.asarray(denoising_errors(eps_fn, model.alphas_cumprod, images,
                                              conditioning, timesteps, noise)))
  summary = summarize(np.stack(errors), truth, factor, t_fractions)
  summary.update({"model_dir": model_dir, "num_prompts": len(chosen),
                  "prompts_per_value": prompts_per_value, "hats": hats,
                  "num_views": num_views,
                  "view_labels": labels, "seed": seed,
                  "azimuths_deg": np.rad2deg(np.asarray(cameras.azimuth)).round(1).tolist(),
                  "elevations_deg": np.rad2deg(np.asarray(cameras.elevation)).round(1).tolist(),
                  "seconds": round(time.perf_counter() - start, 1)})
  return summary


def main(argv):
  del argv
  xla_cpu.use_eigen_convolutions()  # before the first computation (faster UNet convs on CPU)
  prompts = prompt_sets.load_prompt_set(_PROMPT_SET.value).train
  summary = run(_MODEL_DIR.value, prompts, _FACTOR.value, _PROMPTS_PER_VALUE.value,
                _NUM_VIEWS.value, [float(t) for t in _T_FRACTIONS.value], _SEED.value,
                [float(a) for a in _AZIMUTHS.value], _ELEVATION.value, _HATS.value)
  out_dir = pathlib.Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
  t_header = " ".join(f"{t:>5}" for t in summary["t_fractions"])
  print(f"{_FACTOR.value:>10}   all-t | accuracy at t = {t_header}   (chance "
        f"{summary['chance']:.3f}, {summary['seconds']} s)")
  for value, row in list(summary["per_value"].items()) + [("all", summary)]:
    by_t = " ".join(f"{a:5.2f}" for a in row["accuracy_by_t"])
    print(f"{value:>10}   {row['accuracy']:5.2f} |                 {by_t}")
  if _AZIMUTHS.value:  # which views carry the signal
    for value, row in summary["per_value"].items():
      for azimuth, label, by_t in zip(summary["azimuths_deg"], summary["view_labels"],
                                      row["accuracy_by_view"]):
        cells = " ".join(f"{a:5.2f}" for a in by_t)
        print(f"{value:>10} at azimuth {azimuth:6.1f} ({label:>8}): {cells}")


if __name__ == "__main__":
  # Flags here, not at import: the tests import every experiment into one
  # process, and absl refuses a second definition of a name such as model_dir.
  _MODEL_DIR = flags.DEFINE_string("model_dir", "weights/shapes", "diffusers folder of the model")
  _PROMPT_SET = flags.DEFINE_string("prompt_set", "shapes_2400",
                                    "shapes-world prompt set whose training prompts are judged")
  _FACTOR = flags.DEFINE_enum("factor", "shape", list(FACTOR_VALUES), "the factor to classify")
  _PROMPTS_PER_VALUE = flags.DEFINE_integer("prompts_per_value", 8,
                                            "training prompts per value of the factor")
  _NUM_VIEWS = flags.DEFINE_integer("num_views", 8, "random shapes-world cameras per prompt")
  _T_FRACTIONS = flags.DEFINE_list("t_fractions", [str(t) for t in DEFAULT_T_FRACTIONS],
                                   "timesteps as fractions of the schedule")
  _AZIMUTHS = flags.DEFINE_list("azimuths_deg", [],
                                "fixed cameras at these azimuths, not --num_views random ones")
  _ELEVATION = flags.DEFINE_float("elevation_deg", 15.0, "elevation of the --azimuths_deg cameras")
  _SEED = flags.DEFINE_integer("seed", 0, "cameras and noise derive from it")
  _HATS = flags.DEFINE_enum("hats", "any", list(HAT_FILTERS),
                            "which prompts: any, only those with a hat, or only hatless ones")
  _OUT_DIR = flags.DEFINE_string("out_dir", "runs/guidance_classifier", "where results.json goes")
  app.run(main)
