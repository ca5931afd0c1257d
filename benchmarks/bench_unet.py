"""UNet forward and forward+backward: the Flax port vs diffusers' PyTorch UNet, same config.

    python -m benchmarks.bench_unet [--quick] [--threads 1] [--eigen] [--split_host 2]

The model is a DeepFloyd-IF-style UNet at CPU width (block_out_channels 64/128/256,
added-KV attention at the two lower resolutions, 77 text tokens), with the same random
weights on both sides (the PyTorch model is saved and loaded with `load_unet`).
forward+backward is the gradient of a scalar of the output with respect to the params and
the input sample at once (what training the shapes model needs; SDS needs neither), one
jitted function on the JAX side.

Threads: by default both use every core (XLA's thread pool, `torch.set_num_threads(cores)`).
`--threads 1` makes both single-threaded (XLA_FLAGS set before JAX starts); on a machine
shared with other jobs that is the steadier comparison, since idle-spinning OpenMP threads
make multi-threaded PyTorch very slow once the cores are oversubscribed (the benchmark sets
OMP_WAIT_POLICY=PASSIVE unless it is set, which avoids most of that). Each function
runs a block of repeats after warm-up (blocks, not interleaved calls, so that PyTorch's
spinning threads do not run into the JAX timings); reported are medians of wall-clock and
of process CPU time.

Under each UNet row, the UNet's convolutions alone: every `conv_general_dilated` of its
forward pass (found in the jaxpr), without bias, forward or vjp (input and kernel
gradients), JAX vs `torch.nn.functional.conv2d` on the same shapes. PyTorch's whole UNet
time over our convolutions alone bounds what any change to the rest of the port could
gain. `--split_host 2` splits the CPU into two XLA devices and the batch over them, as
main.py runs the train step; its rows have no convolutions-alone line (those run on one
device, so they would repeat the unsplit run's).

What limits the port on CPU, and what was tried and not kept: docs/design.md, History.
"""

import argparse
import math
import os

# Idle OpenMP threads of PyTorch sleep instead of spinning: with spinning, multi-threaded
# PyTorch gets many times slower as soon as other jobs share the cores. Read when OpenMP
# starts, hence before torch is imported.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import json
import statistics
import sys
import tempfile
import time
from typing import Iterator

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

from att3d_jax import xla_cpu
from att3d_jax.guidance import load_unet
from att3d_jax.guidance import unet as unet_lib

CONFIG = dict(
    sample_size=64, in_channels=3, out_channels=6, block_out_channels=(64, 128, 256),
    layers_per_block=2, norm_num_groups=32, attention_head_dim=64, cross_attention_dim=256,
    down_block_types=('ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D',
                      'SimpleCrossAttnDownBlock2D'),
    mid_block_type='UNetMidBlock2DSimpleCrossAttn',
    up_block_types=('SimpleCrossAttnUpBlock2D', 'SimpleCrossAttnUpBlock2D',
                    'ResnetUpsampleBlock2D'),
    encoder_hid_dim=512, encoder_hid_dim_type='text_proj', addition_embed_type='text',
    resnet_time_scale_shift='scale_shift', resnet_skip_time_act=True,
    resnet_out_scale_factor=math.sqrt(2), act_fn='gelu', time_embedding_act_fn='gelu',
    cross_attention_norm='group_norm')
# The accelerator comparison (`run_accelerator`): DeepFloyd IF-I-XL's structure (4 levels of
# 3 resnets, added-KV attention at the three lower resolutions, T5-XXL's 4096-wide text) at
# base width 256 instead of 704: 569M parameters, so that PyTorch and JAX both fit with room
# and the pair compiles and runs in about a minute.
ACCELERATOR_CONFIG = dict(
    CONFIG, block_out_channels=(256, 512, 768, 1024), layers_per_block=3,
    cross_attention_dim=1024, encoder_hid_dim=4096, addition_embed_type_num_heads=64,
    down_block_types=('ResnetDownsampleBlock2D',) + ('SimpleCrossAttnDownBlock2D',) * 3,
    up_block_types=('SimpleCrossAttnUpBlock2D',) * 3 + ('ResnetUpsampleBlock2D',))
SEQUENCE_LENGTH = 77
SINGLE_THREAD_XLA_FLAGS = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'


