"""The rows of `python -m benchmarks.run_all --gpu`: the accelerator benchmark.

Three groups, each measured in its own process (one failure, crash or out-of-memory is
recorded in its row and the others still run; each has a time limit, and what it finished
before the limit is kept):

  unet_vs_pytorch: the UNet forward and forward+backward in bfloat16, the Flax port vs
      diffusers PyTorch on CUDA, same config and weights (bench_unet.run_accelerator), with
      XLA's attention and with cuDNN's fused attention.
  if_xl_sds: one SDS step of a DeepFloyd IF-I-XL-sized guidance model (IF_I_XL_CONFIG,
      4.30B random parameters in bfloat16): the UNet forward of the 2 x frames CFG batch and
      the SDS gradient w.r.t. the renders, in frames/s, with the device's peak memory.
  shapes_train_step: the amortized train step of configs/shapes.py in frames/s
      (run_all.train_step_profile). Its text tables come from MiniLM where that package is
      installed, else from a file `save_text_tables` wrote (--text_tables): the accelerator
      machine has no network and the MiniLM weights are too large to carry.

    python -m benchmarks.accelerator --row if_xl_sds [--tiny]   # one group, JSON lines

`--tiny` (run_all's --cpu_dry_run) runs the same code at test sizes on any backend, so that a
CPU test exercises every line the accelerator run will.
"""

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time
import traceback

import numpy as np

# A row: (benchmark, ours, reference, ratio), as in run_all's table.
Row = tuple[str, str, str, str]

# DeepFloyd IF-I-XL's structure (diffusers UNet2DConditionModel): Simple* added-KV blocks at
# the three lower resolutions, 3 resnets per level, scale-shift resnets, T5-XXL's 4096-wide
# text projected by encoder_hid_proj, a text addition embedding with 64 pooling heads, and
# learned variance (6 output channels). Its config.json is not at hand offline: the base
# width 704 (x1, 2, 3, 4) gives 4.30B parameters, the model card's 4.3B.
IF_I_XL_CONFIG = dict(
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3,
    block_out_channels=(704, 1408, 2112, 2816), cross_attention_dim=2816,
    attention_head_dim=64, encoder_hid_dim=4096, encoder_hid_dim_type='text_proj',
    addition_embed_type='text', addition_embed_type_num_heads=64,
    down_block_types=('ResnetDownsampleBlock2D',) + ('SimpleCrossAttnDownBlock2D',) * 3,
    mid_block_type='UNetMidBlock2DSimpleCrossAttn',
    up_block_types=('SimpleCrossAttnUpBlock2D',) * 3 + ('ResnetUpsampleBlock2D',),
    resnet_time_scale_shift='scale_shift', resnet_skip_time_act=True,
    resnet_out_scale_factor=math.sqrt(2), act_fn='gelu', time_embedding_act_fn='gelu',
    cross_attention_norm='group_norm', norm_num_groups=32)
SDS_FRAMES = 8  # configs/df27.py's 8 prompts x 1 view per step
T5_LENGTH = 77

# Seconds each group may take on the accelerator (process start and compilation included):
# 430 s in all, so that benchmarks/accelerator_check.sh stays under 8 minutes. Rows are kept
# as they finish, so a group stopped at its limit loses only its last ones. A CPU dry run
# gets more time.
TIME_LIMITS_S = {'unet_vs_pytorch': 160, 'if_xl_sds': 170, 'shapes_train_step': 100}
TINY_TIME_LIMIT_S = 900


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def memory_note() -> str:
  """The device's peak memory in use (where the backend reports it) and the process's
  peak host memory."""
  host_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return f"device peak {stats['peak_bytes_in_use'] / 2**30:.1f} GiB, host peak {host_gib:.1f} GiB"
  return f'host peak {host_gib:.1f} GiB'


# ----------------------------------------------------------------------------------------
# The groups; each yields rows as it measures them.


def unet_vs_pytorch_rows(tiny: bool, text_tables: str | None):
  del text_tables
  from benchmarks import bench_unet  # pylint: disable=g-import-not-at-top
  for result in bench_unet.run_accelerator(tiny=tiny, log=log):
    kind = result['name'].removeprefix('unet_').replace('_', '+')
    yield (f"UNet {kind} bf16, attention={result['attention']} "
           f"({'test-size IF-style' if tiny else 'IF-I-XL structure at base width 256'}, "
           f"{result['params'] / 1e6:.0f}M params, batch {result['batch']}, "
           f"{result['size']}x{result['size']}; first call {result['compile_s']:.0f} s)",
           f"{1000 * result['jax_s']:.1f} ms",
           f"diffusers PyTorch {result['torch_device']} bf16 {1000 * result['torch_s']:.1f} ms",
           f"{result['speedup']:.2f}x")


