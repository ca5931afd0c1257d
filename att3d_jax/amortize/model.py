"""The ATT3D model: text embedding -> mapping network -> NeRF -> renders.

    c [D] (+ the CFG weight, when amortized over it)
      -> mapping network (hypernet | concat | per_prompt, see mapping.py;
         triplane, see triplane.py)
      -> per-prompt fields: hash-grid tables [L, T, F] (+ an MLP conditioning
         vector for concat) or a triplane [3, R, R, F], encoded at points by
         the mapping's `encode`
      -> shared field MLP -> density, albedo -> volume rendering

`ATT3DModel` holds the static structure (modules, grid spec, the config's
field and render sections); parameters live in a plain dict
`{"mapping": ..., "mlp": ..., "text_norm": ...}` plus the mapping's
spectral-norm state, so the train step, evaluation and generation all call the
same pure functions.

Text embeddings are standardized before the mapping network: centered on the
training prompts' mean and scaled so that a coordinate's spread is about 1
(`text_norm`, fixed at init and never trained). Sentence embeddings of
prompts that differ in one word are nearly parallel (cosine ~0.8-0.9 for
MiniLM); both spectral-normalized layers have gain <= 1, so without this the
prompt-dependent part of the grid is a small perturbation of a shared one and
training collapses toward one object for all prompts.

The CFG weight (guidance-weight amortization) enters as one more input column,
[0, 1] over its training range. Left at that size, one coordinate next to D
standardized ones, the spectral-normalized hypernet cannot amplify it (column
norms <= 1) and learns to ignore it (measured: renders and GT metrics identical
to 3 decimals across weights 2-10). So it is centered, scaled to unit variance
and multiplied by `extra_input_gain` = guidance.scale_input_share * sqrt(D), a
fixed share of the text block's norm (sqrt(D) after standardization).
"""

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from att3d_jax.amortize import mapping as mapping_lib
from att3d_jax.amortize import triplane  # noqa: F401  registers mapping kind "triplane"
from att3d_jax.nerf import background as background_lib
from att3d_jax.nerf import field as field_lib
from att3d_jax.nerf import hashgrid
from att3d_jax.nerf import mesh as mesh_lib
from att3d_jax.nerf import render as render_lib
from att3d_jax.nerf.cameras import Rays

Params = dict  # {"mapping": ..., "mlp": field MLP params, "text_norm": {"mean", "scale"}}
Stats = dict  # the mapping's SPECTRAL_STATS collection ({} without spectral norm)


def mapping_input_dim(config: ml_collections.ConfigDict, embedding_dim: int) -> int:
  """Width of the mapping network's input: the text embedding, plus one column
  for the CFG weight when the config amortizes over it."""
  return embedding_dim + (1 if config.guidance.amortize_scale else 0)


def text_normalization(embeddings: jax.Array) -> dict:
  """{"mean": [D], "scale": []} standardizing embeddings [P, D]: the mean
  prompt maps to 0 and the root-mean-square per-coordinate deviation to 1."""
  embeddings = jnp.asarray(embeddings, jnp.float32)
  mean = jnp.mean(embeddings, axis=0)
  deviation = jnp.sqrt(jnp.mean(jnp.square(embeddings - mean)))
  # One prompt has no spread: keep its (zero) input finite.
  return {"mean": mean, "scale": 1.0 / jnp.maximum(deviation, 1e-3)}


# Exported meshes' shell, in scene radii: four bins of the 48 evenly spaced
# samples per diameter the level was tuned with (independent of how a config
# places its samples).
MESH_SHELL_THICKNESS = 4.0 * 2.0 / 48