def _inputs(batch: int, size: int, config: dict = CONFIG) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return dict(
      sample=rng.standard_normal((batch, config['in_channels'], size, size)).astype(np.float32),
      timesteps=rng.uniform(0, 1000, batch).astype(np.float32),
      encoder_hidden_states=rng.standard_normal(
          (batch, SEQUENCE_LENGTH, config['encoder_hid_dim'])).astype(np.float32))


def _median_times(fn, repeats: int, warmup: int = 2) -> tuple[float, float]:
  """Median (wall seconds, process CPU seconds) per call, after `warmup` calls."""
  for _ in range(warmup):
    fn()
  wall, cpu = [], []
  for _ in range(repeats):
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - wall_start)
    cpu.append(time.process_time() - cpu_start)
  return statistics.median(wall), statistics.median(cpu)


def convolution_calls(fn, *args) -> list[dict]:
  """Every `lax.conv_general_dilated` that `fn(*args)` runs, from its jaxpr (nested
  jaxprs included), as keyword arguments for that function plus operand shapes."""
  calls = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        params = {k: eqn.params[k] for k in (
            'window_strides', 'padding', 'lhs_dilation', 'rhs_dilation',
            'dimension_numbers', 'feature_group_count', 'batch_group_count')}
        calls.append(dict(params, lhs_shape=eqn.invars[0].aval.shape,
                          rhs_shape=eqn.invars[1].aval.shape))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
          if hasattr(sub, 'eqns'):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return calls


def _torch_conv_args(call: dict) -> dict:
  """`torch.nn.functional.conv2d` keyword arguments of a conv call, plus `pad`: the
  `F.pad` widths to apply first where the padding is uneven (None where conv2d's own
  symmetric padding does it, as in diffusers' layers, without a padded copy)."""
  if (set(call['lhs_dilation']) | set(call['rhs_dilation']) != {1}
      or call['feature_group_count'] != 1 or call['batch_group_count'] != 1):
    raise NotImplementedError(f'only plain convolutions are timed, got {call}')
  stride = tuple(call['window_strides'])
  if all(low == high for low, high in call['padding']):
    return dict(stride=stride, padding=tuple(low for low, _ in call['padding']), pad=None)
  # F.pad takes (left, right, top, bottom): the last axis first.
  pad = tuple(width for low, high in reversed(call['padding']) for width in (low, high))
  return dict(stride=stride, padding=0, pad=pad)


def jax_conv(lhs, rhs, call: dict):
  """The conv call itself on new operands `lhs`, `rhs` of its shapes."""
  return jax.lax.conv_general_dilated(
      lhs, rhs, **{k: v for k, v in call.items() if not k.endswith('_shape')})


def torch_conv(x, w, args: dict):
  """conv2d of NCHW `x` with OIHW `w` and `_torch_conv_args` `args`."""
  if args['pad'] is not None:
    x = torch.nn.functional.pad(x, args['pad'])
  return torch.nn.functional.conv2d(x, w, stride=args['stride'], padding=args['padding'])


def time_convolutions(calls: list[dict], repeats: int) -> list[dict]:
  """The given convolutions alone (no bias), forward and forward+backward (vjp to
  input and kernel, fixed random cotangents), JAX vs PyTorch; rows like `run`'s."""
  rng = np.random.default_rng(2)
  normal = lambda shape: rng.standard_normal(shape).astype(np.float32)
  lhs = [jnp.asarray(normal(c['lhs_shape'])) for c in calls]
  rhs = [jnp.asarray(normal(c['rhs_shape'])) for c in calls]
  apply = lambda lhs, rhs: [jax_conv(x, w, c) for x, w, c in zip(lhs, rhs, calls)]
  cotangents = [jnp.asarray(normal(y.shape)) for y in apply(lhs, rhs)]
  forward = jax.jit(apply)
  backward = jax.jit(lambda lhs, rhs, cots: jax.vjp(apply, lhs, rhs)[1](cots))

  torch_args = [_torch_conv_args(c) for c in calls]
  to_torch = lambda a: torch.from_numpy(np.array(a)).requires_grad_(True)
  torch_lhs = [to_torch(np.asarray(x).transpose(c['dimension_numbers'].lhs_spec))
               for x, c in zip(lhs, calls)]
  torch_rhs = [to_torch(np.asarray(w).transpose(c['dimension_numbers'].rhs_spec))
               for w, c in zip(rhs, calls)]
  torch_cots = [to_torch(np.asarray(y).transpose(c['dimension_numbers'].out_spec)).detach()
                for y, c in zip(cotangents, calls)]

  def torch_apply():
    return [torch_conv(x, w, args) for x, w, args in zip(torch_lhs, torch_rhs, torch_args)]

  def torch_forward():
    with torch.no_grad():
      return torch_apply()

  def torch_forward_backward():
    return torch.autograd.grad(torch_apply(), torch_lhs + torch_rhs, torch_cots)

  rows = []
  for name, jax_fn, torch_fn in (
      ('convolutions_forward', lambda: jax.block_until_ready(forward(lhs, rhs)), torch_forward),
      ('convolutions_forward_backward',
       lambda: jax.block_until_ready(backward(lhs, rhs, cotangents)), torch_forward_backward)):
    jax_wall, _ = _median_times(jax_fn, repeats)
    torch_wall, _ = _median_times(torch_fn, repeats)
    rows.append(dict(name=name, count=len(calls), jax_s=jax_wall, torch_s=torch_wall,
                     speedup=torch_wall / jax_wall))
  return rows