def if_xl_sds_rows(tiny: bool, text_tables: str | None):
  del text_tables
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from att3d_jax.guidance import schedule  # pylint: disable=g-import-not-at-top
  from att3d_jax.guidance import sds  # pylint: disable=g-import-not-at-top
  from att3d_jax.guidance import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_unet  # pylint: disable=g-import-not-at-top

  config = unet_lib.UNetConfig(**(bench_unet.CONFIG if tiny else IF_I_XL_CONFIG))
  frames, size, repeats = (2, 32, 2) if tiny else (SDS_FRAMES, 64, 10)
  dtype = jnp.bfloat16
  shapes = unet_lib.param_shapes(unet_lib.UNet2DConditionModel(config, dtype, dtype))
  flat_shapes = traverse_util.flatten_dict(shapes)
  num_params = sum(math.prod(leaf.shape) for leaf in flat_shapes.values())

  # One small jitted draw per distinct shape (one jit over all ~700 leaves compiles for a
  # minute): kernels ~ N(0, 1/fan_in), norm scales 1, biases 0, so activations stay O(1).
  @functools.partial(jax.jit, static_argnums=1)
  def draw(key, shape):
    return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(math.prod(shape[:-1]))
            ).astype(dtype)

  def random_params(key):
    keys = jax.random.split(key, len(flat_shapes))
    return traverse_util.unflatten_dict({
        path: draw(leaf_key, leaf.shape) if len(leaf.shape) > 1 else
        (jnp.ones if path[-1] == 'scale' else jnp.zeros)(leaf.shape, dtype)
        for leaf_key, (path, leaf) in zip(keys, flat_shapes.items())})

  start = time.perf_counter()
  params = jax.block_until_ready(random_params(jax.random.key(0)))
  log(f'  {num_params / 1e9:.2f}B random bf16 params in {time.perf_counter() - start:.0f} s')
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod_from_config(
      dict(beta_schedule='squaredcos_cap_v2')), jnp.float32)  # IF's schedule
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(0, 1, (frames, size, size, 3)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((frames, T5_LENGTH, config.context_dim)), dtype)
  uncond = jnp.zeros((1, T5_LENGTH, config.context_dim), dtype)
  on_gpu = jax.default_backend() == 'gpu'
  for attention in ('xla', 'cudnn' if on_gpu else 'dot_product'):
    module = unet_lib.UNet2DConditionModel(config, dtype, dtype, attention=attention)

    @jax.jit
    def sds_gradient(params, images, key, module=module):
      eps_fn = lambda noisy, t, context: module.apply({'params': params}, noisy, t, context)
      loss = lambda images: sds.sds_loss(
          eps_fn, sds.pixel_model_input(images, size),
          key, text, uncond, alphas_cumprod=alphas_cumprod, guidance_scale=70.0)[0]
      return jax.grad(loss)(images)

    key = jax.random.key(1)
    start = time.perf_counter()
    jax.block_until_ready(sds_gradient(params, images, key))
    compile_s = time.perf_counter() - start
    times = []
    for step in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(sds_gradient(params, images, jax.random.fold_in(key, step)))
      times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    log(f'  SDS step attention={attention}: {1000 * step_s:.1f} ms (first call {compile_s:.0f} s)')
    yield (f'SDS step, {"test-size IF-style" if tiny else "IF-I-XL-sized"} random guidance '
           f'({num_params / 1e9:.2f}B params, bf16, '
           f'attention={attention}; {frames} frames at {size}x{size}, CFG batch {2 * frames}; '
           f'first call {compile_s:.0f} s)',
           f'{frames / step_s:.1f} frames/s ({1000 * step_s:.0f} ms/step)', memory_note(), '')


def shapes_train_step_rows(tiny: bool, text_tables: str | None):
  from benchmarks import run_all  # pylint: disable=g-import-not-at-top
  from configs import shapes as shapes_config  # pylint: disable=g-import-not-at-top
  config = shapes_config.get_config('quick' if tiny else None)
  guidance = None if text_tables is None else table_guidance(config, text_tables)
  profile = run_all.train_step_profile(tiny, guidance)
  source = 'MiniLM' if text_tables is None else f'text tables {os.path.basename(text_tables)}'
  yield (f"train step, configs/shapes.py{':quick' if tiny else ''} ({profile['rows']} prompts x "
         f"{profile['views']} views, {profile['size']}; text from {source})",
         f"{profile['frames_per_s']:.1f} frames/s ({1000 * profile['step_s']:.0f} ms/step)",
         memory_note(), '')
  for part, seconds in profile['parts_s'].items():
    yield (f'  part: {part}', f'{1000 * seconds:.1f} ms', f"step {1000 * profile['step_s']:.1f} ms",
           f"{seconds / profile['step_s']:.0%} of the step")


GROUPS = {'unet_vs_pytorch': unet_vs_pytorch_rows, 'if_xl_sds': if_xl_sds_rows,
          'shapes_train_step': shapes_train_step_rows}


