"""experiments/cfg_inflation.py: the guided foreground against brute force with a
denoiser whose answer is known, and a command-line run of a tiny model."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cfg_inflation

import conftest


def test_guided_foreground_matches_brute_force():
  # A denoiser that reads its estimate of the clean image from the "caption" and
  # inverts x_t = sqrt(a) x + sqrt(1 - a) eps: x0_hat is the caption's image, so
  # the guided estimate is u + w (c - u) for captions c and the empty one u.
  alphas_cumprod = jnp.linspace(0.99, 0.05, 100)

  def eps_fn(noisy, t, conditioning):
    alpha = alphas_cumprod[t][:, None, None, None]
    return (noisy - jnp.sqrt(alpha) * conditioning) / jnp.sqrt(1.0 - alpha)

  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  batch, size = 3, 5
  captions = jax.random.uniform(keys[0], (batch, 3, size, size), minval=-1.0, maxval=1.0)
  uncond = jax.random.uniform(keys[1], (1, 3, size, size), minval=-1.0, maxval=1.0)
  images = jnp.zeros((batch, 3, size, size))  # what the denoiser is given hardly matters
  timesteps = jnp.asarray([10, 70], jnp.int32)
  noise = jax.random.normal(keys[2], (2, 2, batch, 3, size, size))
  weights = jnp.asarray([1.0, 3.0, 7.5])
  background = jnp.asarray([0.25, 0.45, 0.5])
  areas = np.asarray(cfg_inflation.guided_foreground(
      eps_fn, alphas_cumprod, images, captions, uncond, timesteps, noise, weights, background,
      0.3))
  assert areas.shape == (3, 2, 2)
  for w_index, weight in enumerate(np.asarray(weights)):
    guided = np.asarray(uncond) + weight * (np.asarray(captions) - np.asarray(uncond))
    rgb = (guided + 1.0) / 2.0  # [0, 1] units
    expected = np.sum(np.linalg.norm(rgb - np.asarray(background)[None, :, None, None],
                                     axis=1) > 0.3)
    # The estimate does not depend on the noise here: every level and draw agrees
    # (up to float32 rounding in the inversion, which can flip a pixel at the edge).
    np.testing.assert_allclose(areas[w_index], expected, atol=1)
  assert len(set(areas[:, 0, 0].tolist())) > 1  # the weights differ


def test_command_line_writes_results(tiny_shapes_model, tmp_path):
  # The flags are defined only under __main__, so the entry point is run as a
  # process; a flag clash with another experiment's would fail here.
  command = [sys.executable, "-m", "experiments.cfg_inflation",
             f"--model_dir={tiny_shapes_model}", "--every=200", "--weights=1,5",
             "--t_fractions=0.5", "--num_noise=1", f"--out_dir={tmp_path}"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=conftest.env_without_xla_flags(),
                          cwd=pathlib.Path(__file__).parent.parent)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((tmp_path / "results.json").read_text())
  assert summary["num_prompts"] == 2 and summary["gt_area_pixels"] > 0
  assert set(summary["area_ratio"]) == {"1.0", "5.0"}
  for row in summary["area_ratio"].values():
    assert set(row) == {"0.5"} and np.isfinite(row["0.5"]) and row["0.5"] >= 0.0
  assert "CFG weight" in result.stdout