def run(quick: bool = False, threads: int | None = None, split_batch: bool = False) -> list[dict]:
  """Times JAX and PyTorch; one dict per measurement (name, shapes, seconds, speedups).

  Args:
    quick: batch 1 at 32x32 and 3 repeats instead of batch 4 at 64x64 and 5 repeats.
    threads: None for all cores; 1 needs XLA_FLAGS=SINGLE_THREAD_XLA_FLAGS set before JAX
      first runs anything (`main` does this).
    split_batch: JAX splits the batch over the local XLA devices (`xla_cpu.data_mesh`), the
      params replicated: with the host split into devices by `xla_cpu.split_host`, this is
      how main.py runs the train step. PyTorch is unchanged. The convolutions-alone
      measurement (on one device) is left to the unsplit run.
  """
  if threads not in (None, 1):
    raise ValueError(f'threads must be None (all cores) or 1, got {threads}.')
  if threads == 1 and SINGLE_THREAD_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
    raise RuntimeError(f'threads=1 needs XLA_FLAGS="{SINGLE_THREAD_XLA_FLAGS}" before JAX '
                       'starts; run `python -m benchmarks.bench_unet --threads 1`.')
  batch, size, repeats = (1, 32, 3) if quick else (4, 64, 5)
  torch.set_num_threads(threads or os.cpu_count())
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**CONFIG).eval()
  with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    unet = load_unet(folder)
  inputs = _inputs(batch, size)
  torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
  cotangent = np.random.default_rng(1).standard_normal(
      (batch, CONFIG['out_channels'], size, size)).astype(np.float32)
  torch_cotangent = torch.from_numpy(cotangent)
  jax_inputs = {k: jnp.asarray(v) for k, v in dict(inputs, cotangent=cotangent).items()}
  params, devices = unet.params, 1
  if split_batch:  # data parallel over the host devices, as main.py runs the train step
    if len(jax.local_devices()) < 2:
      raise ValueError('split_batch needs several XLA devices: xla_cpu.split_host(n) before '
                       'JAX starts (--split_host n)')
    mesh = xla_cpu.data_mesh(batch)
    devices = mesh.size
    jax_inputs = jax.device_put(jax_inputs, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec('data')))
    params = jax.device_put(params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))

  def torch_forward():
    with torch.no_grad():
      return model(torch_inputs['sample'], torch_inputs['timesteps'],
                   torch_inputs['encoder_hidden_states']).sample

  def torch_forward_backward():
    model.zero_grad(set_to_none=True)
    sample = torch_inputs['sample'].clone().requires_grad_(True)
    out = model(sample, torch_inputs['timesteps'], torch_inputs['encoder_hidden_states']).sample
    (out * torch_cotangent).sum().backward()
    return sample.grad

  def apply(params, sample, inputs):
    return unet.module.apply({'params': params}, sample, inputs['timesteps'],
                             inputs['encoder_hidden_states'])

  loss = lambda params, sample, inputs: jnp.sum(apply(params, sample, inputs) * inputs['cotangent'])
  forward_fn, grad_fn = jax.jit(apply), jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax_forward = lambda: jax.block_until_ready(forward_fn(params, jax_inputs['sample'], jax_inputs))
  jax_forward_backward = lambda: jax.block_until_ready(
      grad_fn(params, jax_inputs['sample'], jax_inputs))

  results = []
  for name, jax_fn, torch_fn in (
      ('unet_forward', jax_forward, torch_forward),
      ('unet_forward_backward', jax_forward_backward, torch_forward_backward)):
    jax_wall, jax_cpu = _median_times(jax_fn, repeats)
    torch_wall, torch_cpu = _median_times(torch_fn, repeats)
    results.append(dict(
        name=name, batch=batch, size=size, threads=threads or os.cpu_count(),
        devices=devices, jax_s=jax_wall, torch_s=torch_wall, speedup=torch_wall / jax_wall,
        jax_cpu_s=jax_cpu, torch_cpu_s=torch_cpu, cpu_speedup=torch_cpu / jax_cpu))
  # What the convolutions alone cost: the UNet cannot beat PyTorch by more than
  # PyTorch's whole time / the time of our convolutions alone. They run on one
  # device either way, so split_batch does not time them again.
  if not split_batch:
    calls = convolution_calls(apply, params, jax_inputs['sample'], jax_inputs)
    conv_rows = time_convolutions(calls, repeats)
    for row, conv_row in zip(results, conv_rows):
      row.update(convolutions=conv_row['count'], convolutions_jax_s=conv_row['jax_s'],
                 convolutions_torch_s=conv_row['torch_s'],
                 speedup_bound=row['torch_s'] / conv_row['jax_s'])
  return results


