"""Mapping networks: text embedding c -> hash-grid tables gamma (ATT3D Sec. 3).

All variants share one call signature, so that the train step does not
depend on which one a config picks:

  mapping.apply(variables, text_embedding [B, D], prompt_index [B],
                update_stats=...) -> MappingOutput(tables, conditioning [B, C] or None)

`tables` are the per-prompt field parameters: any pytree whose leaves have a
leading batch axis B (here hash-grid tables [B, L, T, F]; triplane.py's
generator emits triplanes [B, 3, R, R, F]). Callers treat them as opaque: they
slice one prompt (`jax.tree.map(lambda x: x[i], tables)` or `vmap`) and hand
it back to the mapping's `encode(fields, unit_points [N, 3]) -> [N, feature_dim]`,
the point features the shared field MLP reads.

- "hypernet" (ATT3D's default): gamma = reshape(SN(Linear_no_bias(
  SiLU(SN(Linear_with_bias(c)))))); SN = spectral normalization, without which
  ATT3D reports that training diverges.
- "concat" (the paper's weaker baseline): one shared grid, and c is appended
  to the field MLP's input as its conditioning vector (initialize the MLP with
  `field.init_mlp_params(..., conditioning_dim=D)`).
- "per_prompt" (the per-prompt optimization baseline): one free grid per
  training prompt, selected by prompt_index; c is ignored.
- "triplane" (triplane.py, registered when amortize/model.py imports it):
  c -> MLP -> low-resolution planes -> shared conv upsampling -> a triplane
  per prompt, sampled bilinearly at each point.

Each variant describes itself, so that the model, the train step and
generation never compare kind strings: `encode` and `feature_dim` (how points
are encoded from one prompt's fields, and the width of the result), and the
class attributes

  conditions_field: the field MLP takes the mapping input as conditioning
      (its conditioning width is the mapping input width);
  per_prompt_param: name of the parameter whose rows are per-prompt grids
      (only the rows rendered in a step may move), or None;
  generalizes: whether the text reaches the output, i.e. the network can
      generate prompts it was not trained on (and mix embeddings).

A variant registers its kind with `@register("kind")` and builds itself with
`from_config(spec, num_prompts, mapping_config)`.

Extra scalars the mapping should see, such as a sampled guidance weight, are
appended by the caller as extra columns of `text_embedding`.

Spectral normalization estimates each kernel's top singular value by power
iteration (Miyato et al. 2018). The iteration vector u persists between steps
in the "spectral_stats" collection, which the train state carries next to the
params: a train step applies with `update_stats=True,
mutable=[SPECTRAL_STATS]` and stores the returned collection; evaluation
applies with `update_stats=False` and reuses the stored u.
"""

import types
from typing import Any, NamedTuple, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from att3d_jax.nerf import hashgrid

SPECTRAL_STATS = "spectral_stats"
_MAPPINGS: dict[str, type] = {}


def register(kind: str):
  """Class decorator: the mapping network of config.mapping.kind `kind`."""

  def decorate(cls):
    _MAPPINGS[kind] = cls
    return cls

  return decorate


def kinds() -> tuple[str, ...]:
  return tuple(_MAPPINGS)


def mapping_class(kind: str) -> type:
  """The registered mapping network class of `kind`."""
  if kind not in _MAPPINGS:
    raise ValueError(f"unknown mapping kind {kind!r}; expected one of {tuple(_MAPPINGS)}.")
  return _MAPPINGS[kind]

# ATT3D reimpl. (threestudio att3d-test): hypernet weights U(-0.1, 0.1), zero bias.
HYPERNET_INIT_SCALE = 0.1


class MappingOutput(NamedTuple):
  # Per-prompt field parameters: a pytree of arrays with leading axis B (the
  # hash-grid kinds' tables [B, L, T, F]), read back through the mapping's `encode`.
  tables: Any
  conditioning: Optional[jax.Array]  # [B, C] field-MLP conditioning, or None


class HashGridEncoding:
  """Mixin of the mappings whose per-prompt fields are hash-grid tables
  [L, T, F] of `self.spec`: points are encoded by `hashgrid.encode`."""

  @property
  def feature_dim(self) -> int:
    """Width of `encode`'s point features: L * F."""
    return self.spec.num_output_features

  def encode(self, tables: jax.Array, unit_points: jax.Array) -> jax.Array:
    """One prompt's tables [L, T, F], unit_points [N, 3] in [0, 1]^3 -> [N, L * F]."""
    return hashgrid.encode(unit_points, tables, self.spec)


