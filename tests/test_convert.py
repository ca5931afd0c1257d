"""PyTorch <-> Flax weight conversion, safetensors reading and the loader's errors."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from att3d_jax.guidance import UNet2DConditionModel
from att3d_jax.guidance import UNetConfig
from att3d_jax.guidance import convert
from att3d_jax.guidance import load_unet
from att3d_jax.guidance import param_shapes
from att3d_jax.guidance import save_unet


class TorchNet(torch.nn.Module):
  """One layer of each kind, nested in a ModuleList like diffusers' blocks."""

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    self.blocks = torch.nn.ModuleList([torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 6)])
    self.norm = torch.nn.LayerNorm(6)
    self.embed = torch.nn.Embedding(4, 6)

  def forward(self, images, ids):  # images [B, 3, H, W], ids [B]
    x = self.blocks[0](self.conv(images)).permute(0, 2, 3, 1)
    return self.norm(self.blocks[1](x)) + self.embed(ids)[:, None, None, :]


class FlaxNet(nn.Module):
  """TorchNet in Flax, channels-last, with submodules named after TorchNet's."""

  @nn.compact
  def __call__(self, images, ids):  # images [B, H, W, 3]
    x = nn.Conv(8, (3, 3), padding=1, name='conv')(images)
    x = nn.GroupNorm(2, epsilon=1e-5, name='blocks.0')(x)
    x = nn.LayerNorm(epsilon=1e-5, name='norm')(nn.Dense(6, name='blocks.1')(x))
    return x + nn.Embed(4, 6, name='embed')(ids)[:, None, None, :]


def _torch_net_state():
  torch.manual_seed(0)
  model = TorchNet()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))  # Norms start at exactly 1 and 0.
  return model, {k: v.numpy() for k, v in model.state_dict().items()}


def _flax_net_inputs():
  return jnp.zeros((1, 5, 5, 3)), jnp.zeros((1,), jnp.int32)


def test_torch_to_flax_reproduces_torch_layers():
  model, state = _torch_net_state()
  shapes = jax.eval_shape(FlaxNet().init, jax.random.key(0), *_flax_net_inputs())['params']
  params = convert.torch_to_flax(state, shapes)
  images = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
  ids = np.array([3, 1])
  with torch.no_grad():
    expected = model(torch.from_numpy(images), torch.from_numpy(ids)).numpy()
  got = FlaxNet().apply({'params': params}, images.transpose(0, 2, 3, 1), ids)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_flax_to_torch_inverts_torch_to_flax():
  _, state = _torch_net_state()
  shapes = jax.eval_shape(FlaxNet().init, jax.random.key(0), *_flax_net_inputs())['params']
  round_trip = convert.flax_to_torch(convert.torch_to_flax(state, shapes))
  assert sorted(round_trip) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(round_trip[key], value)


def test_read_safetensors_upcasts_half_precision(tmp_path):
  tensors = {'half': torch.randn(3, 4, dtype=torch.float16),
             'brain': torch.randn(2, 5).to(torch.bfloat16)}
  path = str(tmp_path / 'w.safetensors')
  safetensors.torch.save_file(tensors, path)
  shapes = {'half': jax.ShapeDtypeStruct((3, 4), jnp.float32),
            'brain': jax.ShapeDtypeStruct((2, 5), jnp.float32)}
  params = convert.torch_to_flax(convert.read_safetensors(path), shapes)
  for name, tensor in tensors.items():
    assert params[name].dtype == np.float32
    np.testing.assert_array_equal(params[name], tensor.float().numpy())