def run_accelerator(tiny: bool = False, log=print) -> Iterator[dict]:
  """bfloat16 on both sides: JAX on its default device (GPU/TPU), diffusers PyTorch on CUDA.

  The model is ACCELERATOR_CONFIG (CONFIG with `tiny`, for testing this path on a CPU, where
  PyTorch runs on the CPU), batch 16 (8 frames with classifier-free guidance) at 64x64
  (`tiny`: batch 1 at 32x32). JAX is timed with each attention implementation that the
  device has: "xla", and "cudnn" on a GPU ("dot_product" elsewhere). Yields one dict per
  (attention implementation, pass) as soon as it is measured; `log` gets a line for each.
  """
  config = CONFIG if tiny else ACCELERATOR_CONFIG
  batch, size, repeats = (1, 32, 2) if tiny else (16, 64, 10)
  on_gpu = jax.default_backend() == 'gpu'
  torch_device = 'cuda' if torch.cuda.is_available() and not tiny else 'cpu'
  if not tiny and torch_device != 'cuda':
    raise RuntimeError('the PyTorch reference needs CUDA: torch.cuda.is_available() is False '
                       f'(torch {torch.__version__})')
  torch.manual_seed(0)
  with torch.device(torch_device):  # initialized where it runs: seconds, not minutes
    model = diffusers.UNet2DConditionModel(**config).eval()
  implementations = ('xla', 'cudnn' if on_gpu else 'dot_product')
  with tempfile.TemporaryDirectory() as folder:
    model.cpu().save_pretrained(folder)
    unet = load_unet(folder, dtype=jnp.bfloat16)
  # The same params under each attention implementation.
  unets = {impl: unet_lib.LoadedUNet(unet_lib.UNet2DConditionModel(
      unet.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=impl), unet.params)
           for impl in implementations}
  model = model.to(torch_device, torch.bfloat16)
  num_params = sum(p.numel() for p in model.parameters())
  inputs = _inputs(batch, size, config)
  # Timesteps stay float32 (diffusers computes the sinusoids in float32 either way).
  torch_inputs = {k: torch.from_numpy(v).to(torch_device,
                                            torch.float32 if k == 'timesteps' else torch.bfloat16)
                  for k, v in inputs.items()}
  cotangent = np.random.default_rng(1).standard_normal(
      (batch, config['out_channels'], size, size)).astype(np.float32)
  torch_cotangent = torch.from_numpy(cotangent).to(torch_device, torch.bfloat16)
  jax_inputs = {k: jnp.asarray(v) for k, v in dict(inputs, cotangent=cotangent).items()}
  sync = torch.cuda.synchronize if torch_device == 'cuda' else lambda: None

  def torch_forward():
    with torch.no_grad():
      model(torch_inputs['sample'], torch_inputs['timesteps'],
            torch_inputs['encoder_hidden_states'])
    sync()

  def torch_forward_backward():
    model.zero_grad(set_to_none=True)
    sample = torch_inputs['sample'].clone().requires_grad_(True)
    out = model(sample, torch_inputs['timesteps'], torch_inputs['encoder_hidden_states']).sample
    (out * torch_cotangent).sum().backward()
    sync()

  torch_times = {'forward': _median_times(torch_forward, repeats)[0],
                 'forward_backward': _median_times(torch_forward_backward, repeats)[0]}
  log(f'  PyTorch {torch_device} bf16: forward {1e3 * torch_times["forward"]:.1f} ms, '
      f'forward+backward {1e3 * torch_times["forward_backward"]:.1f} ms')
  for impl, unet in unets.items():
    apply = lambda params, sample, inputs, unet=unet: unet.module.apply(
        {'params': params}, sample, inputs['timesteps'], inputs['encoder_hidden_states'])
    loss = lambda params, sample, inputs, apply=apply: jnp.sum(
        apply(params, sample, inputs) * inputs['cotangent'])
    functions = {'forward': jax.jit(apply), 'forward_backward': jax.jit(jax.grad(loss, (0, 1)))}
    for name, fn in functions.items():
      call = lambda fn=fn, unet=unet: jax.block_until_ready(
          fn(unet.params, jax_inputs['sample'], jax_inputs))
      start = time.perf_counter()
      call()
      compile_s = time.perf_counter() - start
      jax_s = _median_times(call, repeats)[0]
      log(f'  JAX bf16 {name} attention={impl}: {1e3 * jax_s:.1f} ms '
          f'(first call {compile_s:.1f} s)')
      yield dict(name=f'unet_{name}', attention=impl, batch=batch, size=size,
                 params=num_params, jax_s=jax_s, torch_s=torch_times[name],
                 speedup=torch_times[name] / jax_s, compile_s=compile_s,
                 torch_device=torch_device)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='batch 1 at 32x32, 3 repeats')
  parser.add_argument('--threads', type=int, choices=(1,), default=None,
                      help='1: single-threaded JAX and PyTorch (default: all cores)')
  parser.add_argument('--eigen', action='store_true',
                      help='XLA:CPU convolutions on Eigen, not YNNPACK (att3d_jax/xla_cpu.py)')
  parser.add_argument('--split_host', type=int, default=1,
                      help='make the CPU this many XLA devices and split the batch over '
                           'them, as main.py runs the train step (att3d_jax/xla_cpu.py)')
  parser.add_argument('--json', action='store_true', help='print the rows as one JSON line')
  args = parser.parse_args()
  xla_cpu.split_host(args.split_host)  # no-op where XLA_FLAGS already sets a count
  if args.threads == 1:  # Read by XLA when JAX first runs something, i.e. below.
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}"
  if args.eigen and not xla_cpu.use_eigen_convolutions():
    sys.exit('--eigen: XLA_FLAGS already sets the flag, or this jaxlib was not measured')
  if args.json:
    print(json.dumps(run(args.quick, args.threads, split_batch=args.split_host > 1)))
    return
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, '
        f"diffusers {diffusers.__version__}, {os.cpu_count()} cores, OMP_WAIT_POLICY="
        f"{os.environ['OMP_WAIT_POLICY']}, load average {os.getloadavg()[0]:.1f}")
  for r in run(args.quick, args.threads, split_batch=args.split_host > 1):
    print(f"{r['name']:22s} batch {r['batch']} {r['size']}x{r['size']} threads {r['threads']}: "
          f"wall JAX {r['jax_s'] * 1e3:7.0f} ms, PyTorch {r['torch_s'] * 1e3:7.0f} ms, "
          f"speedup {r['speedup']:5.2f}x | CPU time JAX {r['jax_cpu_s'] * 1e3:7.0f} ms, "
          f"PyTorch {r['torch_cpu_s'] * 1e3:7.0f} ms, ratio {r['cpu_speedup']:5.2f}x")
    if 'convolutions' not in r:
      continue
    print(f"{'':22s} its {r['convolutions']} convolutions alone: JAX "
          f"{r['convolutions_jax_s'] * 1e3:7.0f} ms, PyTorch "
          f"{r['convolutions_torch_s'] * 1e3:7.0f} ms; bound on the speedup "
          f"(PyTorch's whole UNet / JAX's convolutions) {r['speedup_bound']:5.2f}x")


if __name__ == '__main__':
  main()
