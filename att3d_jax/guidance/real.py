r"""Guidance from a real text-to-image model in a local diffusers folder.

  kind "if": DeepFloyd IF stage I, pixel space (64 x 64), T5 text embeddings.
      --config.guidance.path: the IF-I pipeline folder (unet/, scheduler/).
  kind "sd": Stable Diffusion, latent space through the VAE encoder, CLIP text
      embeddings (config.guidance.text_encoder_kind: "clip" or "clip_penultimate").
      --config.guidance.path: the pipeline folder (unet/, vae/, scheduler/).

--config.guidance.text_encoder_path is the folder with tokenizer/ and
text_encoder/ (for SD usually the pipeline folder itself; for IF the T5 may
live elsewhere). Text embeddings are computed once and cached on disk in
config.guidance.cache_dir (guidance/text.py). Nothing is ever downloaded.

What `train.Guidance` gets:
  eps_fn: the frozen UNet (Flax port, guidance/unet.py) in config.guidance.dtype;
    IF's learned-variance channels are returned and dropped by schedule.guided_eps.
  encode: per-token embeddings [N, L, D], L = 77 for T5 (IF) or the CLIP
    tokenizer's length, as the pipelines feed the UNet (no attention mask: the
    diffusers IF and SD pipelines pass none to the UNet either).
  embed: the mapping network's input [N, D]: the mean of the prompt's token
    embeddings over its valid tokens (the tokenizer's attention mask, i.e. the
    prompt and its BOS/EOS tokens, not the padding). ATT3D feeds the flattened
    embedding (77 x 4096 = 315k inputs for T5); the mean keeps the hypernet's
    first layer small (D x hidden_width) and ignores the padding, which carries
    no information about the prompt; the per-token embeddings still condition
    the diffusion model.
"""

import functools
import os
from typing import Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from att3d_jax import train
from att3d_jax.guidance import schedule
from att3d_jax.guidance import sds
from att3d_jax.guidance import text
from att3d_jax.guidance import unet as unet_lib
from att3d_jax.guidance import vae as vae_lib

KINDS = ("if", "sd")
DTYPES = ("float32", "bfloat16")  # config.guidance.dtype
_LAYOUTS = {
    "if": "a local DeepFloyd IF stage-I diffusers folder (containing unet/ and scheduler/), "
          "e.g. a copy of DeepFloyd/IF-I-XL-v1.0",
    "sd": "a local Stable Diffusion diffusers folder (containing unet/, vae/ and "
          "scheduler/), e.g. a copy of stabilityai/stable-diffusion-2-1-base",
}
_TEXT_LAYOUT = ("a local folder with tokenizer/ and text_encoder/ (the T5 encoder for IF, "
                "CLIP for SD; often the diffusers pipeline folder itself)")


def _required_folder(value: str, flag: str, layout: str) -> str:
  """`value` expanded; ValueError naming `flag` if unset, FileNotFoundError if absent."""
  if not value:
    raise ValueError(f"{flag} is not set: pass {layout}. Nothing is downloaded.")
  folder = os.path.expanduser(value)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{flag}={value!r} is not a folder: pass {layout}.")
  return folder


def text_encoder_kind(config: ml_collections.ConfigDict) -> str:
  """T5 for IF; config.guidance.text_encoder_kind ("clip" | "clip_penultimate") for SD."""
  if config.guidance.kind == "if":
    return "t5"
  kind = config.guidance.text_encoder_kind
  if kind not in ("clip", "clip_penultimate"):
    raise ValueError(f"config.guidance.text_encoder_kind={kind!r}; Stable Diffusion takes "
                     "'clip' (SD 1.x, and 2.x diffusers folders) or 'clip_penultimate'")
  return kind


class TextEmbeddings:
  """Cached per-token embeddings and the valid-token masks of one text encoder."""

  def __init__(self, encoder_kind: str, folder: str, cache_dir: str):
    self.encoder_kind = encoder_kind
    self.folder = folder
    self.cache = text.EmbeddingCache(encoder_kind, folder, os.path.expanduser(cache_dir))

  def encode(self, captions: Sequence[str]) -> np.ndarray:
    """captions [N] -> per-token embeddings [N, L, D] float32 (empty caption allowed)."""
    return self.cache.lookup(list(captions))

  @functools.cached_property
  def _tokenizer(self):
    import transformers  # pylint: disable=g-import-not-at-top
    return transformers.AutoTokenizer.from_pretrained(
        os.path.join(self.folder, "tokenizer"), local_files_only=True)

  def valid_tokens(self, prompts: Sequence[str], length: int) -> np.ndarray:
    """[N, length] float32: 1 on the prompt's tokens (BOS/EOS included), 0 on padding;
    tokenized exactly as text.TextEncoder does."""
    if self.encoder_kind == "t5":
      prompts = [prompt.lower().strip() for prompt in prompts]
    tokens = self._tokenizer(list(prompts), padding="max_length", max_length=length,
                             truncation=True, return_tensors="np")
    return tokens["attention_mask"].astype(np.float32)

  def embed(self, prompts: Sequence[str]) -> np.ndarray:
    """prompts [N] -> the masked token mean [N, D] float32 (see the module docstring)."""
    text.validate_prompts(prompts)
    tokens = self.encode(prompts)  # [N, L, D]
    mask = self.valid_tokens(prompts, tokens.shape[1])[:, :, None]
    return ((tokens * mask).sum(1) / np.maximum(mask.sum(1), 1.0)).astype(np.float32)


