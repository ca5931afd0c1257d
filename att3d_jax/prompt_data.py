"""Prompt data: the prompt set, its text tables, and each step's batch.

    config.prompts -> PromptSet (train / held-out prompts)
      -> PromptTables (per prompt: mapping embedding, one conditioning per view caption)
      -> sample_batch(config, tables, step): B rows of k prompts, a pure function
         of (config.seed, step), so a resumed run sees exactly the batches an
         uninterrupted one would.

The Dirichlet mixing weights and the guidance weights come from
`amortize/interpolation.py` (`sample_weights`, `sample_guidance_weight`), the
functions its tests check.
"""

import pathlib
from typing import NamedTuple, Optional

import jax
import ml_collections
import numpy as np

from att3d_jax import real_prompts
from att3d_jax.amortize import interpolation
from att3d_jax.amortize import mapping as mapping_lib
from att3d_jax.guidance import base as guidance_base
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.shapes import prompt_sets

NUM_VIEWS = len(cameras_lib.VIEW_LABELS)
INTERPOLATION_KINDS = ("none", "embedding", "loss")
# Keys of the data stream (the train step's randomness uses 1).
_DATA_STREAM = 2


class PromptTables(NamedTuple):
  """Host-side text tables of a prompt list."""

  prompts: list[str]
  embedding: np.ndarray  # [P, D] float32, the mapping network's text input
  conditioning: np.ndarray  # [P, NUM_VIEWS, L, D] float16, one per view caption


def prompt_tables(guidance: guidance_base.Guidance, prompts: list[str]) -> PromptTables:
  """The guidance model's embedding and view-caption conditionings of `prompts`."""
  if not prompts:
    raise ValueError("empty prompt list")
  captions = [p + cameras_lib.view_suffix(v) for p in prompts for v in cameras_lib.VIEW_LABELS]
  conditioning = guidance.encode(captions).astype(np.float16)
  conditioning = conditioning.reshape((len(prompts), NUM_VIEWS) + conditioning.shape[1:])
  return PromptTables(list(prompts), guidance.embed(list(prompts)).astype(np.float32),
                      conditioning)


def load_prompts(config: ml_collections.ConfigDict) -> prompt_sets.PromptSet:
  """The config's prompts: config.prompts.file (one prompt per line, all
  trained, none held out) if set, else the named set: a shapes-world set or a
  real one (DF27, Pig64, animals) at config.prompts.split."""
  if config.prompts.get("file"):
    path = pathlib.Path(config.prompts.file).expanduser()
    prompts = real_prompts.read_prompt_file(path)
    if not prompts:
      raise ValueError(f"--config.prompts.file={config.prompts.file!r} holds no prompts; "
                       "write one prompt per line")
    return prompt_sets.PromptSet(name=str(path), train=prompts, heldout=[])
  if config.prompts.set in prompt_sets.PROMPT_SETS:
    return prompt_sets.load_prompt_set(config.prompts.set, config.prompts.split)
  if config.prompts.set in real_prompts.PROMPT_SETS:
    return real_prompts.load_prompt_set(config.prompts.set, config.prompts.split)
  raise ValueError(f"unknown prompt set {config.prompts.set!r}; available: "
                   f"{list(prompt_sets.PROMPT_SETS) + list(real_prompts.PROMPT_SETS)}, "
                   "or pass --config.prompts.file=<one prompt per line>")


def num_mixed(config: ml_collections.ConfigDict) -> int:
  """k: prompts per batch row (1 without interpolation training)."""
  kind = config.interpolation.kind
  if kind not in INTERPOLATION_KINDS:
    raise ValueError(f"unknown interpolation kind {kind!r}; expected one of "
                     f"{INTERPOLATION_KINDS}")
  if kind != "none" and not mapping_lib.mapping_class(config.mapping.kind).generalizes:
    raise ValueError("interpolation training needs a mapping network that reads the "
                     f"embedding; mapping.kind {config.mapping.kind!r} ignores it")
  return 1 if kind == "none" else config.interpolation.num_prompts


def scale_column(config: ml_collections.ConfigDict, scale: np.ndarray) -> np.ndarray:
  """The CFG weight as the mapping's extra input, mapped to [0, 1] over its range."""
  low, high = config.guidance.scale_range
  return ((scale - low) / max(high - low, 1e-6)).astype(np.float32)


def mapping_inputs(config: ml_collections.ConfigDict, embedding: np.ndarray,
                   scale: Optional[np.ndarray] = None) -> np.ndarray:
  """embedding [N, D] (+ CFG weight [N] when amortized) -> mapping input [N, D(+1)]."""
  if not config.guidance.amortize_scale:
    return embedding.astype(np.float32)
  if scale is None:
    scale = np.full((len(embedding),), config.guidance.scale, np.float32)
  return np.concatenate([embedding, scale_column(config, scale)[:, None]], axis=1)


def sample_batch(config: ml_collections.ConfigDict, tables: PromptTables, step: int) -> dict:
  """The batch of `step`: B rows of k prompts each, drawn from (seed, step) alone.

  Returns numpy arrays:
    prompt_index [B] int32: each row's first prompt (per-prompt grids use it);
    mapping_input [B, D(+1)]: alpha-mixed embedding (+ the CFG weight column);
    alpha [B, k]: mixing weights, one-hot for rows without interpolation;
    conditioning [B, k, NUM_VIEWS, L, D] float32;
    guidance_scale [B] float32.
  """
  rows, k = config.batch.prompts_per_step, num_mixed(config)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), _DATA_STREAM),
                           step)
  index_key, mixed_key, alpha_key, scale_key = jax.random.split(key, 4)
  if config.batch.without_replacement:  # every prompt at most once per step
    if rows > len(tables.prompts) or k > 1:
      raise ValueError(f"batch.without_replacement draws batch.prompts_per_step={rows} "
                       f"distinct prompts of {len(tables.prompts)}, one per row: needs "
                       "at most that many rows and interpolation.kind='none'")
    index = np.asarray(jax.random.permutation(index_key, len(tables.prompts)))[:rows, None]
  else:
    index = np.asarray(jax.random.randint(index_key, (rows, k), 0, len(tables.prompts)))
  alpha = np.zeros((rows, k), np.float32)
  alpha[:, 0] = 1.0
  if k > 1:
    mixed = np.asarray(jax.random.uniform(mixed_key, (rows,))) < config.interpolation.fraction
    weights = np.asarray(interpolation.sample_weights(alpha_key, k, config.interpolation.kappa,
                                                      rows))
    alpha = np.where(mixed[:, None], weights, alpha)
  if config.guidance.amortize_scale:
    scale = np.asarray(interpolation.sample_guidance_weight(scale_key, rows,
                                                            *config.guidance.scale_range))
  else:
    scale = np.full((rows,), config.guidance.scale, np.float32)
  embedding = np.einsum("bk,bkd->bd", alpha, tables.embedding[index])
  return {"prompt_index": index[:, 0].astype(np.int32),
          "mapping_input": mapping_inputs(config, embedding, scale),
          "alpha": alpha,
          "conditioning": tables.conditioning[index].astype(np.float32),
          "guidance_scale": scale}
