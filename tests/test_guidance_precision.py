"""The guidance UNet in bfloat16 (config.guidance.dtype) and through fused attention
(config.guidance.attention), against the float32 XLA path, on tiny random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.guidance import UNet2DConditionModel
from att3d_jax.guidance import UNetConfig
from att3d_jax.guidance import attention as attention_lib
from att3d_jax.guidance import param_shapes
from att3d_jax.guidance import schedule
from att3d_jax.guidance import sds
from att3d_jax.guidance import unet_blocks
from tests import test_unet_parity

# IF stage I (added-KV attention, learned variance) and SD 2.x (transformer blocks with
# self- and cross-attention, linear projections) at test size.
STYLES = {'if': test_unet_parity.CONFIGS['if'], 'sd': test_unet_parity.CONFIGS['sd2']}


def _module(style: str, **kwargs) -> tuple[UNet2DConditionModel, dict]:
  module = UNet2DConditionModel(UNetConfig(**STYLES[style]), **kwargs)
  params = test_unet_parity.random_flax_params(param_shapes(module), seed=3)
  return module, params


def _inputs(style: str, seed: int = 0) -> dict:
  inputs = test_unet_parity.random_inputs(STYLES[style], seed=seed)
  return {k: jnp.asarray(v) for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------
# Fused attention: jax.nn.dot_product_attention (implementation "xla" on CPU) = our matmuls.


def _qkv(num_queries: int, num_keys: int, heads: int = 3, head_dim: int = 8, seed: int = 0):
  rng = np.random.default_rng(seed)
  shape = lambda length: (2, length, heads * head_dim)
  return [jnp.asarray(rng.standard_normal(shape(n)), jnp.float32)
          for n in (num_queries, num_keys, num_keys)]


@pytest.mark.parametrize('masked', [False, True])
def test_dot_product_attention_matches_the_xla_path(masked):
  query, key, value = _qkv(num_queries=6, num_keys=5)
  bias = attention_lib.mask_to_bias(jnp.asarray(test_unet_parity.MASK)) if masked else None
  expected = attention_lib.attend(query, key, value, 3, bias, 'xla')
  got = attention_lib.attend(query, key, value, 3, bias, 'dot_product')
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  if masked:  # the mask matters: the masked keys of row 0 are ignored
    unmasked = attention_lib.attend(query, key, value, 3, None, 'dot_product')
    assert np.abs(np.asarray(unmasked - got)[0]).max() > 1e-2


@pytest.mark.parametrize('masked', [False, True])
def test_fused_attention_pads_odd_lengths_exactly(masked):
  # cuDNN differentiates biased attention only over even lengths: the fused path pads odd
  # query/key lengths (IF's 64 * 64 + 77 added-KV keys) and must equal the unpadded XLA
  # attention in value and gradient.
  query, key, value = _qkv(num_queries=5, num_keys=7, seed=4)
  mask = np.ones((2, 7), np.float32)
  mask[0, 5:] = 0.0
  bias = attention_lib.mask_to_bias(jnp.asarray(mask)) if masked else None
  cotangent = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, 24)), jnp.float32)

  def loss(implementation, q, k, v):
    out = attention_lib.attend(q, k, v, 3, bias, implementation)
    assert out.shape == q.shape
    return jnp.sum(out * cotangent)

  expected = jax.grad(loss, argnums=(1, 2, 3))('xla', query, key, value)
  got = jax.grad(loss, argnums=(1, 2, 3))('dot_product', query, key, value)
  for g, e in zip(got, expected):
    assert np.abs(np.asarray(e)).max() > 1e-3
    np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
  np.testing.assert_allclose(loss('dot_product', query, key, value),
                             loss('xla', query, key, value), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize('kind', ['self', 'cross', 'added_kv'])
def test_attention_modules_match_across_implementations(kind):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 4, 4, 32)), jnp.float32)  # [B, H, W, C]
  context = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
  bias = attention_lib.mask_to_bias(jnp.asarray(test_unet_parity.MASK))

  def build(implementation):
    if kind == 'added_kv':
      module = attention_lib.AddedKVAttention(head_dim=8, norm_num_groups=8,
                                              cross_attention_norm='group_norm',
                                              implementation=implementation)
      args = (x, context, bias)
    else:
      module = attention_lib.Attention(num_heads=4, head_dim=8, implementation=implementation)
      tokens = x.reshape(2, 16, 32)
      args = (tokens, None) if kind == 'self' else (tokens, context, bias)
    return module, args

  module, args = build('xla')
  params = module.init(jax.random.key(0), *args)
  # Random biases too (flax zero-inits them), so every parameter path is compared.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
                        params)
  expected = module.apply(params, *args)
  fused, _ = build('dot_product')
  np.testing.assert_allclose(fused.apply(params, *args), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('style', sorted(STYLES))
def test_unet_with_fused_attention_matches_the_xla_path(style):
  module, params = _module(style)
  fused = UNet2DConditionModel(module.config, attention='dot_product')
  inputs = _inputs(style)
  expected = module.apply({'params': params}, **inputs)
  assert np.abs(np.asarray(expected)).mean() > 0.1
  np.testing.assert_allclose(fused.apply({'params': params}, **inputs), expected, rtol=0,
                             atol=1e-4)


def test_unknown_or_unavailable_attention_is_explained():
  query, key, value = _qkv(4, 4)
  with pytest.raises(ValueError, match='--config.guidance.attention=.flash.'):
    attention_lib.attend(query, key, value, 3, implementation='flash')
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match='cuDNN.*NVIDIA GPU'):
      attention_lib.attend(query, key, value, 3, implementation='cudnn')


# --------------------------------------------------------------------------------------------
# bfloat16: normalization in float32, SDS gradient close to float32's.


@pytest.mark.parametrize('norm', ['group', 'layer'])
def test_bfloat16_normalization_is_computed_in_float32(norm):
  """On inputs with a large mean (300 +- 1), normalizing in bfloat16 (8 mantissa bits: a
  spacing of 2 at 300) would lose the signal entirely; in float32 the bfloat16 output is
  the float32 result rounded once (relative error <= 2^-8)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(300 + rng.standard_normal((2, 4, 4, 16)), jnp.bfloat16)
  if norm == 'group':
    make = lambda dtype: unet_blocks.GroupNorm(4, dtype=dtype, param_dtype=dtype)
  else:
    make = lambda dtype: attention_lib.layer_norm('norm', dtype=dtype, param_dtype=dtype)
  params = make(jnp.float32).init(jax.random.key(0), x.astype(jnp.float32))
  expected = make(jnp.float32).apply(params, x.astype(jnp.float32))
  params_bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  got = make(jnp.bfloat16).apply(params_bf16, x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=2**-8, atol=1e-6)


