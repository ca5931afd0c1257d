"""One setup path from a config to a runnable model.

    config -> guidance (registry of config.guidance.kind)
           -> prompt set and its text tables (prompt_data)
           -> ATT3DModel -> train state -> device mesh -> placed state, jitted step

The train loop, generation (without the mesh and step: `for_training=False`),
the tests and the benchmarks all call `build`, so they set up the same thing.
"""

import importlib
from typing import Any, Callable, NamedTuple, Optional

from jax.sharding import Mesh
import ml_collections
import optax

from att3d_jax import prompt_data
from att3d_jax import sharding
from att3d_jax import train_step as train_step_lib
from att3d_jax.amortize import model as model_lib
from att3d_jax.guidance import base as guidance_base
from att3d_jax.shapes import prompt_sets

# Modules whose import registers guidance kinds (`guidance.base.register`).
GUIDANCE_MODULES = ("att3d_jax.shapes.diffusion", "att3d_jax.guidance.real")
# Guidance kinds whose text encodings live in a disk cache (guidance/text.py): their
# prompts are encoded at start-up in one call (prompt_data.precompute).
DISK_CACHED_TEXT_KINDS = ("if", "sd")


def load_guidance(config: ml_collections.ConfigDict) -> guidance_base.Guidance:
  """The frozen guidance model of config.guidance.kind."""
  for name in GUIDANCE_MODULES:
    importlib.import_module(name)
  return guidance_base.load(config)


class Built(NamedTuple):
  guidance: guidance_base.Guidance
  prompt_set: prompt_sets.PromptSet
  train_tables: Optional[prompt_data.PromptTables]  # None unless for_training
  heldout_tables: Optional[prompt_data.PromptTables]  # None without held-out prompts
  model: model_lib.ATT3DModel
  state: dict  # train_step.STATE_KEYS; placed on `mesh` when for_training
  optimizer: optax.GradientTransformation
  mesh: Optional[Mesh]  # None unless for_training
  train_step: Optional[Callable[[dict, dict, Any], tuple[dict, dict]]]  # jitted


def text_tables(config: ml_collections.ConfigDict, guidance: guidance_base.Guidance,
                prompt_set: prompt_sets.PromptSet
                ) -> tuple[prompt_data.PromptTables, Optional[prompt_data.PromptTables]]:
  """The training and held-out (None without) prompts' text tables: rows are
  encoded on first use into one cache of config.prompts.text_cache_mb."""
  cache = prompt_data.text_cache(config)
  if config.guidance.kind in DISK_CACHED_TEXT_KINDS:
    for prompts in (prompt_set.train, prompt_set.heldout):
      if prompts:
        prompt_data.precompute(guidance, prompts)
  train_tables = prompt_data.lazy_prompt_tables(guidance, prompt_set.train, cache)
  heldout_tables = (prompt_data.lazy_prompt_tables(guidance, prompt_set.heldout, cache)
                    if prompt_set.heldout else None)
  return train_tables, heldout_tables


def build(config: ml_collections.ConfigDict, *,
          guidance: Optional[guidance_base.Guidance] = None,
          for_training: bool = True) -> Built:
  """Everything a run of `config` needs.

  Args:
    config: the experiment config.
    guidance: use this guidance model instead of loading config.guidance's.
    for_training: also the text tables, the mesh, the placed state and the
      jitted step; without, the state is a fresh template to restore into.
  """
  prompt_set = prompt_data.load_prompts(config)
  guidance = guidance or load_guidance(config)
  train_tables = heldout_tables = None
  if for_training:
    train_tables, heldout_tables = text_tables(config, guidance, prompt_set)
    embedding = train_tables.embedding[prompt_data.normalization_rows(len(prompt_set.train))]
  else:  # the text standardization is restored with the params
    embedding = guidance.embed(prompt_set.train[:1])
  model = model_lib.ATT3DModel.from_config(config, num_train_prompts=len(prompt_set.train),
                                           embedding_dim=embedding.shape[1])
  state, optimizer = train_step_lib.init_state(config, model, embedding)
  if not for_training:
    return Built(guidance, prompt_set, None, None, model, state, optimizer, None, None)
  prompt_data.num_mixed(config)  # a bad interpolation setting fails here, not at step 0
  mesh = sharding.make_mesh(config)
  state = sharding.place_state(state, mesh)
  step = sharding.jit_train_step(
      train_step_lib.make_train_step(config, model, guidance, optimizer), mesh, state)
  return Built(guidance, prompt_set, train_tables, heldout_tables, model, state, optimizer,
               mesh, step)