def _make_eps_fn(loaded: unet_lib.LoadedUNet, dtype) -> schedule.EpsFn:
  module, params = loaded.module, loaded.params

  def eps_fn(noisy, timesteps, text_embeddings):
    """noisy [N, C, h, w], timesteps [N] int32, text [N, L, D] -> [N, C(x2), h, w] float32."""
    out = module.apply({"params": params}, noisy.astype(dtype), timesteps,
                       text_embeddings.astype(dtype))
    return out.astype(jnp.float32)

  return eps_fn


def _latent_model_input(vae: vae_lib.VAE, image_size: int):
  def model_input(images):
    """Renders [N, H, W, 3] in [0, 1] -> scaled SD latents [N, 4, image_size / 8, ...].

    The posterior MEAN, not a sample: Guidance.model_input takes no PRNG key,
    and the mean is the deterministic (lower-variance) choice; the SDS noise
    is added afterwards anyway. Differentiable through the encoder.
    """
    posterior = vae.encode(sds.pixel_model_input(images, image_size))
    return (posterior.mean - vae.shift_factor) * vae.scaling_factor

  return model_input


def load_guidance(config: ml_collections.ConfigDict) -> train.Guidance:
  """The frozen IF or SD model and its cached text embeddings, from local folders only.

  Config fields read (configs/df27.py documents them): guidance.kind, path,
  text_encoder_path, text_encoder_kind (SD), cache_dir, dtype, attention;
  render.background_color.

  Raises:
    ValueError: an unset --config.guidance.path / text_encoder_path (naming the
      flag), or a model that does not fit the kind (e.g. a latent UNet for "if").
    FileNotFoundError: a missing folder or file, naming the flag and the layout.
  """
  kind = config.guidance.kind
  if kind not in KINDS:
    raise ValueError(f"real guidance kind must be one of {KINDS}, got {kind!r}")
  path = _required_folder(config.guidance.path, "--config.guidance.path", _LAYOUTS[kind])
  text_path = _required_folder(config.guidance.text_encoder_path,
                               "--config.guidance.text_encoder_path", _TEXT_LAYOUT)
  if config.guidance.dtype not in DTYPES:
    raise ValueError(f"--config.guidance.dtype={config.guidance.dtype!r}; use one of {DTYPES} "
                     "(bfloat16 on a GPU/TPU, float32 on a CPU, which has no fast bf16)")
  dtype = jnp.dtype(config.guidance.dtype)
  unet = unet_lib.load_unet(path, dtype=dtype, attention=config.guidance.attention)
  unet_config = unet.config
  if unet_config.class_embed_type is not None:
    raise ValueError(f"the UNet in {path!r} needs class labels (class_embed_type="
                     f"{unet_config.class_embed_type!r}); ATT3D guidance takes a text-only "
                     "UNet (DeepFloyd IF stage I or Stable Diffusion)")
  latent = kind == "sd"
  if (unet_config.in_channels == 3) == latent:
    raise ValueError(
        f"--config.guidance.kind={kind!r} but the UNet in {path!r} takes "
        f"{unet_config.in_channels} input channels: IF stage I is a pixel model (3), "
        "Stable Diffusion a latent one (4). Set --config.guidance.kind accordingly.")
  sample_size = unet_config.sample_size
  if not isinstance(sample_size, int):  # a [height, width] pair
    sample_size = sample_size[0]

  if latent:
    vae = vae_lib.load_vae(path, dtype=dtype)
    # Pixels per latent: SD's VAE halves the size in every block but the last.
    image_size = sample_size * 2 ** (len(vae.module.block_out_channels) - 1)
    model_input = _latent_model_input(vae, image_size)
  else:
    model_input = functools.partial(sds.pixel_model_input, image_size=sample_size)

  texts = TextEmbeddings(text_encoder_kind(config), text_path, config.guidance.cache_dir)
  uncond = texts.encode([""])  # [1, L, D]
  if uncond.shape[-1] != unet_config.context_dim:
    raise ValueError(
        f"the text encoder in --config.guidance.text_encoder_path={text_path!r} gives "
        f"{uncond.shape[-1]}-wide embeddings but the UNet in --config.guidance.path takes "
        f"{unet_config.context_dim}; pass the encoder this UNet was trained with")
  return train.Guidance(
      eps_fn=_make_eps_fn(unet, dtype),
      alphas_cumprod=jnp.asarray(schedule.load_alphas_cumprod(path), jnp.float32),
      uncond=jnp.asarray(uncond, jnp.float32),
      model_input=model_input,
      encode=texts.encode,
      embed=texts.embed,
      background_color=tuple(float(c) for c in config.render.background_color))