def _sds_gradient(module, params, inputs, guidance_scale) -> np.ndarray:
  dtype = module.dtype

  def eps_fn(noisy, timesteps, text):
    return module.apply({'params': params}, noisy.astype(dtype), timesteps, text.astype(dtype))

  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod_from_config(
      dict(num_train_timesteps=1000, beta_schedule='linear')), jnp.float32)
  x = inputs['sample']
  text = inputs['encoder_hidden_states']
  loss = lambda x: sds.sds_loss(eps_fn, x, jax.random.key(4), text, jnp.zeros_like(text[:1]),
                                alphas_cumprod=alphas_cumprod,
                                guidance_scale=guidance_scale)[0]
  return np.asarray(jax.jit(jax.grad(loss))(x))


# Tolerance of the relative L2 error of the bf16 SDS gradient against float32's. Measured on
# these models: IF 3.0%, SD 3.1% (3.1% / 3.2% at guidance scale 100). bfloat16 keeps 8
# significant bits (2^-9 relative rounding) and every weight, activation and the model input
# are rounded; ~30 layers of random unit-scale weights add such errors up to a few percent of
# the output, and the CFG difference eps_cond - eps_uncond of two rounded outputs is scaled by
# the guidance weight. So 6% (about twice the measurement) passes a correct bf16 model, while
# a lost float32 step fails it: a bf16 GroupNorm on these activations or a bf16 softmax over
# the keys costs tens of percent, or NaN.
SDS_BF16_TOLERANCE = 0.06
GUIDANCE_SCALES = {'if': 20.0, 'sd': 7.5}


@pytest.mark.parametrize('style', sorted(STYLES))
def test_bfloat16_sds_gradient_close_to_float32(style):
  module, params = _module(style)
  bf16 = UNet2DConditionModel(module.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params_bf16 = jax.tree.map(lambda p: jnp.asarray(p, jnp.bfloat16), params)
  inputs = _inputs(style)
  expected = _sds_gradient(module, params, inputs, GUIDANCE_SCALES[style])
  got = _sds_gradient(bf16, params_bf16, inputs, GUIDANCE_SCALES[style])
  assert got.dtype == np.float32 and np.all(np.isfinite(got))
  error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
  assert 0 < error < SDS_BF16_TOLERANCE, error  # > 0: the bf16 model really ran in bf16