def _uniform_init(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


class SpectralDense(nn.Module):
  """Dense layer whose kernel is divided by its top singular value sigma.

  sigma is estimated by `num_power_iterations` steps of power iteration from
  the u vector stored in the SPECTRAL_STATS collection (flax's
  `nn.SpectralNorm`); the bias is not normalized. With `update_stats=True`
  the refined u (and sigma) are written back, which needs
  `mutable=[SPECTRAL_STATS]`; otherwise the stored u is reused unchanged.

  `init` runs `num_init_power_iterations` steps and always stores u: from a
  random u one step underestimates sigma by up to ~25% for random kernels
  (measured on U(-0.1, 0.1) kernels of 16x32 to 32x65536), 30 steps by < 1%.
  Training then refines the stored u by `num_power_iterations` steps per
  update. One step (Miyato et al.'s choice) lags behind Adam: a few Adam steps
  on a random loss (lr 1e-3 to 1e-1, 32x256 kernel) left the normalized kernel's
  top singular value at up to 1.06-1.7; 10 steps kept it within 1.02, mostly
  within 1.005 (see tests/test_mapping.py). Power iteration never
  underestimates the normalized norm: it is >= 1 whenever sigma lags.

  x: [..., D_in] -> [..., features].
  """

  features: int
  use_bias: bool = True
  num_power_iterations: int = 1
  eps: float = 1e-12
  num_init_power_iterations: int = 30
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array, *, update_stats: bool) -> jax.Array:
    dense = nn.Dense(self.features, use_bias=self.use_bias,
                     kernel_init=self.kernel_init, bias_init=self.bias_init,
                     dtype=jnp.float32, param_dtype=jnp.float32)
    initializing = self.is_initializing()
    num_steps = (self.num_init_power_iterations if initializing
                 else self.num_power_iterations)
    return nn.SpectralNorm(dense, n_steps=num_steps, epsilon=self.eps,
                           error_on_non_matrix=True,
                           collection_name=SPECTRAL_STATS)(
                               x, update_stats=update_stats or initializing)


@register("hypernet")
class HyperNetwork(HashGridEncoding, nn.Module):
  """ATT3D's mapping network m(c) -> all grid tables of one prompt.

  Initialization follows the ATT3D reimpl.: kernels U(-0.1, 0.1), zero bias.
  Spectral normalization divides the kernel scale out, so the init fixes only
  the directions (and Adam's step relative to the weights). Note that flax's
  `nn.SpectralNorm` stores the *normalized* kernel at init, i.e. the
  U(-0.1, 0.1) draw divided by its top singular value (entries up to ~0.2
  for a 24x32 kernel, ~0.003 for 32x16M). Output scale: both
  kernels have spectral norm 1, so |gamma| <= |SiLU(W1 c + b)|, and with
  random directions each of the N = L*T*F table entries is about
  |SiLU(W1 c + b)| / sqrt(N) in magnitude: small, like Instant-NGP's
  U(-1e-4, 1e-4) table init for large grids.

  `num_power_iterations` defaults to 10, see `SpectralDense`; it costs 10
  matrix-vector products per kernel and step, about the cost of the forward
  pass of a batch of 10 prompts.
  """

  spec: hashgrid.HashGridSpec
  hidden_width: int = 32
  num_power_iterations: int = 10

  conditions_field = False
  per_prompt_param = None
  generalizes = True

  @classmethod
  def from_config(cls, spec, num_prompts, config) -> "HyperNetwork":
    del num_prompts
    return cls(spec, hidden_width=config.hidden_width,
               num_power_iterations=config.num_power_iterations)

  @nn.compact
  def __call__(self, text_embedding: jax.Array, prompt_index: jax.Array, *,
               update_stats: bool = False) -> MappingOutput:
    """text_embedding: [B, D]; prompt_index: [B] (unused)."""
    del prompt_index  # The hypernet generalizes from c alone.
    chex.assert_rank(text_embedding, 2)
    init = _uniform_init(HYPERNET_INIT_SCALE)
    hidden = SpectralDense(self.hidden_width, use_bias=True,
                           num_power_iterations=self.num_power_iterations,
                           kernel_init=init, name="hidden")(
                               text_embedding.astype(jnp.float32),
                               update_stats=update_stats)
    hidden = nn.silu(hidden)
    num_entries = self.spec.num_levels * self.spec.table_size * self.spec.features_per_level
    flat_tables = SpectralDense(num_entries, use_bias=False,
                                num_power_iterations=self.num_power_iterations,
                                kernel_init=init, name="tables")(
                                    hidden, update_stats=update_stats)
    tables = flat_tables.reshape((text_embedding.shape[0],) + self.spec.table_shape)
    return MappingOutput(tables, None)


