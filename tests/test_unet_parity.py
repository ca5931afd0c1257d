"""Parity of the Flax UNet port with diffusers' PyTorch UNet2DConditionModel.

Each test builds a tiny diffusers UNet with every parameter randomized (diffusers zero-inits
some layers, which would hide conversion errors), saves it with `save_pretrained`, loads it
with `load_unet` and compares outputs on random inputs in float32.
"""

import math

import diffusers
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from att3d_jax.guidance import UNet2DConditionModel
from att3d_jax.guidance import UNetConfig
from att3d_jax.guidance import load_unet
from att3d_jax.guidance import param_shapes
from att3d_jax.guidance import save_unet
from att3d_jax.guidance import unet_blocks

ATOL = 1e-4
BATCH = 2
SEQUENCE_LENGTH = 5
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, norm_num_groups=8,
            cross_attention_dim=32)

CONFIGS = {
    # SD 1.x: conv projections, GEGLU transformer blocks, DownBlock2D at the lowest resolution.
    'sd1': dict(TINY, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=4),
    # SD 2.x: linear projections, per-block head counts, upcast attention; plus per-block
    # transformer depth, a cross-attention-only block and the older time-embedding variant.
    'sd2': dict(TINY, down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
                up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=(1, 2), only_cross_attention=(False, True),
                flip_sin_to_cos=False, freq_shift=1),
    # DeepFloyd IF stage I, with the options of its released config.
    'if': dict(TINY, in_channels=3, out_channels=6,
               down_block_types=('ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D'),
               mid_block_type='UNetMidBlock2DSimpleCrossAttn',
               up_block_types=('SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D'),
               attention_head_dim=(8, 16), encoder_hid_dim=48, encoder_hid_dim_type='text_proj',
               addition_embed_type='text', addition_embed_type_num_heads=4,
               resnet_time_scale_shift='scale_shift', resnet_skip_time_act=True,
               resnet_out_scale_factor=math.sqrt(2), act_fn='gelu', time_embedding_act_fn='gelu',
               cross_attention_norm='group_norm'),
    # The shipped shapes model's layout: a pooled text embedding added to the time embedding.
    'projection': dict(TINY, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                       up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), attention_head_dim=2,
                       class_embed_type='projection', projection_class_embeddings_input_dim=24),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Replaces every parameter: weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2),
  biases ~ N(0, 0.1^2)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if param.ndim >= 2:
        param.copy_(noise / math.sqrt(param[0].numel()))
      elif name.endswith('weight'):
        param.copy_(1 + 0.1 * noise)
      else:
        param.copy_(0.1 * noise)


def diffusers_unet(config: dict, seed: int = 0) -> diffusers.UNet2DConditionModel:
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**config)
  randomize(model, seed)
  return model.eval()


def random_inputs(config: dict, size: tuple[int, int] = (16, 16), seed: int = 0,
                  class_labels: np.ndarray | None = None) -> dict:
  rng = np.random.default_rng(seed)
  context_dim = config.get('encoder_hid_dim') or config['cross_attention_dim']
  inputs = dict(
      sample=rng.standard_normal((BATCH, config.get('in_channels', 4), *size)).astype(np.float32),
      timesteps=np.array([12.0, 731.0], np.float32),
      encoder_hidden_states=rng.standard_normal(
          (BATCH, SEQUENCE_LENGTH, context_dim)).astype(np.float32))
  if config.get('class_embed_type') == 'projection':
    class_labels = rng.standard_normal(
        (BATCH, config['projection_class_embeddings_input_dim'])).astype(np.float32)
  if class_labels is not None:
    inputs['class_labels'] = class_labels
  return inputs


def torch_forward(model, inputs: dict) -> np.ndarray:
  tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
  with torch.no_grad():
    return model(tensors.pop('sample'), tensors.pop('timesteps'), **tensors).sample.numpy()


def assert_close(got, expected):
  got = np.asarray(got)
  assert got.shape == expected.shape
  # Outputs of order one, so that the absolute tolerance is meaningful.
  assert np.abs(expected).mean() > 0.1
  np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_parity_with_diffusers(tmp_path, name):
  config = CONFIGS[name]
  model = diffusers_unet(config)
  model.save_pretrained(tmp_path / 'unet')
  unet = load_unet(str(tmp_path))  # A pipeline folder: the UNet is found in unet/.
  inputs = random_inputs(config)
  assert_close(unet(**inputs), torch_forward(model, inputs))
  if name in ('sd2', 'if'):  # Text padding masks, on both attention kinds.
    masked_inputs = dict(inputs, encoder_attention_mask=MASK)
    expected = torch_forward(model, masked_inputs)
    assert np.abs(expected - torch_forward(model, inputs)).max() > 1e-2  # The mask matters.
    assert_close(unet(**masked_inputs), expected)
  if name == 'sd1':  # Sizes not divisible by the total downsampling: upsampling to skip sizes.
    odd_inputs = random_inputs(config, size=(9, 11), seed=1)
    assert_close(unet(**odd_inputs), torch_forward(model, odd_inputs))


