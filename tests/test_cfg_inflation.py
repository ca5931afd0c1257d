"""experiments/cfg_inflation.py: the guided foreground against brute force with a
denoiser whose answer is known, and a command-line run of a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.shapes import diffusion
from experiments import cfg_inflation

import conftest


@pytest.mark.parametrize("num_negatives", [1, 3])  # the empty caption; one per image
def test_guided_foreground_matches_brute_force(num_negatives):
  # x0_hat of this denoiser is its caption's image, so the guided estimate is
  # u + w (c - u) for captions c and the empty (or negative) ones u.
  alphas_cumprod = jnp.linspace(0.99, 0.05, 100)
  eps_fn = conftest.caption_image_denoiser(alphas_cumprod)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  batch, size = 3, 5
  captions = jax.random.uniform(keys[0], (batch, 3, size, size), minval=-1.0, maxval=1.0)
  uncond = jax.random.uniform(keys[1], (num_negatives, 3, size, size), minval=-1.0, maxval=1.0)
  images = jnp.zeros((batch, 3, size, size))  # what the denoiser is given hardly matters
  timesteps = jnp.asarray([10, 70], jnp.int32)
  noise = jax.random.normal(keys[2], (2, 2, batch, 3, size, size))
  weights = jnp.asarray([1.0, 3.0, 7.5])
  rescales = jnp.asarray([0.0, 1.0])
  background = jnp.asarray([0.25, 0.45, 0.5])
  areas = np.asarray(cfg_inflation.guided_foreground(
      eps_fn, alphas_cumprod, images, captions, uncond, timesteps, noise, weights, rescales,
      background, 0.3))
  assert areas.shape == (2, 3, 2, 2)
  for w_index, weight in enumerate(np.asarray(weights)):
    guided = np.asarray(uncond) + weight * (np.asarray(captions) - np.asarray(uncond))
    rgb = (guided + 1.0) / 2.0  # [0, 1] units
    expected = np.sum(np.linalg.norm(rgb - np.asarray(background)[None, :, None, None],
                                     axis=1) > 0.3)
    # The estimate does not depend on the noise here: every level and draw agrees
    # (up to float32 rounding in the inversion, which can flip a pixel at the edge).
    np.testing.assert_allclose(areas[0, w_index], expected, atol=1)
  assert len(set(areas[0, :, 0, 0].tolist())) > 1  # the weights differ
  assert not np.array_equal(areas[0, 1:], areas[1, 1:])  # the rescale changes the guided ones


def test_rescale_guided_matches_its_formula():
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  guided = jax.random.normal(keys[0], (2, 3, 4, 4)) * 3.0
  cond = jax.random.normal(keys[1], (2, 3, 4, 4))
  np.testing.assert_allclose(cfg_inflation.rescale_guided(guided, cond, 0.0), guided)
  rescaled = np.asarray(cfg_inflation.rescale_guided(guided, cond, 1.0))
  for b in range(2):  # per image: the conditional's spread, the guided one's direction
    np.testing.assert_allclose(rescaled[b].std(), np.asarray(cond[b]).std(), rtol=1e-5)
    np.testing.assert_allclose(rescaled[b] / np.asarray(guided[b]),
                               np.asarray(cond[b]).std() / np.asarray(guided[b]).std(),
                               rtol=1e-5)
  np.testing.assert_allclose(cfg_inflation.rescale_guided(guided, cond, 0.7),
                             0.7 * rescaled + 0.3 * np.asarray(guided), rtol=1e-5, atol=1e-6)


def test_command_line_writes_results(tiny_shapes_model, tmp_path):
  summary, stdout = conftest.run_experiment(
      "experiments.cfg_inflation", [f"--model_dir={tiny_shapes_model}", "--every=200",
                                    "--weights=1,5", "--t_fractions=0.5", "--num_noise=1",
                                    "--rescales=0.7", "--negative=next_prompt"],
      tmp_path)
  assert summary["negative"] == "next_prompt"
  assert summary["num_prompts"] == 2 and summary["gt_area_pixels"] > 0
  assert set(summary["area_ratio"]) == {"1.0", "5.0"}
  for row in summary["area_ratio"].values():
    assert set(row) == {"0.5"} and np.isfinite(row["0.5"]) and row["0.5"] >= 0.0
  assert set(summary["rescaled"]) == {"0.7"} and set(summary["rescaled"]["0.7"]) == {"1.0", "5.0"}
  assert "CFG weight" in stdout and "CFG rescale phi = 0.7" in stdout


def test_negative_conditioning(tiny_shapes_model):
  model = diffusion.ShapesDiffusionModel(tiny_shapes_model)
  prompts, labels = ["a red cube", "a blue torus", "a small green cone"], ["front", "side", "back"]
  captions = model.conditioning([p + f", {v} view" for p, v in zip(prompts, labels)])
  negative = lambda kind: cfg_inflation.negative_conditioning(model, prompts, labels, captions,
                                                              kind)
  np.testing.assert_array_equal(negative("empty"), np.zeros_like(model.conditioning(["x"])))
  contrast = negative("next_prompt")
  expected = model.conditioning(["a blue torus, front view", "a small green cone, side view",
                                 "a red cube, back view"])
  np.testing.assert_array_equal(contrast, expected)
  with pytest.raises(ValueError, match="unknown negative 'other'"):
    negative("other")