@register("concat")
class ConcatMapping(HashGridEncoding, nn.Module):
  """One shared grid for all prompts; c conditions the field MLP instead."""

  spec: hashgrid.HashGridSpec

  conditions_field = True
  per_prompt_param = None
  generalizes = True

  @classmethod
  def from_config(cls, spec, num_prompts, config) -> "ConcatMapping":
    del num_prompts, config
    return cls(spec)

  @nn.compact
  def __call__(self, text_embedding: jax.Array, prompt_index: jax.Array, *,
               update_stats: bool = False) -> MappingOutput:
    """text_embedding: [B, D]; prompt_index: [B] (unused)."""
    del prompt_index, update_stats  # No per-prompt state, no spectral norm.
    chex.assert_rank(text_embedding, 2)
    tables = self.param("tables", lambda key: hashgrid.init_tables(key, self.spec))
    batch = text_embedding.shape[0]
    return MappingOutput(jnp.broadcast_to(tables, (batch,) + tables.shape),
                         text_embedding.astype(jnp.float32))


@register("per_prompt")
class PerPromptTables(HashGridEncoding, nn.Module):
  """A free grid per prompt (param [num_prompts, L, T, F]), each initialized
  like `hashgrid.init_tables`; row prompt_index[b] is batch row b's grid."""

  spec: hashgrid.HashGridSpec
  num_prompts: int

  conditions_field = False
  per_prompt_param = "tables"
  generalizes = False

  @classmethod
  def from_config(cls, spec, num_prompts, config) -> "PerPromptTables":
    del config
    if num_prompts is None or num_prompts < 1:
      raise ValueError(f"mapping kind 'per_prompt' needs num_prompts >= 1 (one grid "
                       f"per training prompt), got num_prompts={num_prompts}.")
    return cls(spec, num_prompts)

  @nn.compact
  def __call__(self, text_embedding: jax.Array, prompt_index: jax.Array, *,
               update_stats: bool = False) -> MappingOutput:
    """text_embedding: [B, D] (unused); prompt_index: [B] int in [0, num_prompts)."""
    del text_embedding, update_stats  # Per-prompt grids ignore the text.
    chex.assert_rank(prompt_index, 1)
    all_tables = self.param(
        "tables", lambda key: jax.vmap(lambda k: hashgrid.init_tables(k, self.spec))(
            jax.random.split(key, self.num_prompts)))
    return MappingOutput(all_tables[prompt_index], None)


def make_mapping(kind: str, spec: hashgrid.HashGridSpec, *,
                 num_prompts: Optional[int] = None, hidden_width: int = 32,
                 num_power_iterations: int = 10, **fields) -> nn.Module:
  """The mapping network `kind` (a registered kind) for grids of `spec`.

  Args:
    kind: "hypernet", "concat", "per_prompt" or another registered kind.
    spec: the hash grid the mapping writes.
    num_prompts: number of training prompts; required by "per_prompt".
    hidden_width, num_power_iterations: of "hypernet".
    **fields: other config.mapping fields `kind` reads (e.g. "triplane"'s
      triplane_resolution, ...: see configs/shapes.py).

  Returns:
    A module called as `(text_embedding [B, D], prompt_index [B], *,
    update_stats) -> MappingOutput`.
  """
  config = types.SimpleNamespace(hidden_width=hidden_width,
                                 num_power_iterations=num_power_iterations, **fields)
  return mapping_class(kind).from_config(spec, num_prompts, config)
