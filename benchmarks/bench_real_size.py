"""Real architectures at real size, random weights: the train step of configs/df27.py with a
full-size guidance UNet, on the CPU.

    python -m benchmarks.bench_real_size --kind=if --folder=/path/to/pipeline [--steps 3]

`--folder` is a diffusers pipeline folder (unet/, scheduler/, tokenizer/, text_encoder/, and
vae/ for "sd"); tests/test_real_size.py builds them from SD21_BASE_CONFIG (Stable Diffusion
2.1-base, 865.9M parameters) and if_i_xl_config(width) (DeepFloyd IF-I-XL's structure at a
reduced width), checks their parity with diffusers, and runs this script on them. It runs
`--steps` steps of `configs/df27.py:quick` (2 prompts x 1 view at 64x64, float32 on the
CPU) with that guidance and prints one JSON line: the compile time, the wall time of each
step, the host memory after each stage, the process's peak host memory and XLA's memory
analysis of the compiled step.
"""

import argparse
import json
import resource
import tempfile
import time

import jax

from att3d_jax import build
from att3d_jax import prompt_data
from att3d_jax import sharding
from benchmarks import accelerator
from configs import df27 as df27_config

# stabilityai/stable-diffusion-2-1-base unet/config.json (the fields that differ from
# diffusers' defaults): 865.9M parameters.
SD21_BASE_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    use_linear_projection=True, act_fn='silu', norm_num_groups=32, norm_eps=1e-5,
    down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
    up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3)


def if_i_xl_config(base_width: int) -> dict:
  """accelerator.IF_I_XL_CONFIG (4.30B parameters at base width 704) at `base_width`: the
  same blocks, text projection from 4096, 64 pooling heads, scale-shift resnets and learned
  variance; 64-wide attention heads."""
  widths = tuple(base_width * m for m in (1, 2, 3, 4))
  return dict(accelerator.IF_I_XL_CONFIG, block_out_channels=widths,
              cross_attention_dim=widths[-1])


def _rss_gib() -> float:
  """The process's resident memory now (Linux)."""
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 2**20


def train_steps(kind: str, folder: str, steps: int = 3, rows: int | None = None) -> dict:
  """Wall seconds of `steps` train steps of df27:quick with the guidance in `folder` (the
  first call compiles), host memory after each stage and XLA's memory analysis of the
  compiled step (GiB). `rows`: prompts per step instead of the config's 2."""
  config = df27_config.get_config('quick')
  if rows is not None:
    config.batch.prompts_per_step = rows
  config.guidance.kind = kind
  config.guidance.path = config.guidance.text_encoder_path = folder
  config.guidance.cache_dir = tempfile.mkdtemp()
  config.train.progress_bar = False
  rss = {'start': _rss_gib()}
  guidance = build.load_guidance(config)
  rss['guidance loaded'] = _rss_gib()
  built = build.build(config, guidance=guidance)
  tables, state, mesh, step_fn = built.train_tables, built.state, built.mesh, built.train_step
  key = jax.random.key(0)
  batches = [jax.device_put(prompt_data.sample_batch(config, tables, step),
                           sharding.data_sharding(mesh)) for step in range(steps)]
  start = time.perf_counter()
  compiled = step_fn.lower(state, batches[0], key).compile()
  compile_s = time.perf_counter() - start
  rss['compiled'] = _rss_gib()
  analysis = compiled.memory_analysis()
  xla_gib = {name: getattr(analysis, f'{name}_size_in_bytes') / 2**30
             for name in ('argument', 'output', 'temp', 'generated_code')}
  times = []
  for step, batch in enumerate(batches):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, jax.random.fold_in(key, step))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  rss['after steps'] = _rss_gib()
  return dict(kind=kind, compile_s=compile_s, step_s=times, rows=config.batch.prompts_per_step,
              views=config.batch.views_per_prompt, size=config.camera.height,
              dtype=config.guidance.dtype, devices=len(jax.devices()), rss_gib=rss, xla_gib=xla_gib,
              peak_host_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kind', choices=('if', 'sd'), required=True)
  parser.add_argument('--folder', required=True, help='diffusers pipeline folder')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--rows', type=int, default=None, help='prompts per step (default 2)')
  args = parser.parse_args()
  print(json.dumps(train_steps(args.kind, args.folder, args.steps, args.rows)), flush=True)


if __name__ == '__main__':
  main()
