"""Tests of the mapping networks (amortize/mapping.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from att3d_jax.amortize import mapping
from att3d_jax.amortize import triplane  # noqa: F401  registers "triplane" for mapping.kinds()
from att3d_jax.nerf import hashgrid

SPEC = hashgrid.HashGridSpec(num_levels=2, log2_table_size=6, features_per_level=2,
                             base_resolution=2, max_resolution=4)
EMBEDDING_DIM = 24
BATCH = 3
NUM_PROMPTS = 5
# config.mapping fields of a small "triplane" generator: 2 -> 8 texels per side.
TRIPLANE_FIELDS = dict(triplane_resolution=8, triplane_low_resolution=2, triplane_channels=4,
                       triplane_features=3, triplane_hidden_width=16, triplane_combine="concat",
                       triplane_spectral_norm=True)


def _inputs(seed=0):
  text_embedding = jax.random.normal(jax.random.key(seed), (BATCH, EMBEDDING_DIM))
  prompt_index = jnp.array([4, 0, 2], jnp.int32)
  return text_embedding, prompt_index


def _init(kind, seed=0):
  mapping_net = mapping.make_mapping(kind, SPEC, num_prompts=NUM_PROMPTS,
                                    **(TRIPLANE_FIELDS if kind == "triplane" else {}))
  text_embedding, prompt_index = _inputs()
  return mapping_net, mapping_net.init(jax.random.key(seed), text_embedding,
                                       prompt_index)


def _top_singular_value(matrix):
  return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[0]


def _adam_steps(mapping_net, variables, num_steps, learning_rate):
  """Adam on a random regression loss, updating the spectral stats each step
  as the train step does; returns the final variables."""
  text_embedding, prompt_index = _inputs()
  target = jax.random.normal(jax.random.key(7), (BATCH,) + SPEC.table_shape)
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(params):
      out, updates = mapping_net.apply(
          {"params": params, mapping.SPECTRAL_STATS: stats}, text_embedding,
          prompt_index, update_stats=True, mutable=[mapping.SPECTRAL_STATS])
      return jnp.mean((out.tables - target)**2), updates[mapping.SPECTRAL_STATS]
    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state

  params, stats = variables["params"], variables[mapping.SPECTRAL_STATS]
  opt_state = optimizer.init(params)
  for _ in range(num_steps):
    new_params, stats, opt_state = step(params, stats, opt_state)
    assert not np.allclose(new_params["tables"]["Dense_0"]["kernel"],
                           params["tables"]["Dense_0"]["kernel"])
    params = new_params
  return {"params": params, mapping.SPECTRAL_STATS: stats}


def test_hypernet_kernels_keep_unit_spectral_norm_under_adam():
  mapping_net, variables = _init("hypernet")
  variables = _adam_steps(mapping_net, variables, num_steps=10, learning_rate=1e-2)
  # The next train step's forward normalizes the current kernels by the sigma it
  # stores; that normalized kernel must have top singular value 1.
  text_embedding, prompt_index = _inputs()
  _, updates = mapping_net.apply(variables, text_embedding, prompt_index,
                                 update_stats=True, mutable=[mapping.SPECTRAL_STATS])
  for layer in ("hidden", "tables"):
    kernel = variables["params"][layer]["Dense_0"]["kernel"]
    sigma = updates[mapping.SPECTRAL_STATS][layer]["SpectralNorm_0"]["Dense_0/kernel/sigma"]
    raw_top = _top_singular_value(kernel)
    assert abs(raw_top - 1.0) > 0.1  # The normalization is doing something.
    np.testing.assert_allclose(_top_singular_value(kernel / sigma), 1.0, atol=1e-2)


def test_spectral_dense_eval_kernel_has_unit_spectral_norm():
  layer = mapping.SpectralDense(40, use_bias=True)
  inputs = jax.random.normal(jax.random.key(0), (6, 16))
  variables = layer.init(jax.random.key(1), inputs, update_stats=False)
  variables = {"params": jax.tree.map(lambda p: 3.0 * p, variables["params"]),
               mapping.SPECTRAL_STATS: variables[mapping.SPECTRAL_STATS]}
  for _ in range(5):
    _, updates = layer.apply(variables, inputs, update_stats=True,
                             mutable=[mapping.SPECTRAL_STATS])
    variables = {**variables, **updates}
  # The layer is affine: rows of apply(I) - apply(0) are the effective kernel.
  identity = jnp.eye(16)
  effective_kernel = (layer.apply(variables, identity, update_stats=False) -
                      layer.apply(variables, jnp.zeros((1, 16)), update_stats=False))
  np.testing.assert_allclose(_top_singular_value(effective_kernel), 1.0, atol=1e-2)
  bias = variables["params"]["Dense_0"]["bias"]
  np.testing.assert_allclose(
      layer.apply(variables, jnp.zeros((1, 16)), update_stats=False)[0], bias)


def test_power_iteration_state_changes_only_with_update_stats():
  mapping_net, variables = _init("hypernet")
  # Move the kernels so that the stored u is no longer a fixed point.
  variables = {**variables,
               "params": jax.tree.map(lambda p: p + 0.05 * jnp.sign(p),
                                      variables["params"])}
  text_embedding, prompt_index = _inputs()
  stats = variables[mapping.SPECTRAL_STATS]
  for update_stats in (False, True):
    _, updates = mapping_net.apply(variables, text_embedding, prompt_index,
                                   update_stats=update_stats,
                                   mutable=[mapping.SPECTRAL_STATS])
    unchanged = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), stats,
                             updates[mapping.SPECTRAL_STATS])
    assert all(jax.tree.leaves(unchanged)) == (not update_stats)


@pytest.mark.parametrize("kind,conditioning_dim", [("hypernet", None),
                                                   ("concat", EMBEDDING_DIM),
                                                   ("per_prompt", None),
                                                   ("triplane", None)])
def test_output_shapes(kind, conditioning_dim):
  mapping_net, variables = _init(kind)
  out = mapping_net.apply(variables, *_inputs())
  fields_shape = (3, 8, 8, 3) if kind == "triplane" else SPEC.table_shape
  assert out.tables.shape == (BATCH,) + fields_shape
  assert out.tables.dtype == jnp.float32
  # encode reads one row's fields: [N, 3] unit points -> [N, feature_dim].
  features = mapping_net.encode(out.tables[1], jnp.full((5, 3), 0.3))
  assert features.shape == (5, mapping_net.feature_dim)
  assert mapping_net.feature_dim == (9 if kind == "triplane" else SPEC.num_output_features)
  if conditioning_dim is None:
    assert out.conditioning is None
  else:
    assert out.conditioning.shape == (BATCH, conditioning_dim)


def test_hypernet_depends_on_embedding_and_is_deterministic():
  mapping_net, variables = _init("hypernet")
  text_embedding, prompt_index = _inputs()
  first = mapping_net.apply(variables, text_embedding, prompt_index).tables
  again = mapping_net.apply(variables, text_embedding, prompt_index).tables
  np.testing.assert_array_equal(first, again)
  # Rows with different embeddings get different grids ...
  assert np.abs(first[0] - first[1]).max() > 1e-3 * np.abs(first).max()
  # ... and a row's grid depends on its own embedding only.
  swapped = mapping_net.apply(variables, text_embedding[::-1], prompt_index).tables
  np.testing.assert_allclose(swapped[::-1], first, rtol=1e-5, atol=1e-7)


def test_hypernet_init_is_uniform_with_zero_bias():
  _, variables = _init("hypernet")
  params = variables["params"]
  np.testing.assert_array_equal(params["hidden"]["Dense_0"]["bias"], 0.0)
  assert "bias" not in params["tables"]["Dense_0"]
  for layer in ("hidden", "tables"):
    # flax stores the U(-0.1, 0.1) draw already divided by its sigma.
    kernel = np.asarray(params[layer]["Dense_0"]["kernel"])
    sigma = variables[mapping.SPECTRAL_STATS][layer]["SpectralNorm_0"][
        "Dense_0/kernel/sigma"]
    assert np.abs(kernel * sigma).max() <= mapping.HYPERNET_INIT_SCALE
    assert np.abs(kernel * sigma).max() > 0.9 * mapping.HYPERNET_INIT_SCALE
    np.testing.assert_allclose(_top_singular_value(kernel), 1.0, atol=1e-2)


def test_per_prompt_returns_the_indexed_grid():
  mapping_net, variables = _init("per_prompt")
  text_embedding, prompt_index = _inputs()
  all_tables = variables["params"]["tables"]
  assert all_tables.shape == (NUM_PROMPTS,) + SPEC.table_shape
  out = mapping_net.apply(variables, text_embedding, prompt_index)
  for row, index in enumerate(np.asarray(prompt_index)):
    np.testing.assert_array_equal(out.tables[row], all_tables[index])
  # Distinct prompts start from distinct grids.
  assert not np.allclose(all_tables[0], all_tables[1])


def test_concat_shares_one_grid_and_passes_the_embedding():
  mapping_net, variables = _init("concat")
  text_embedding, prompt_index = _inputs()
  out = mapping_net.apply(variables, text_embedding, prompt_index)
  for row in range(BATCH):
    np.testing.assert_array_equal(out.tables[row], variables["params"]["tables"])
  np.testing.assert_array_equal(out.conditioning, text_embedding)


@pytest.mark.parametrize("kind", mapping.kinds())
def test_jit_and_grad(kind):
  mapping_net, variables = _init(kind)
  text_embedding, prompt_index = _inputs()

  @jax.jit
  def loss_fn(params):
    out = mapping_net.apply({**variables, "params": params}, text_embedding,
                            prompt_index)
    return jnp.sum(out.tables**2)

  grads = jax.grad(loss_fn)(variables["params"])
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(leaf).all() for leaf in leaves)
  assert any(np.abs(leaf).max() > 0 for leaf in leaves)
  if kind == "per_prompt":
    # Only the selected prompts' grids receive gradient.
    row_has_grad = np.abs(grads["tables"]).reshape(NUM_PROMPTS, -1).max(axis=1) > 0
    np.testing.assert_array_equal(row_has_grad, np.isin(np.arange(NUM_PROMPTS),
                                                         np.asarray(prompt_index)))


def test_make_mapping_rejects_bad_arguments():
  with pytest.raises(ValueError, match="hypernet.*concat.*per_prompt"):
    mapping.make_mapping("mlp", SPEC)
  with pytest.raises(ValueError, match="num_prompts"):
    mapping.make_mapping("per_prompt", SPEC)
