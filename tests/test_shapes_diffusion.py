"""The shapes diffusion model's glue, export and training/SDS scripts."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from att3d_jax import assets
from att3d_jax.guidance import unet as unet_lib
from att3d_jax.shapes import diffusion
from configs import sds_single as sds_single_config
from configs import shapes_diffusion as shapes_diffusion_config
from experiments import sds_single
from experiments import train_shapes_diffusion

import conftest
import test_tensorboard

SHIPPED = assets.shipped("shapes")
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED_SIZE_LIMIT = 25 * 2**20  # bytes: the model ships inside the repository


def test_pack_unpack_conditioning_roundtrip():
  tokens = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  pooled = -jnp.arange(8, dtype=jnp.float32).reshape(2, 4)
  packed = diffusion.pack_conditioning(tokens, pooled)
  assert packed.shape == (2, 4, 4)
  got_tokens, got_pooled = diffusion.unpack_conditioning(packed)
  np.testing.assert_array_equal(got_tokens, tokens)
  np.testing.assert_array_equal(got_pooled, pooled)


def _check_flax_matches_diffusers(folder):
  """The folder's UNet in our Flax port and in diffusers PyTorch agree."""
  model = diffusion.ShapesDiffusionModel(str(folder))
  text = json.loads((folder / diffusion.TEXT_ENCODER_FILE).read_text())
  conditioning = model.conditioning(["a red cube, front view", "a small blue torus, side view"])
  assert conditioning.shape == (2, 1 + text["max_length"], 384)
  x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
  t = np.array([10, 700])
  ours = np.asarray(model.eps_fn()(jnp.asarray(x), jnp.asarray(t), conditioning))
  reference = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
  c = np.asarray(conditioning)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c[:, 1:]),
                         class_labels=torch.from_numpy(c[:, 0])).sample.numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-4)
  # The pooled row matters: zeroing it changes the prediction.
  unpooled = conditioning.at[:, 0].set(0.0)
  assert np.abs(np.asarray(model.eps_fn()(jnp.asarray(x), jnp.asarray(t), unpooled))
                - ours).max() > 1e-3
  return text


def test_exported_model_matches_diffusers_with_pooled_text(tmp_path):
  config = conftest.random_shapes_export(tmp_path)
  assert _check_flax_matches_diffusers(tmp_path)["max_length"] == config.text_max_length


def test_shipped_model_loads_in_diffusers_and_flax_alike():
  _check_flax_matches_diffusers(SHIPPED)
  assert (SHIPPED / "scheduler" / "scheduler_config.json").is_file()
  assert (SHIPPED / "README.md").is_file()


def test_shipped_model_fits_the_size_limit():
  total = sum(path.stat().st_size for path in SHIPPED.rglob("*") if path.is_file())
  assert 1e6 < total <= SHIPPED_SIZE_LIMIT, total


def test_missing_model_folder_names_the_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="unet/config.json.*text_encoder.json"):
    diffusion.ShapesDiffusionModel(str(tmp_path))


def test_min_snr_weights_against_their_definition():
  alpha_bar = jnp.asarray([0.999, 10.0 / 11.0, 5.0 / 6.0, 0.5, 1e-3])  # SNR 999, 10, 5, 1, ~1e-3
  snr = alpha_bar / (1.0 - alpha_bar)
  weights = train_shapes_diffusion.min_snr_weights(alpha_bar, 5.0)
  np.testing.assert_allclose(weights, [5.0 / 999.0, 0.5, 1.0, 1.0, 1.0], rtol=1e-4)
  np.testing.assert_allclose(weights * snr, np.minimum(snr, 5.0), rtol=1e-4)
  np.testing.assert_array_equal(train_shapes_diffusion.min_snr_weights(alpha_bar, 0.0), 1.0)