# Class conditioning on an attention-free net (UNetMidBlock2D) to keep compiles short.
_PLAIN = dict(TINY, down_block_types=('DownBlock2D', 'DownBlock2D'),
              up_block_types=('UpBlock2D', 'UpBlock2D'), mid_block_type='UNetMidBlock2D')
_CLASS_CASES = {
    'timestep_concat': (dict(class_embed_type='timestep', class_embeddings_concat=True),
                        np.array([3.0, 250.0], np.float32)),
    'identity': (dict(class_embed_type='identity'),
                 np.random.default_rng(3).standard_normal((BATCH, 128)).astype(np.float32)),
    'simple_projection': (dict(class_embed_type='simple_projection',
                               projection_class_embeddings_input_dim=7),
                          np.random.default_rng(4).standard_normal((BATCH, 7)).astype(np.float32)),
    'num_class_embeds': (dict(num_class_embeds=5), np.array([4, 1], np.int64)),
}


@pytest.mark.parametrize('name', sorted(_CLASS_CASES))
def test_parity_class_embeddings(tmp_path, name):
  extra, class_labels = _CLASS_CASES[name]
  config = dict(_PLAIN, **extra)
  model = diffusers_unet(config, seed=5)
  model.save_pretrained(tmp_path)
  inputs = random_inputs(config, seed=5, class_labels=class_labels)
  inputs['timesteps'] = np.float32(321.0)  # A scalar timestep is broadcast over the batch.
  assert_close(load_unet(str(tmp_path))(**inputs), torch_forward(model, inputs))


def random_flax_params(shapes, seed: int):
  """Flax params with the same scales as `randomize` (kernels ~ N(0, 1/fan_in))."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    noise = rng.standard_normal(shape.shape).astype(np.float32)
    if path[-1] == 'kernel':
      return noise / math.sqrt(np.prod(shape.shape[:-1]))
    return 1 + 0.1 * noise if path[-1] == 'scale' else 0.1 * noise

  flat = traverse_util.flatten_dict(shapes)
  return traverse_util.unflatten_dict({path: draw(path, shape) for path, shape in flat.items()})


def test_save_unet_round_trip_through_diffusers(tmp_path):
  """Flax params -> save_unet -> diffusers from_pretrained gives the same outputs."""
  config = CONFIGS['projection']
  module = UNet2DConditionModel(UNetConfig(**config))
  params = random_flax_params(param_shapes(module), seed=6)
  save_unet(str(tmp_path), module.config, params)

  model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
  reloaded = load_unet(str(tmp_path))
  assert reloaded.config == module.config
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.params, params)
  inputs = random_inputs(config, seed=6)
  assert_close(reloaded(**inputs), torch_forward(model, inputs))


def test_bfloat16_close_to_float32_reference(tmp_path):
  config = CONFIGS['if']
  model = diffusers_unet(config, seed=7)
  model.save_pretrained(tmp_path)
  unet = load_unet(str(tmp_path), dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(unet.params)} == {
      jnp.dtype(jnp.bfloat16)}
  inputs = random_inputs(config, seed=7)
  got, expected = np.asarray(unet(**inputs)), torch_forward(model, inputs)
  assert got.dtype == np.float32
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.05


def test_group_normalize_float64_reference_with_large_mean():
  """The hand-written GroupNorm keeps float32 precision where E[x^2] - E[x]^2 would not
  (PyTorch's CPU group_norm is off by ~3e-2 on this input)."""
  rng = np.random.default_rng(0)
  x = (300.0 + rng.standard_normal((2, 5, 7, 12))).astype(np.float32)  # [B, H, W, C]
  scale, bias = rng.standard_normal((2, 12)).astype(np.float32)
  groups = x.astype(np.float64).reshape(2, 35, 4, 3)  # 4 groups of 3 channels.
  normalized = (groups - groups.mean((1, 3), keepdims=True)) / np.sqrt(
      groups.var((1, 3), keepdims=True) + 1e-5)
  expected = normalized.reshape(x.shape) * scale + bias
  got = unet_blocks.group_normalize(jnp.asarray(x), scale, bias, num_groups=4, eps=1e-5)
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)
