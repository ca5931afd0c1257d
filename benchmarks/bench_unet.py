"""UNet forward and forward+backward: the Flax port vs diffusers' PyTorch UNet, same config.

    python -m benchmarks.bench_unet [--quick] [--threads 1]

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

What limits the port on CPU (measured while writing it, jax 0.10.2): forward convs are on
par with PyTorch's oneDNN (a 3x3, 128-channel conv at 64x64: 16 ms vs 13 ms), but XLA's
gradient w.r.t. conv weights takes 83-95 ms vs 16 ms, about a third of the JAX backward;
attention is 14 ms vs 10 ms forward and ~5x that backward. NCHW vs NHWC, XLA's oneDNN /
XNNPACK flags and matmul rewrites of the weight gradient did not close the gap: a
custom VJP computing the kernel gradient as kh * kw shifted-input matmuls is 1.9x faster
per conv (3x3, 128 channels, 8x64x64: 89 ms vs 167 ms) but made this UNet's
forward+backward only 1.03x faster (2026-11-26), so it was not kept.
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

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

from att3d_jax import xla_cpu
from att3d_jax.guidance import load_unet

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
SEQUENCE_LENGTH = 77
SINGLE_THREAD_XLA_FLAGS = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'


def _inputs(batch: int, size: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return dict(
      sample=rng.standard_normal((batch, CONFIG['in_channels'], size, size)).astype(np.float32),
      timesteps=rng.uniform(0, 1000, batch).astype(np.float32),
      encoder_hidden_states=rng.standard_normal(
          (batch, SEQUENCE_LENGTH, CONFIG['encoder_hid_dim'])).astype(np.float32))


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


def run(quick: bool = False, threads: int | None = None,
        accelerator: bool = False) -> list[dict]:
  """Times JAX and PyTorch; one dict per measurement (name, shapes, seconds, speedups).

  Args:
    quick: batch 1 at 32x32 and 3 repeats instead of batch 4 at 64x64 and 5 repeats.
    threads: None for all cores; 1 needs XLA_FLAGS=SINGLE_THREAD_XLA_FLAGS set before JAX
      first runs anything (`main` does this).
    accelerator: JAX runs on its default GPU/TPU at batch 16, and a bfloat16 forward row
      is added (its ratio is against float32 JAX); PyTorch runs on CUDA when its build has
      it, otherwise its columns are None (a CPU PyTorch is no reference for a GPU).
  """
  if threads not in (None, 1):
    raise ValueError(f'threads must be None (all cores) or 1, got {threads}.')
  if threads == 1 and SINGLE_THREAD_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
    raise RuntimeError(f'threads=1 needs XLA_FLAGS="{SINGLE_THREAD_XLA_FLAGS}" before JAX '
                       'starts; run `python -m benchmarks.bench_unet --threads 1`.')
  batch, size, repeats = (1, 32, 3) if quick else (4, 64, 5)
  if accelerator:
    batch, repeats = 16, 10
  torch_device = 'cuda' if accelerator and torch.cuda.is_available() else 'cpu'
  torch.set_num_threads(threads or os.cpu_count())
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**CONFIG).eval()
  with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    unet = load_unet(folder)
    unet_bf16 = load_unet(folder, dtype=jnp.bfloat16) if accelerator else None
  model = model.to(torch_device)
  inputs = _inputs(batch, size)
  torch_inputs = {k: torch.from_numpy(v).to(torch_device) for k, v in inputs.items()}
  jax_inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
  cotangent = np.random.default_rng(1).standard_normal(
      (batch, CONFIG['out_channels'], size, size)).astype(np.float32)
  torch_cotangent = torch.from_numpy(cotangent).to(torch_device)
  sync = torch.cuda.synchronize if torch_device == 'cuda' else lambda: None

  def torch_forward():
    with torch.no_grad():
      out = model(torch_inputs['sample'], torch_inputs['timesteps'],
                  torch_inputs['encoder_hidden_states']).sample
    sync()
    return out

  def torch_forward_backward():
    model.zero_grad(set_to_none=True)
    sample = torch_inputs['sample'].clone().requires_grad_(True)
    out = model(sample, torch_inputs['timesteps'], torch_inputs['encoder_hidden_states']).sample
    (out * torch_cotangent).sum().backward()
    sync()
    return sample.grad

  def loss(params, sample):
    out = unet.module.apply({'params': params}, sample, jax_inputs['timesteps'],
                            jax_inputs['encoder_hidden_states'])
    return jnp.sum(out * cotangent)

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax_forward = lambda: jax.block_until_ready(unet(**jax_inputs))
  jax_forward_backward = lambda: jax.block_until_ready(grad_fn(unet.params, jax_inputs['sample']))

  results = []
  torch_runs = torch_device == 'cuda' or not accelerator
  for name, jax_fn, torch_fn in (
      ('unet_forward', jax_forward, torch_forward),
      ('unet_forward_backward', jax_forward_backward, torch_forward_backward)):
    jax_wall, jax_cpu = _median_times(jax_fn, repeats)
    torch_wall, torch_cpu = _median_times(torch_fn, repeats) if torch_runs else (None, None)
    results.append(dict(
        name=name, batch=batch, size=size, threads=threads or os.cpu_count(),
        jax_s=jax_wall, torch_s=torch_wall,
        speedup=torch_wall / jax_wall if torch_runs else None,
        jax_cpu_s=jax_cpu, torch_cpu_s=torch_cpu,
        cpu_speedup=torch_cpu / jax_cpu if torch_runs else None))
  if unet_bf16 is not None:
    bf16_wall, bf16_cpu = _median_times(
        lambda: jax.block_until_ready(unet_bf16(**jax_inputs)), repeats)
    results.append(dict(
        name='unet_forward_bfloat16', batch=batch, size=size,
        threads=threads or os.cpu_count(), jax_s=bf16_wall, torch_s=None, speedup=None,
        float32_s=results[0]['jax_s'], speedup_vs_float32=results[0]['jax_s'] / bf16_wall,
        jax_cpu_s=bf16_cpu, torch_cpu_s=None, cpu_speedup=None))
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='batch 1 at 32x32, 3 repeats')
  parser.add_argument('--threads', type=int, choices=(1,), default=None,
                      help='1: single-threaded JAX and PyTorch (default: all cores)')
  parser.add_argument('--eigen', action='store_true',
                      help='XLA:CPU convolutions on Eigen, not YNNPACK (att3d_jax/xla_cpu.py)')
  parser.add_argument('--json', action='store_true', help='print the rows as one JSON line')
  args = parser.parse_args()
  if args.threads == 1:  # Read by XLA when JAX first runs something, i.e. below.
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}"
  if args.eigen and not xla_cpu.use_eigen_convolutions():
    sys.exit('--eigen: XLA_FLAGS already sets the flag, or this jaxlib was not measured')
  if args.json:
    print(json.dumps(run(args.quick, args.threads)))
    return
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, '
        f"diffusers {diffusers.__version__}, {os.cpu_count()} cores, OMP_WAIT_POLICY="
        f"{os.environ['OMP_WAIT_POLICY']}, load average {os.getloadavg()[0]:.1f}")
  for r in run(args.quick, args.threads):
    print(f"{r['name']:22s} batch {r['batch']} {r['size']}x{r['size']} threads {r['threads']}: "
          f"wall JAX {r['jax_s'] * 1e3:7.0f} ms, PyTorch {r['torch_s'] * 1e3:7.0f} ms, "
          f"speedup {r['speedup']:5.2f}x | CPU time JAX {r['jax_cpu_s'] * 1e3:7.0f} ms, "
          f"PyTorch {r['torch_cpu_s'] * 1e3:7.0f} ms, ratio {r['cpu_speedup']:5.2f}x")


if __name__ == '__main__':
  main()