def test_snr_floor_raises_the_high_noise_weights_up_to_the_cap():
  snr = jnp.asarray([999.0, 10.0, 5.0, 1.0, 0.5, 0.1, 1e-3])
  alpha_bar = snr / (1.0 + snr)
  weights = train_shapes_diffusion.min_snr_weights(alpha_bar, 5.0, snr_floor=1.0, max_weight=20.0)
  # x0-space weight clip(SNR, 1, 5) while the epsilon weight 1 / SNR is under the cap.
  np.testing.assert_allclose(weights, [5.0 / 999.0, 0.5, 1.0, 1.0, 2.0, 10.0, 20.0], rtol=1e-4)
  np.testing.assert_allclose((weights * snr)[:6], np.clip(snr[:6], 1.0, 5.0), rtol=1e-4)
  # The floor leaves the Min-SNR weights alone where SNR is above it.
  np.testing.assert_allclose(weights[:4],
                             train_shapes_diffusion.min_snr_weights(alpha_bar, 5.0)[:4], rtol=1e-6)


def _train_quick_cli(workdir, cpu_devices: int) -> tuple[str, list[float]]:
  """The trainer's CLI on the quick config with the CPU split into
  `cpu_devices`; returns its output and the logged losses."""
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train_shapes_diffusion",
       "--config=configs/shapes_diffusion.py:quick", f"--workdir={workdir}",
       f"--config.cpu_devices={cpu_devices}", "--config.sample_steps=1"],
      cwd=REPO_ROOT, env=conftest.entry_point_env(JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return out.stdout + out.stderr, [json.loads(line)["loss"] for line in lines]


def test_init_from_takes_a_model_made_at_another_resolution(tiny_shapes_model):
  loaded = unet_lib.load_unet(tiny_shapes_model)
  at_64 = dataclasses.replace(loaded.config, sample_size=64)
  assert at_64 != loaded.config
  params = train_shapes_diffusion.init_params_from(tiny_shapes_model, at_64)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params)):
    np.testing.assert_array_equal(got, want)
  wider = dataclasses.replace(at_64, block_out_channels=tuple(
      2 * c for c in loaded.config.block_out_channels))
  with pytest.raises(ValueError, match="differs from config.unet in more than sample_size"):
    train_shapes_diffusion.init_params_from(tiny_shapes_model, wider)


@pytest.mark.slow  # minutes under `pytest -n 2`: kept out of the default suite
def test_trainer_splits_the_batch_over_two_cpu_devices_with_the_same_result(tmp_path):
  """config.cpu_devices=2 renders and denoises half the batch on each XLA CPU
  device; the losses match one device (the batch is drawn from the step key)."""
  one_log, one = _train_quick_cli(tmp_path / "one", 1)
  two_log, two = _train_quick_cli(tmp_path / "two", 2)
  assert "mesh {'data': 1} over 1 cpu device(s)" in one_log
  assert "mesh {'data': 2} over 2 cpu device(s)" in two_log
  assert len(one) == 2 and np.all(np.isfinite(one))
  np.testing.assert_allclose(two, one, rtol=1e-5)
  events = test_tensorboard.read_events(tmp_path / "one" / "tensorboard")
  assert len(events["train/loss"]) == 2 and "samples" in events  # the final sample grid


@pytest.mark.slow
def test_train_quick_checkpoints_resumes_and_exports(tmp_path):
  config = shapes_diffusion_config.get_config("quick")
  workdir, export_dir = tmp_path / "run", tmp_path / "export"
  summary = train_shapes_diffusion.train(config, str(workdir), None)
  assert summary["steps"] == config.num_steps
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(line["loss"]) for line in lines)
  with config.unlocked():
    config.num_steps += 2
  summary = train_shapes_diffusion.train(config, str(workdir), str(export_dir))
  assert summary["steps"] == config.num_steps  # resumed, then two more steps
  assert (workdir / "samples_final.png").exists()
  events = test_tensorboard.read_events(workdir / "tensorboard")
  assert "samples" in events and "train/loss" in events
  diffusion.ShapesDiffusionModel(str(export_dir))  # loads


@pytest.mark.slow
def test_sds_single_quick_runs_on_a_random_model(tmp_path):
  conftest.random_shapes_export(tmp_path / "model")
  config = sds_single_config.get_config("quick")
  with config.unlocked():
    config.guidance.path = str(tmp_path / "model")
    config.train.progress_bar = False
  results = sds_single.run(config, str(tmp_path / "run"))
  assert len(results["per_prompt"]) == 8
  assert all(0.0 <= row["iou"] <= 1.0 for row in results["per_prompt"])
  assert [point["step"] for point in results["curve"]] == [0, 3, 6]
  assert results["frames_per_prompt"] == config.train.num_steps * config.batch.views_per_prompt
