"""bench_unet's convolutions-alone measurement times the UNet's own convolutions,
and its PyTorch side computes the same ones."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from att3d_jax.guidance import unet as unet_lib
from benchmarks import bench_unet


def _if_style_calls(batch: int = 1, size: int = 32) -> tuple[list[dict], dict]:
  module = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_dict(bench_unet.CONFIG))
  shapes = unet_lib.param_shapes(module)
  inputs = bench_unet._inputs(batch, size)
  apply = lambda params, inputs: module.apply({'params': params}, **inputs)
  return bench_unet.convolution_calls(apply, shapes, inputs), shapes


def test_finds_every_convolution_of_the_unet_once():
  calls, shapes = _if_style_calls()
  kernels = [leaf for leaf in jax.tree.leaves(shapes) if len(leaf.shape) == 4]
  assert len(calls) == len(kernels) > 40
  # The kernels the calls use are the params' kernels (HWIO shapes), 3x3 and 1x1.
  assert sorted(c['rhs_shape'] for c in calls) == sorted(k.shape for k in kernels)
  assert {c['rhs_shape'][0] for c in calls} == {1, 3}
  assert {c['lhs_shape'][1] for c in calls} == {32, 16, 8}


def _strided_asymmetric_call() -> dict:
  """A stride-2 conv padded unevenly (diffusers' VAE downsampler pads bottom/right
  only), different per axis, on a non-square input: catches a swapped axis."""
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (2, 2), ((0, 1), (2, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  (call,) = bench_unet.convolution_calls(conv, jnp.zeros((2, 9, 12, 4)), jnp.zeros((3, 3, 4, 5)))
  return call


def test_pytorch_side_computes_the_same_convolutions():
  calls, _ = _if_style_calls()
  # The smallest 3x3 and 1x1 convolutions of the UNet, and a strided, asymmetrically
  # padded one.
  kinds = {}
  for call in sorted(calls, key=lambda c: np.prod(c['rhs_shape'])):
    kinds.setdefault(call['rhs_shape'][0], call)
  rng = np.random.default_rng(0)
  for call in [*kinds.values(), _strided_asymmetric_call()]:
    lhs = rng.standard_normal(call['lhs_shape']).astype(np.float32)
    rhs = rng.standard_normal(call['rhs_shape']).astype(np.float32)
    expected = bench_unet.jax_conv(jnp.asarray(lhs), jnp.asarray(rhs), call)
    numbers = call['dimension_numbers']
    got = bench_unet.torch_conv(torch.from_numpy(lhs.transpose(numbers.lhs_spec)),
                                torch.from_numpy(rhs.transpose(numbers.rhs_spec)),
                                bench_unet._torch_conv_args(call))
    np.testing.assert_allclose(got.numpy(), np.asarray(expected).transpose(numbers.out_spec),
                               rtol=1e-4, atol=1e-3)
