"""experiments/guidance_classifier.py: candidates, the denoising errors against a
denoiser whose right answer is known, the summary, and a run of a tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.shapes import prompt_sets
from att3d_jax.shapes import scenes
from experiments import guidance_classifier

import conftest


def test_candidates_differ_in_the_factor_only():
  scene = scenes.parse_prompt("a small blue torus wearing a red beanie")
  candidates = guidance_classifier.candidate_scenes(scene, "shape")
  assert [c.shape for c in candidates] == list(scenes.SHAPES)
  assert scene in candidates
  for candidate in candidates:
    assert dataclasses.replace(candidate, shape=scene.shape) == scene
  assert len(guidance_classifier.candidate_scenes(scene, "hat")) == len(scenes.HATS)
  with pytest.raises(ValueError, match="no hat"):
    guidance_classifier.candidate_scenes(scenes.parse_prompt("a blue torus"), "hat_color")
  with pytest.raises(ValueError, match="unknown factor"):
    guidance_classifier.candidate_scenes(scene, "texture")


def test_choose_prompts_groups_by_value_in_order():
  prompts = prompt_sets.load_prompt_set("shapes_2400").train
  chosen = guidance_classifier.choose_prompts(prompts, "size", 3)
  assert [scenes.parse_prompt(p).size for p in chosen] == ["", "", "", "small", "small", "small"]
  assert chosen[:3] == [p for p in prompts if scenes.parse_prompt(p).size == ""][:3]
  hats = guidance_classifier.choose_prompts(prompts, "hat", 2)
  assert all(scenes.parse_prompt(p).hat is not None for p in hats)
  with pytest.raises(ValueError, match="fewer than"):
    guidance_classifier.choose_prompts(prompts[:10], "shape", 5)


def test_choose_prompts_keeps_the_hats_asked_for():
  prompts = prompt_sets.load_prompt_set("shapes_2400").train
  hatless = guidance_classifier.choose_prompts(prompts, "shape", 7, hats="none")
  assert len(hatless) == 7 * len(scenes.SHAPES)
  assert all(scenes.parse_prompt(p).hat is None for p in hatless)
  assert hatless[:7] == [p for p in prompts if scenes.parse_prompt(p).hat is None
                         and scenes.parse_prompt(p).shape == scenes.SHAPES[0]][:7]
  hatted = guidance_classifier.choose_prompts(prompts, "shape", 2, hats="with")
  assert all(scenes.parse_prompt(p).hat is not None for p in hatted)
  with pytest.raises(ValueError, match="fewer than"):  # the training split has 7 hatless tori
    guidance_classifier.choose_prompts(prompts, "shape", 8, hats="none")
  with pytest.raises(ValueError, match="unknown hats"):
    guidance_classifier.choose_prompts(prompts, "shape", 2, hats="some")


def test_denoising_errors_pick_the_caption_that_explains_the_image():
  # A denoiser that reads the candidate's clean image from its "caption" and
  # inverts x_t = sqrt(a) x + sqrt(1 - a) eps: exact for the true candidate.
  alphas_cumprod = jnp.linspace(0.99, 0.05, 100)
  eps_fn = conftest.caption_image_denoiser(alphas_cumprod)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  num_views, num_candidates, size = 2, 3, 4
  images = jax.random.normal(keys[0], (num_views, 3, size, size))
  others = jax.random.normal(keys[1], (num_candidates, num_views, 3, size, size))
  conditioning = others.at[1].set(images)  # candidate 1 is the truth
  timesteps = jnp.asarray([10, 60], jnp.int32)
  noise = jax.random.normal(keys[2], (2, num_views, 3, size, size))
  errors = np.asarray(guidance_classifier.denoising_errors(
      eps_fn, alphas_cumprod, images, conditioning, timesteps, noise))
  assert errors.shape == (num_views, num_candidates, 2)
  # Brute force for one entry: candidate 0, view 1, level 1.
  alpha = float(alphas_cumprod[60])
  noisy = np.sqrt(alpha) * images[1] + np.sqrt(1 - alpha) * noise[1, 1]
  expected = np.mean(((noisy - np.sqrt(alpha) * others[0, 1]) / np.sqrt(1 - alpha)
                      - noise[1, 1]) ** 2)
  np.testing.assert_allclose(errors[1, 0, 1], expected, rtol=1e-5)
  np.testing.assert_allclose(errors[:, 1], 0.0, atol=1e-8)
  assert np.all(np.argmin(errors, axis=1) == 1)


def test_summary_counts_choices_per_value_and_level():
  # 2 prompts (truth: size "" and "small"), 1 view, 2 candidates [error at t0, t1].
  errors = np.array([[[[0.1, 0.3], [0.2, 0.1]]],  # prompt 0: right at t0 only; sums 0.4 > 0.3
                     [[[0.5, 0.4], [0.1, 0.2]]]])  # prompt 1: right at both; sums 0.9 > 0.3
  summary = guidance_classifier.summarize(errors, np.array([0, 1]), "size", (0.2, 0.8))
  assert summary["chance"] == 0.5
  assert summary["per_value"][""]["accuracy_by_t"] == [1.0, 0.0]
  assert summary["per_value"][""]["accuracy"] == 0.0
  assert summary["per_value"][""]["chosen"] == {"small": 1}
  assert summary["per_value"]["small"]["accuracy"] == 1.0
  assert summary["per_value"]["small"]["chosen"] == {"small": 1}
  assert summary["accuracy"] == 0.5
  assert summary["accuracy_by_t"] == [1.0, 0.5]
  assert summary["per_value"][""]["accuracy_by_view"] == [[1.0, 0.0]]  # [V][T]


def test_run_on_a_tiny_model(tiny_shapes_model):
  prompts = prompt_sets.load_prompt_set("shapes_2400").train
  summary = guidance_classifier.run(tiny_shapes_model, prompts, "size", prompts_per_value=1,
                                    num_views=2, t_fractions=(0.3, 0.9), seed=0)
  assert summary["num_prompts"] == 2 and len(summary["view_labels"]) == 2
  assert set(summary["per_value"]) == {"", "small"}
  for row in summary["per_value"].values():
    assert row["num_images"] == 2
    assert 0.0 <= row["accuracy"] <= 1.0 and len(row["accuracy_by_t"]) == 2
    assert sum(row["chosen"].values()) == 2


def test_fixed_azimuths_give_one_camera_each_with_its_view_label(tiny_shapes_model):
  cameras = guidance_classifier.classifier_cameras(jax.random.PRNGKey(0), 8, (0.0, 90.0, 170.0),
                                                   elevation_deg=15.0)
  np.testing.assert_allclose(np.rad2deg(cameras.azimuth), [0.0, 90.0, 170.0], atol=1e-4)
  np.testing.assert_allclose(np.rad2deg(cameras.elevation), 15.0, atol=1e-4)
  assert cameras_lib.view_labels(cameras) == ["front", "side", "back"]
  prompts = prompt_sets.load_prompt_set("shapes_2400").train
  summary = guidance_classifier.run(tiny_shapes_model, prompts, "size", prompts_per_value=1,
                                    num_views=8, t_fractions=(0.5,), seed=0,
                                    azimuths_deg=(0.0, 90.0))
  assert summary["view_labels"] == ["front", "side"]
  assert summary["azimuths_deg"] == [0.0, 90.0] and summary["elevations_deg"] == [15.0, 15.0]
  for row in summary["per_value"].values():
    assert row["num_images"] == 2 and np.shape(row["accuracy_by_view"]) == (2, 1)


def test_command_line_writes_results(tiny_shapes_model, tmp_path):
  summary, stdout = conftest.run_experiment(
      "experiments.guidance_classifier",
      [f"--model_dir={tiny_shapes_model}", "--factor=size", "--prompts_per_value=1",
       "--num_views=1", "--t_fractions=0.5"], tmp_path)
  assert summary["factor"] == "size" and summary["num_prompts"] == 2
  assert "small" in stdout and "all" in stdout
