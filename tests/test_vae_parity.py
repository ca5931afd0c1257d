"""The Flax AutoencoderKL against diffusers' PyTorch one, and the loader's errors."""

import json
import os

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

from att3d_jax.guidance import vae as vae_lib

CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
              layers_per_block=2, latent_channels=4, norm_num_groups=4, sample_size=16,
              scaling_factor=0.3)


def _save_random_vae(folder, **overrides):
  """A tiny diffusers AutoencoderKL with every weight perturbed (so that unit norms,
  zero biases and symmetric inits cannot hide a layout error), saved as a pipeline."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**{**CONFIG, **overrides}).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.2 * torch.randn_like(param))
  model.save_pretrained(os.path.join(folder, "vae"))
  return model


def test_encoder_and_decoder_match_diffusers(tmp_path):
  reference = _save_random_vae(str(tmp_path))
  vae = vae_lib.load_vae(str(tmp_path))  # the pipeline folder
  assert vae.scaling_factor == 0.3

  images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(torch.from_numpy(images)).latent_dist
    latents = posterior.mean + 0.5 * torch.randn_like(posterior.mean)
    decoded = reference.decode(latents).sample
  ours = vae.encode(jnp.asarray(images))
  assert ours.mean.shape == (2, 4, 8, 8)
  np.testing.assert_allclose(ours.mean, posterior.mean.numpy(), rtol=0, atol=1e-4)
  np.testing.assert_allclose(ours.logvar, posterior.logvar.numpy(), rtol=0, atol=1e-4)
  ours_decoded = vae.decode(jnp.asarray(latents.numpy()))
  assert ours_decoded.shape == (2, 3, 16, 16)
  np.testing.assert_allclose(ours_decoded, decoded.numpy(), rtol=0, atol=1e-4)
  # UNet latents are scaled by scaling_factor.
  np.testing.assert_allclose(vae.decode_latents(0.3 * jnp.asarray(latents.numpy())), ours_decoded,
                             rtol=0, atol=2e-5)


def test_vae_without_attention_or_quant_convs(tmp_path):
  reference = _save_random_vae(str(tmp_path), layers_per_block=1, mid_block_add_attention=False,
                               use_quant_conv=False, use_post_quant_conv=False)
  vae = vae_lib.load_vae(str(tmp_path / "vae"))  # the vae/ folder itself
  images = np.random.default_rng(1).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(torch.from_numpy(images)).latent_dist
    decoded = reference.decode(posterior.mean).sample
  ours = vae.encode(jnp.asarray(images))
  np.testing.assert_allclose(ours.mean, posterior.mean.numpy(), rtol=0, atol=1e-4)
  np.testing.assert_allclose(vae.decode(ours.mean), decoded.numpy(), rtol=0, atol=1e-4)


def test_loader_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="vae/config.json.*--config.guidance.path"):
    vae_lib.load_vae(str(tmp_path))
  model = _save_random_vae(str(tmp_path))
  weights = os.path.join(tmp_path, "vae", "diffusion_pytorch_model.safetensors")
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  del state["encoder.mid_block.attentions.0.to_q.weight"]
  state["decoder.conv_in.weight"] = torch.zeros(16, 4, 1, 1)
  safetensors.torch.save_file(state, weights)
  with pytest.raises(ValueError) as error:
    vae_lib.load_vae(str(tmp_path))
  message = str(error.value)
  assert "encoder.mid_block.attentions.0.to_q.weight  expected shape (16, 16)" in message
  assert "decoder.conv_in.weight  expected (16, 4, 3, 3), got (16, 4, 1, 1)" in message

  with open(os.path.join(tmp_path, "vae", "config.json")) as f:
    config = json.load(f)
  config["up_block_types"] = ["AttnUpDecoderBlock2D"] * 2
  with pytest.raises(NotImplementedError, match="up_block_types.*UpDecoderBlock2D"):
    vae_lib.module_from_config(config)