@dataclasses.dataclass(frozen=True)
class ATT3DModel:
  """Static structure of an amortized text-to-3D model; hashable (jit-static)."""

  mapping: nn.Module
  spec: hashgrid.HashGridSpec
  mlp: field_lib.FieldMLP
  input_dim: int  # the mapping network's input width
  conditioning_dim: int  # field-MLP conditioning width (mapping.conditions_field), else 0
  scene_radius: float
  density_activation: str
  bias_scale: float
  bias_radius: float
  num_samples: int
  num_importance: int
  num_proposal: int  # > 0: empty-space skipping (render.proposal_edges)
  extra_input_gain: float  # multiplies the standardized extra columns (the CFG weight)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, num_train_prompts: int,
                  embedding_dim: int) -> "ATT3DModel":
    spec = hashgrid.HashGridSpec(**config.hashgrid.to_dict())
    input_dim = mapping_input_dim(config, embedding_dim)
    mapping = mapping_lib.mapping_class(config.mapping.kind).from_config(
        spec, num_train_prompts, config.mapping)
    return cls(mapping=mapping, spec=spec,
               mlp=field_lib.FieldMLP(config.field.hidden_width,
                                      config.field.num_hidden_layers),
               input_dim=input_dim,
               conditioning_dim=input_dim if mapping.conditions_field else 0,
               scene_radius=config.render.scene_radius,
               density_activation=config.field.density_activation,
               bias_scale=config.field.bias_scale, bias_radius=config.field.bias_radius,
               num_samples=config.render.num_samples,
               num_importance=config.render.num_importance,
               num_proposal=config.render.get("num_proposal", 0),
               extra_input_gain=config.guidance.get("scale_input_share", 0.5)
               * math.sqrt(embedding_dim))

  def init(self, key: jax.Array, train_embeddings: jax.Array) -> tuple[Params, Stats]:
    """Fresh (params, spectral-norm state); train_embeddings [P, D] (the
    training prompts' text embeddings) fix the input standardization."""
    mapping_key, mlp_key = jax.random.split(key)
    variables = self.mapping.init(mapping_key, jnp.zeros((1, self.input_dim), jnp.float32),
                                  jnp.zeros((1,), jnp.int32))
    params = {"mapping": variables["params"],
              "mlp": field_lib.init_mlp_params(mlp_key, self.mlp, None,
                                               conditioning_dim=self.conditioning_dim,
                                               feature_dim=self.mapping.feature_dim),
              "text_norm": text_normalization(train_embeddings)}
    return params, dict(variables.get(mapping_lib.SPECTRAL_STATS, {}))

  def standardize_inputs(self, params: Params, inputs: jax.Array) -> jax.Array:
    """Raw mapping inputs [B, input_dim] -> what the mapping network reads: the
    text standardized by `text_norm`, extra columns ([0, 1], uniform in training)
    centered, at unit variance, times `extra_input_gain`."""
    norm = params["text_norm"]
    dim = norm["mean"].shape[0]
    extra = (inputs[:, dim:] - 0.5) * (math.sqrt(12.0) * self.extra_input_gain)
    return jnp.concatenate([(inputs[:, :dim] - norm["mean"]) * norm["scale"], extra], axis=1)

  def apply_mapping(self, params: Params, stats: Stats, inputs: jax.Array,
                    prompt_index: jax.Array, *, update_stats: bool = False
                    ) -> tuple[mapping_lib.MappingOutput, Stats]:
    """inputs [B, input_dim] (raw text embedding, then extra columns such as
    the CFG weight), prompt_index [B] -> (tables: per-prompt fields, a pytree
    with leading axis B (hash grids [B, L, T, F], triplanes [B, 3, R, R, F]),
    and conditioning [B, C] or None, the updated spectral-norm state)."""
    inputs = self.standardize_inputs(params, inputs)
    variables = {"params": params["mapping"]}
    if stats:
      variables[mapping_lib.SPECTRAL_STATS] = stats
    if update_stats and stats:
      out, updated = self.mapping.apply(variables, inputs, prompt_index, update_stats=True,
                                        mutable=[mapping_lib.SPECTRAL_STATS])
      return out, dict(updated[mapping_lib.SPECTRAL_STATS])
    return self.mapping.apply(variables, inputs, prompt_index, update_stats=False), stats

  def field_fn(self, mlp_params, tables, conditioning: Optional[jax.Array],
               compute_normals: bool = False) -> render_lib.FieldFn:
    """points [N, 3] -> dict(density, albedo[, normal]) of one prompt's NeRF:
    tables = one prompt's fields (a row of `apply_mapping`'s tables, e.g. a
    hash grid [L, T, F]), encoded by the mapping's `encode`; conditioning [C]
    or None."""
    return functools.partial(
        field_lib.field_outputs, mlp_params, tables, encode=self.mapping.encode, mlp=self.mlp,
        scene_radius=self.scene_radius, density_activation=self.density_activation,
        bias_scale=self.bias_scale, bias_radius=self.bias_radius,
        conditioning=conditioning, compute_normals=compute_normals)

  def surface_density(self) -> float:
    """Density level of exported meshes: where a shell of thickness
    `MESH_SHELL_THICKNESS * scene_radius` is half opaque. SDS-trained fields
    are soft (peak densities ~10-15), so the level where a single render sample
    is half opaque lies above most objects' peak and finds no surface."""
    return mesh_lib.density_for_alpha(0.5, MESH_SHELL_THICKNESS * self.scene_radius)

  def extract_mesh(self, mlp_params, tables, conditioning: Optional[jax.Array],
                   resolution: int) -> mesh_lib.Mesh:
    """The field's surface at `surface_density`, clipped to the rendered ball,
    largest component only (raises ValueError for an empty field)."""
    # Params are arguments, not closure constants: one compile serves every prompt.
    return mesh_lib.extract_mesh(
        lambda p: _field_output(self, "density", mlp_params, tables, conditioning, p),
        lambda p: _field_output(self, "albedo", mlp_params, tables, conditioning, p),
        resolution=resolution, scene_radius=self.scene_radius,
        threshold=self.surface_density(), clip_to_sphere=True, keep_largest_component=True,
        jit=False)  # _field_output is jitted once per model and chunk shape

  def render_fn(self, mlp_params, tables, conditioning: Optional[jax.Array],
                key: Optional[jax.Array], background_color: Sequence[float],
                compute_normals: bool = False) -> Callable[[Rays], dict]:
    """Rays [N, 3] -> `render.render_rays` outputs (albedo over a solid
    background; with compute_normals also "normal"); key=None renders
    deterministically (evaluation)."""
    background_fn = functools.partial(background_lib.solid_background, background_color)
    return lambda rays: render_lib.render_rays(
        self.field_fn(mlp_params, tables, conditioning, compute_normals), rays, key,
        num_samples=self.num_samples, scene_radius=self.scene_radius,
        background_fn=background_fn, num_importance=self.num_importance,
        num_proposal=self.num_proposal)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _field_output(model: ATT3DModel, name: str, mlp_params, tables,
                  conditioning: Optional[jax.Array], points: jax.Array) -> jax.Array:
  """One output of the field at points [N, 3]; jitted once per model and shapes."""
  return model.field_fn(mlp_params, tables, conditioning)(points)[name]