# ----------------------------------------------------------------------------------------
# Text tables of the shapes prompts, for machines without the MiniLM package.


def _captions(config) -> list[str]:
  """What prompt_data.prompt_tables encodes for `config`: each train prompt, then each
  prompt with each view suffix."""
  from att3d_jax import prompt_data  # pylint: disable=g-import-not-at-top
  from att3d_jax.nerf import cameras  # pylint: disable=g-import-not-at-top
  prompts = prompt_data.load_prompts(config).train
  return prompts + [p + cameras.view_suffix(v) for p in prompts for v in cameras.VIEW_LABELS]


def save_text_tables(path: str) -> None:
  """Encodes the captions of configs/shapes.py (full and quick) with the shapes guidance's
  MiniLM and saves them, float16, to `path` (.npz: captions [N], conditioning [N, L, D])."""
  from att3d_jax import build  # pylint: disable=g-import-not-at-top
  from configs import shapes as shapes_config  # pylint: disable=g-import-not-at-top
  configs = [shapes_config.get_config(arg) for arg in (None, 'quick')]
  captions = list(dict.fromkeys(c for config in configs for c in _captions(config)))
  conditioning = build.load_guidance(configs[0]).encode(captions)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, captions=np.asarray(captions, np.str_),
           conditioning=np.asarray(conditioning, np.float16))


def table_guidance(config, path: str):
  """config's shapes guidance with `encode`/`embed` read from a `save_text_tables` file
  (what they would compute, as float16) instead of MiniLM."""
  from att3d_jax.shapes import diffusion  # pylint: disable=g-import-not-at-top
  with np.load(path) as data:
    table = dict(zip(data['captions'].tolist(), data['conditioning'].astype(np.float32)))

  def encode(captions):
    missing = [c for c in captions if c not in table]
    if missing:
      raise KeyError(f'{len(missing)} captions are not in the text tables {path!r} (e.g. '
                     f'{missing[0]!r}); rerun benchmarks/prepare_accelerator_check.sh.')
    return np.stack([table[c] for c in captions])

  model = diffusion.ShapesDiffusionModel(config.guidance.path)
  token_shape = next(iter(table.values())).shape  # [1 + max_length, width]
  return diffusion.as_guidance(model, encode, token_shape)


# ----------------------------------------------------------------------------------------
# The driver: each group in a subprocess.


def _error_row(group: str, message: str) -> Row:
  return (f'{group}: FAILED', message.replace('|', '/').replace('\n', ' ')[-300:], '', '')


def run(tiny: bool = False, text_tables: str | None = None) -> list[Row]:
  """Every group in its own `python -m benchmarks.accelerator` process; their rows, and an
  error row for a group that failed or ran out of time."""
  table = []
  for group in GROUPS:
    limit = TINY_TIME_LIMIT_S if tiny else TIME_LIMITS_S[group]
    command = [sys.executable, '-m', 'benchmarks.accelerator', f'--row={group}']
    command += ['--tiny'] if tiny else []
    command += [f'--text_tables={text_tables}'] if text_tables else []
    log(f'[{time.strftime("%H:%M:%S")}] {group} (limit {limit} s)')
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # stderr: the log
    try:
      stdout, _ = process.communicate(timeout=limit)
      failure = None if process.returncode == 0 else f'exit status {process.returncode}'
    except subprocess.TimeoutExpired:
      process.kill()
      stdout, _ = process.communicate()
      failure = f'stopped at its time limit of {limit} s'
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]
    for row in rows:
      table.append(_error_row(group, row['error']) if 'error' in row else tuple(row['row']))
    if failure and not any('error' in row for row in rows):
      table.append(_error_row(group, failure))
    log(f'  {group}: {len(rows)} rows in {time.perf_counter() - start:.0f} s'
        + (f' ({failure})' if failure else ''))
  return table


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--row', choices=sorted(GROUPS), help='the group to measure')
  parser.add_argument('--tiny', action='store_true', help='test sizes (any backend)')
  parser.add_argument('--text_tables', default=None, help='save_text_tables file')
  parser.add_argument('--save_text_tables', default=None, metavar='PATH',
                      help='write the shapes text tables to PATH (needs MiniLM) and exit')
  args = parser.parse_args()
  if args.save_text_tables:
    save_text_tables(args.save_text_tables)
    return
  if args.row is None:
    parser.error('--row or --save_text_tables is required')
  try:
    for row in GROUPS[args.row](args.tiny, args.text_tables):
      print(json.dumps({'row': row}), flush=True)
  except Exception as error:  # pylint: disable=broad-except
    traceback.print_exc()
    print(json.dumps({'error': f'{type(error).__name__}: {error}'}), flush=True)
    sys.exit(1)


if __name__ == '__main__':
  main()
