"""Shared fixtures: tiny random models built here (nothing is downloaded)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.guidance import unet as unet_lib
from configs import shapes_diffusion as shapes_diffusion_config


def env_without_xla_flags(**extra: str) -> dict[str, str]:
  """This process's environment minus XLA_FLAGS, plus `extra`: a subprocess
  then gets only the XLA flags its entry point sets itself."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(extra)
  return env


def random_shapes_export(folder, seed: int = 0):
  """A tiny shapes diffusion model with random weights, exported like the
  shipped one (unet/, scheduler/, text_encoder.json). Returns its config."""
  from experiments import train_shapes_diffusion  # pylint: disable=g-import-not-at-top
  config = shapes_diffusion_config.get_config("quick")
  module_config = unet_lib.UNetConfig.from_dict(dict(config.unet))
  shapes = unet_lib.param_shapes(unet_lib.UNet2DConditionModel(module_config))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(scale=0.2, size=s.shape), jnp.float32), shapes)
  train_shapes_diffusion.export(str(folder), config, module_config, params)
  return config


@pytest.fixture(scope="session")
def tiny_shapes_model(tmp_path_factory):
  """Path of a tiny random shapes diffusion model folder."""
  folder = tmp_path_factory.mktemp("tiny_shapes_model")
  random_shapes_export(folder)
  return str(folder)