def test_read_safetensors_sharded_folder(tmp_path):
  shards = {'diffusion_pytorch_model-00001-of-00002.safetensors': {'a': np.ones((2,), np.float32)},
            'diffusion_pytorch_model-00002-of-00002.safetensors': {'b': np.zeros((3,), np.float32)}}
  for name, tensors in shards.items():
    safetensors.numpy.save_file(tensors, str(tmp_path / name))
  weight_map = {key: name for name, tensors in shards.items() for key in tensors}
  with open(tmp_path / 'diffusion_pytorch_model.safetensors.index.json', 'w') as f:
    json.dump({'weight_map': weight_map}, f)
  tensors = convert.read_safetensors(str(tmp_path))
  np.testing.assert_array_equal(tensors['a'], np.ones(2))
  np.testing.assert_array_equal(tensors['b'], np.zeros(3))


TINY_CONFIG = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                         cross_attention_dim=32, attention_head_dim=4,
                         down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                         up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))


@pytest.fixture
def unet_folder(tmp_path):
  """A pipeline folder holding a tiny UNet with zero weights in unet/."""
  shapes = param_shapes(UNet2DConditionModel(TINY_CONFIG))
  save_unet(str(tmp_path / 'unet'), TINY_CONFIG,
            jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes))
  return tmp_path


def _edit_weights(folder, edit):
  path = os.path.join(folder, 'unet', convert.WEIGHTS_NAME)
  tensors = dict(safetensors.numpy.load_file(path))
  edit(tensors)
  safetensors.numpy.save_file(tensors, path)


def test_load_unet_reads_saved_folder(unet_folder):
  unet = load_unet(str(unet_folder))
  assert unet.config == TINY_CONFIG
  assert unet.params['conv_in']['kernel'].shape == (3, 3, 4, 32)


def test_missing_tensor_is_named(unet_folder):
  _edit_weights(unet_folder, lambda tensors: tensors.pop('conv_in.weight'))
  with pytest.raises(ValueError) as error:
    load_unet(str(unet_folder))
  message = str(error.value)
  assert '1 missing keys' in message
  assert 'conv_in.weight  expected shape (32, 4, 3, 3)' in message


def test_wrong_shape_is_named_with_expected_and_actual(unet_folder):
  def edit(tensors):
    tensors['time_embedding.linear_1.weight'] = np.zeros((128, 31), np.float32)
  _edit_weights(unet_folder, edit)
  with pytest.raises(ValueError) as error:
    load_unet(str(unet_folder))
  message = str(error.value)
  assert '1 shape mismatches' in message
  assert 'time_embedding.linear_1.weight  expected (128, 32), got (128, 31)' in message


def test_unexpected_tensor_is_named(unet_folder):
  _edit_weights(unet_folder, lambda tensors: tensors.update(extra=np.zeros(2, np.float32)))
  with pytest.raises(ValueError, match='1 unexpected keys:\n  extra  shape \\(2,\\)'):
    load_unet(str(unet_folder))


def test_missing_folder_names_expected_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match='unet/config.json'):
    load_unet(str(tmp_path / 'nowhere'))


def test_missing_weights_file_is_named(unet_folder):
  os.remove(os.path.join(unet_folder, 'unet', convert.WEIGHTS_NAME))
  with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model.safetensors'):
    load_unet(str(unet_folder))


@pytest.mark.parametrize('override, message', [
    (dict(down_block_types=('AttnDownBlock2D', 'DownBlock2D')),
     "down_block_types[0]='AttnDownBlock2D'"),
    (dict(time_cond_proj_dim=8), 'time_cond_proj_dim=8'),
    (dict(resnet_time_scale_shift='spatial'), "resnet_time_scale_shift='spatial'"),
    (dict(addition_embed_type='text_time'), "addition_embed_type='text_time'"),
    (dict(act_fn='tanh'), "act_fn='tanh'"),
])
def test_unsupported_config_is_named(tmp_path, override, message):
  config = dict(TINY_CONFIG.to_dict(), **override)
  os.makedirs(tmp_path / 'unet')
  with open(tmp_path / 'unet' / 'config.json', 'w') as f:
    json.dump(config, f)
  with pytest.raises(NotImplementedError) as error:
    load_unet(str(tmp_path))
  assert message in str(error.value)
