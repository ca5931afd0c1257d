"""Guidance from frozen text-to-image diffusion models: a Flax port of diffusers' UNet."""

from att3d_jax.guidance.unet import LoadedUNet
from att3d_jax.guidance.unet import UNet2DConditionModel
from att3d_jax.guidance.unet import UNetConfig
from att3d_jax.guidance.unet import load_unet
from att3d_jax.guidance.unet import param_shapes
from att3d_jax.guidance.unet import save_unet
