"""The shapes-world text-to-image model: text conditioning and its denoiser.

The shipped UNet (att3d_jax/weights/shapes/, trained by experiments/train_shapes_diffusion.py)
is a diffusers UNet2DConditionModel conditioned two ways on all-MiniLM-L6-v2
(guidance/minilm.py): cross-attention over the token embeddings, and the pooled
sentence embedding added to the time embedding (`class_embed_type="projection"`).

So that the generic guidance code (`schedule.guided_eps`, `sds.sds_loss`, DDIM)
can treat the text as one array, the two are packed into one conditioning
array `[batch, 1 + max_length, 384]`: row 0 is the pooled embedding, rows 1..
the token embeddings (zero at padding). The unconditional ("empty caption")
conditioning is all zeros, which is also what caption dropout trains on.
"""

import functools
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from att3d_jax import assets
from att3d_jax.guidance import base as guidance_base
from att3d_jax.guidance import minilm
from att3d_jax.guidance import schedule
from att3d_jax.guidance import sds
from att3d_jax.guidance import unet as unet_lib
from att3d_jax.shapes import scenes

DEFAULT_MODEL_DIR = "weights/shapes"  # the shipped model (assets.resolve finds it)
TEXT_ENCODER_FILE = "text_encoder.json"  # which MiniLM and how it is used


def pack_conditioning(tokens: jax.Array, pooled: jax.Array) -> jax.Array:
  """tokens [B, L, D], pooled [B, D] -> conditioning [B, 1 + L, D]."""
  return jnp.concatenate([pooled[:, None, :], tokens], axis=1)


def unpack_conditioning(conditioning: jax.Array) -> tuple[jax.Array, jax.Array]:
  """conditioning [B, 1 + L, D] -> (tokens [B, L, D], pooled [B, D])."""
  return conditioning[:, 1:], conditioning[:, 0]


def encode_captions(encoder: minilm.MiniLMEncoder, captions: Sequence[str],
                    batch_size: int = 256) -> np.ndarray:
  """Packed conditioning `[len(captions), 1 + max_length, 384]` float32.

  Captions go through the encoder `batch_size` at a time, padded to one shape
  (one compilation); fewer captions are padded only to the next power of two,
  so that encoding one prompt (generation) costs one sequence, not 256.
  """
  batch_size = min(batch_size, 1 << max(0, (len(captions) - 1).bit_length()))
  chunks = []
  for start in tqdm.tqdm(range(0, len(captions), batch_size), desc="text encoding",
                         unit="batch", leave=False, disable=len(captions) <= batch_size):
    batch = list(captions[start:start + batch_size])
    padding = batch_size - len(batch)  # keep one batch shape: one compilation
    out = encoder.encode(batch + batch[-1:] * padding)
    chunks.append(np.asarray(pack_conditioning(out["tokens"], out["pooled"]))[:len(batch)])
  return np.concatenate(chunks)


def make_eps_fn(module: unet_lib.UNet2DConditionModel, params) -> schedule.EpsFn:
  """eps_fn(noisy [B, 3, H, W], t [B], conditioning [B, 1 + L, D]) -> eps."""

  def eps_fn(noisy, timesteps, conditioning):
    tokens, pooled = unpack_conditioning(conditioning)
    return module.apply({"params": params}, noisy, timesteps, tokens, class_labels=pooled)

  return eps_fn


class ShapesDiffusionModel:
  """The shipped (or any trained) shapes model: UNet, schedule and text encoder.

  Attributes:
    unet: the LoadedUNet (`.module`, `.params`).
    alphas_cumprod: [num_train_timesteps] float32.
    encoder: the MiniLM encoder at the model's max_length.
  """

  def __init__(self, model_dir: str = DEFAULT_MODEL_DIR):
    model_dir = os.path.abspath(assets.resolve(model_dir))
    text_file = os.path.join(model_dir, TEXT_ENCODER_FILE)
    if not os.path.isfile(text_file):
      raise FileNotFoundError(
          f"no shapes diffusion model in {model_dir!r}: expected unet/config.json, "
          "unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json and "
          f"{TEXT_ENCODER_FILE} (written by experiments/train_shapes_diffusion.py).")
    with open(text_file) as f:
      text_config = json.load(f)
    self.model_dir = model_dir
    self.text_config = text_config
    self.unet = unet_lib.load_unet(model_dir)
    self.alphas_cumprod = jnp.asarray(schedule.load_alphas_cumprod(model_dir), jnp.float32)

  @functools.cached_property
  def encoder(self) -> minilm.MiniLMEncoder:
    # Loaded on first use: a run whose text tables are precomputed never needs MiniLM.
    return minilm.MiniLMEncoder.from_package(max_length=self.text_config["max_length"])

  @property
  def image_size(self) -> int:
    """The square image size the UNet was trained at (its config's sample_size)."""
    size = self.unet.config.sample_size
    if isinstance(size, (tuple, list)) and len(set(size)) == 1:
      size = size[0]
    if not isinstance(size, int):
      raise ValueError(f"the UNet in {self.model_dir!r} has sample_size={size!r}; the "
                       "shapes world needs one square size (e.g. 32) in unet/config.json")
    return size

  def eps_fn(self) -> schedule.EpsFn:
    return make_eps_fn(self.unet.module, self.unet.params)

  def conditioning(self, captions: Sequence[str]) -> jax.Array:
    return jnp.asarray(encode_captions(self.encoder, captions))


def as_guidance(model: ShapesDiffusionModel, encode: Callable[[list[str]], np.ndarray],
                token_shape: tuple[int, int]) -> guidance_base.Guidance:
  """`model` as training's guidance: pixel space, the shapes world's background,
  `encode` captions -> packed conditioning [N, 1 + max_length, width] (token_shape)."""
  return guidance_base.Guidance(
      eps_fn=model.eps_fn(), alphas_cumprod=model.alphas_cumprod,
      uncond=jnp.zeros((1,) + tuple(token_shape)),
      model_input=sds.pixel_model_input,
      encode=encode,
      # The pooled sentence embedding (row 0 of the packed conditioning).
      embed=lambda prompts: encode(prompts)[:, 0],
      background_color=scenes.BACKGROUND_RGB)


@guidance_base.register("shapes")
def load_guidance(config) -> guidance_base.Guidance:
  """The shapes model in config.guidance.path, its MiniLM encoding the captions."""
  try:
    model = ShapesDiffusionModel(config.guidance.path)
  except FileNotFoundError as error:
    raise FileNotFoundError(f"--config.guidance.path={config.guidance.path!r}: "
                            f"{error}") from error
  return as_guidance(model, lambda captions: np.asarray(model.conditioning(captions)),
                     (1 + model.encoder.max_length, model.encoder.width))
