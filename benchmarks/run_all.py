"""All benchmarks in one run: one table, written to docs/benchmarks.md with machine info.

    python -m benchmarks.run_all            # full sizes (~9 minutes on a 2-core CPU)
    python -m benchmarks.run_all --quick    # CI size, writes to --out (default: stdout only)

Rows, each a ratio measured side by side in this run:
  - UNet forward and forward+backward, our Flax port vs diffusers PyTorch
    (benchmarks/bench_unet.py), with XLA:CPU's default convolutions, in a
    subprocess with Eigen ones (att3d_jax/xla_cpu.py), and with the batch split
    over the host devices as main.py runs the train step; under each unsplit
    row, the UNet's convolutions alone, ours vs PyTorch's, and the bound they
    put on the UNet's speedup (PyTorch's whole UNet / our convolutions);
  - hash-grid encode forward and backward vs the jnp reference
    (benchmarks/bench_hashgrid.py);
  - the amortized train step of configs/shapes.py with the shipped shapes model:
    rendered frames/s with the CPU split into config.train.cpu_devices XLA
    devices as main.py does, the same step on one device (a subprocess), the
    time split into its parts (mapping network, render forward+backward,
    guidance UNet forward, optimizer) each timed as its own jitted function on
    one device, and achieved FLOP/s (XLA's cost analysis of the compiled
    step / its time) as a fraction of the FLOP/s of a large float32 matmul
    measured in the same run;
  - generation latency, prompt -> params -> one 64x64 render (bench_generate);
  - the generation CLI from a cold and from a warm persistent compilation cache
    (att3d_jax/compilation_cache.py), full mode only;
  - per-prompt SDS vs amortized: frames per prompt to first reach a GT silhouette
    IoU on the shapes Pig64 analog, read from the committed curves of
    experiments/quality_vs_compute.py (docs/results/quality_vs_compute.csv): two
    trainings of ~25 minutes each are no benchmark row, so that row cites its run.

    python -m benchmarks.run_all --gpu [--text_tables PATH]   # on a GPU/TPU machine

--gpu runs benchmarks/accelerator.py's rows instead (bfloat16 UNet vs diffusers PyTorch on
CUDA, an IF-I-XL-sized SDS step, the shapes train step) and writes docs/benchmarks_gpu.md
with the card's name; it refuses to run without an accelerator. benchmarks/
accelerator_check.sh runs it on a machine prepared by benchmarks/prepare_accelerator_check.sh.
--gpu --cpu_dry_run runs the same code at test sizes on the CPU (tests/test_accelerator.py).
"""

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from att3d_jax import build
from att3d_jax import prompt_data
from att3d_jax import sharding
from att3d_jax import xla_cpu
from att3d_jax.guidance import base as guidance_base
from att3d_jax.guidance import sds
from att3d_jax.nerf import cameras as cameras_lib
from configs import shapes as shapes_config
from experiments import common


def _median_seconds(fn, repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(quick: bool) -> float:
  """FLOP/s of a large float32 matmul: the machine's practical peak."""
  size = 1024 if quick else 4096
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  return 2.0 * size**3 / _median_seconds(lambda: matmul(a), 3)


def train_step_profile(quick: bool, guidance: guidance_base.Guidance | None = None) -> dict:
  """Frames/s of the shapes train step, its parts, and its FLOP/s; `guidance`: a prebuilt
  shapes guidance (benchmarks/accelerator.py's with precomputed text tables)."""
  config = shapes_config.get_config("quick" if quick else None)
  built = build.build(config, guidance=guidance)
  guidance, tables, model, state, mesh, step_fn, optimizer = (
      built.guidance, built.train_tables, built.model, built.state, built.mesh,
      built.train_step, built.optimizer)
  batch = jax.device_put(prompt_data.sample_batch(config, tables, 0),
                         sharding.data_sharding(mesh))
  key = jax.random.key(0)
  compiled = step_fn.lower(state, batch, key).compile()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # one dict per program in some jax versions
    cost = cost[0] if cost else {}
  flops = float(cost.get("flops", float("nan")))
  repeats = 3 if quick else 10
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step_fn(holder["state"], batch, key)
    return metrics

  step_s = _median_seconds(one_step, repeats)
  rows, views = config.batch.prompts_per_step, config.batch.views_per_prompt
  height, width = config.camera.height, config.camera.width
  params, stats = holder["state"]["params"], holder["state"]["stats"]

  # The parts, each its own jitted function of the same shapes.
  # Tables are any generator's pytree (hash-grid tables, triplanes).
  mapping_grad = jax.jit(jax.grad(lambda p: sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(
      model.apply_mapping(p, stats, batch["mapping_input"], batch["prompt_index"])[0].tables))))
  mapped, _ = model.apply_mapping(params, stats, batch["mapping_input"], batch["prompt_index"])
  cameras = cameras_lib.sample_cameras(key, views, config.camera.elevation_range_deg,
                                       config.camera.azimuth_range_deg,
                                       config.camera.distance_range,
                                       config.camera.fov_y_range_deg)
  rays = cameras_lib.generate_rays(cameras, height, width)
  flat = cameras_lib.Rays(rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3))

  def render_loss(mlp, tables_batch):
    render = lambda t: model.render_fn(mlp, t, None, key, guidance.background_color)(flat)["rgb"]
    return jnp.sum(jax.vmap(render)(tables_batch))

  render_grad = jax.jit(jax.grad(render_loss, argnums=(0, 1)))
  x = jnp.zeros((rows * views, 3, height, width), jnp.float32)
  text = jnp.asarray(batch["conditioning"][:, 0, 0])  # [B, L, D]
  text = jnp.repeat(text, views, axis=0)
  unet = jax.jit(lambda x: sds.sds_loss(guidance.eps_fn, x, key, text, guidance.uncond,
                                        alphas_cumprod=guidance.alphas_cumprod,
                                        guidance_scale=config.guidance.scale)[0])
  grads = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(lambda g, o, p: optax.apply_updates(p, optimizer.update(g, o, p)[0]))
  parts = {
      "mapping fwd+bwd": _median_seconds(lambda: mapping_grad(params), repeats),
      "render fwd+bwd": _median_seconds(lambda: render_grad(params["mlp"], mapped.tables),
                                        repeats),
      "guidance UNet fwd (CFG)": _median_seconds(lambda: unet(x), repeats),
      "optimizer": _median_seconds(lambda: update(grads, holder["state"]["opt_state"],
                                                  params), repeats),
  }
  return {"step_s": step_s, "frames_per_s": rows * views / step_s, "flops": flops,
          "flops_per_s": flops / step_s, "parts_s": parts,
          "rows": rows, "views": views, "size": f"{height}x{width}"}


QUALITY_VS_COMPUTE_CSV = os.path.join("docs", "results", "quality_vs_compute.csv")


def frames_to_iou_row(path: str = QUALITY_VS_COMPUTE_CSV,
                      target: float = 0.85) -> tuple[str, str, str, str] | None:
  """Amortized vs per-prompt frames per training prompt to reach IoU `target` (seen
  prompts), from the committed quality-vs-compute curves; None if they are absent."""
  if not os.path.exists(path):
    return None
  curves = {}
  with open(path) as f:
    for row in csv.DictReader(f):
      if row["split"] == "train":
        curves.setdefault(row["mapping"], []).append(
            (float(row["frames_per_prompt"]), float(row["iou"])))
  if not {"hypernet", "per_prompt"} <= curves.keys():
    return None
  amortized, per_prompt = (common.frames_to_reach(sorted(curves[k]), target)
                           for k in ("hypernet", "per_prompt"))
  show = lambda f: "not reached" if f is None else f"{f:.0f} frames/prompt"
  ratio = (f"{per_prompt / amortized:.2f}x fewer frames"
           if amortized and per_prompt else "")
  return (f"frames per prompt to seen IoU {target} (amortized vs per-prompt, "
          f"from {path})", show(amortized), f"per-prompt {show(per_prompt)}", ratio)


def _json_result(command: list[str], env: dict[str, str] | None = None):
  """Runs a benchmark script in its own process; the JSON of its last output line."""
  out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def one_device_step_seconds() -> float:
  """bench_train_step's median step time with the CPU as one XLA device."""
  env = dict(os.environ, XLA_FLAGS=f"{xla_cpu.HOST_DEVICES_FLAG}=1")
  return _json_result([sys.executable, os.path.join("benchmarks", "bench_train_step.py")],
                      env)["step_ms"] / 1000.0


def _unet_row(row: dict, variant: str) -> tuple[str, str, str, str]:
  """One bench_unet measurement as a table row; `variant` names the XLA setting."""
  kind = row['name'].removeprefix('unet_').replace('_', '+').replace('+bf', ' bf')
  name = (f"UNet {kind}{variant} (IF-style, batch {row['batch']}, "
          f"{row['size']}x{row['size']})")
  return (name, f"{1000 * row['jax_s']:.0f} ms",
          f"diffusers PyTorch {1000 * row['torch_s']:.0f} ms", f"{row['speedup']:.2f}x")


def _convolutions_row(row: dict) -> tuple[str, str, str, str]:
  """The convolutions of a bench_unet measurement alone, and the bound they put on
  the UNet's speedup: PyTorch's whole pass over our convolutions alone."""
  return (f"  its {row['convolutions']} convolutions alone; bound = PyTorch's whole "
          "UNet / our convolutions",
          f"{1000 * row['convolutions_jax_s']:.0f} ms",
          f"PyTorch {1000 * row['convolutions_torch_s']:.0f} ms (whole UNet "
          f"{1000 * row['torch_s']:.0f} ms)",
          f"{row['convolutions_torch_s'] / row['convolutions_jax_s']:.2f}x "
          f"(bound {row['speedup_bound']:.2f}x)")


def eigen_unet_rows(quick: bool) -> list[dict]:
  """bench_unet's rows with `xla_cpu.use_eigen_convolutions()`, in a subprocess
  (the flag is read once per process, when JAX starts)."""
  command = [sys.executable, "-m", "benchmarks.bench_unet", "--eigen", "--json"]
  return _json_result(command + (["--quick"] if quick else []))


def cli_startup_seconds() -> tuple[float, float]:
  """Wall seconds of one `python -m att3d_jax.generate` call, with an empty and then
  with the warm persistent compilation cache it filled."""
  times = []
  with tempfile.TemporaryDirectory() as folder:
    command = [sys.executable, "-m", "att3d_jax.generate", "--prompt=a red cube",
               f"--out={folder}/out", f"--compilation_cache={folder}/cache"]
    for _ in range(2):
      start = time.perf_counter()
      subprocess.run(command, check=True, capture_output=True)
      times.append(time.perf_counter() - start)
  return times[0], times[1]


def run(quick: bool) -> list[tuple[str, str, str, str]]:
  """(benchmark, ours, reference, ratio) rows of the CPU benchmark."""
  from benchmarks import bench_generate  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_hashgrid  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_unet  # pylint: disable=g-import-not-at-top
  table = []
  unet_runs = [("", bench_unet.run(quick))]
  # The same UNet with XLA:CPU's convolutions on Eigen, side by side.
  unet_runs.append((", Eigen convolutions", eigen_unet_rows(quick)))
  if len(jax.devices()) > 1:  # main() split the host, as main.py does
    split = bench_unet.run(quick, split_batch=True)
    unet_runs.append((f", batch split over {split[0]['devices']} host devices", split))
  for variant, rows in unet_runs:
    for row in rows:
      table.append(_unet_row(row, variant))
      if row.get("convolutions_torch_s") is not None:
        table.append(_convolutions_row(row))
  hashgrid_rows = bench_hashgrid.run(quick)
  by_pass = {}
  for row in hashgrid_rows:
    by_pass.setdefault(row["pass_name"], {})[row["implementation"]] = row
  for pass_name, rows in by_pass.items():
    ours, reference = rows["encode"], rows["encode_reference"]
    table.append((f"hash grid {pass_name} ({ours['num_points']} points x "
                  f"{ours['num_levels']} levels)", f"{ours['points_per_s']:.3g} pts/s",
                  f"jnp reference {reference['points_per_s']:.3g} pts/s",
                  f"{ours['speedup_vs_reference']:.2f}x"))
  peak = matmul_peak(quick)
  profile = train_step_profile(quick)
  table.append((f"train step, configs/shapes.py{':quick' if quick else ''} "
                f"({profile['rows']} prompts x {profile['views']} views, {profile['size']})",
                f"{profile['frames_per_s']:.1f} frames/s ({1000 * profile['step_s']:.0f} ms/step)",
                "", ""))
  if not quick:
    one_device = one_device_step_seconds()
    table.append((f"  the same step on one host device (main.py splits the CPU into "
                  f"{len(jax.devices())}: config.train.cpu_devices)",
                  f"{1000 * profile['step_s']:.0f} ms/step",
                  f"one device {1000 * one_device:.0f} ms",
                  f"{one_device / profile['step_s']:.2f}x"))
  for part, seconds in profile["parts_s"].items():
    table.append((f"  part: {part}", f"{1000 * seconds:.0f} ms",
                  f"step {1000 * profile['step_s']:.0f} ms",
                  f"{seconds / profile['step_s']:.0%} of the step"))
  table.append(("  achieved FLOP/s (XLA cost analysis / step time)",
                f"{profile['flops_per_s'] / 1e9:.2f} GFLOP/s",
                f"float32 matmul {peak / 1e9:.1f} GFLOP/s", f"{profile['flops_per_s'] / peak:.1%}"))
  if os.path.isdir(os.path.join("weights", "att3d_shapes")):
    latency = bench_generate.run(repeats=5 if quick else 20)
    table.append(("generation: prompt -> params -> one 64x64 render (median)",
                  f"{latency['total_ms_median']:.1f} ms",
                  f"mesh 64^3 {latency['mesh_ms_median']:.0f} ms", ""))
    if not quick:
      cold, warm = cli_startup_seconds()
      table.append(("`python -m att3d_jax.generate --prompt=...` wall time, warm "
                    "compilation cache", f"{warm:.1f} s", f"cold cache {cold:.1f} s",
                    f"{cold / warm:.2f}x"))
  row = frames_to_iou_row()
  if row is not None:
    table.append(row)
  return table


def machine_info() -> str:
  return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}, jax {jax.__version__} "
          f"({jax.default_backend()}), {datetime.date.today()}")


def to_markdown(table, info: str, command: str, title: str = "Benchmarks") -> str:
  lines = [f"# {title}", "", f"Machine: {info}", "", f"Command: `{command}`", "",
           "| benchmark | ours | reference | ratio |", "|---|---|---|---|"]
  lines += [f"| {' | '.join(row)} |" for row in table]
  return "\n".join(lines) + "\n"


def accelerator_main(args) -> None:
  """--gpu: benchmarks/accelerator.py's rows, docs/benchmarks_gpu.md."""
  # Each row runs in its own process, PyTorch next to JAX in one of them: JAX must not
  # reserve most of the device's memory up front, here or there.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top
  if args.quick:
    sys.exit("--gpu and --quick are exclusive")
  if jax.default_backend() not in ("gpu", "tpu") and not args.cpu_dry_run:
    sys.exit(f"--gpu: JAX sees no GPU or TPU (backend {jax.default_backend()!r}, devices "
             f"{jax.devices()}); install jax with CUDA (or TPU) support on a machine with one "
             "(bash install.sh --gpu)")
  device = jax.devices()[0]
  print(f"--gpu on {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}",
        file=sys.stderr, flush=True)
  table = accelerator.run(tiny=args.cpu_dry_run, text_tables=args.text_tables)
  info = f"{device.device_kind} ({len(jax.devices())} devices); host: {machine_info()}"
  if args.cpu_dry_run:
    info += "; CPU DRY RUN at test sizes: its numbers measure nothing"
  command = "python -m benchmarks.run_all --gpu" + (
      f" --text_tables {args.text_tables}" if args.text_tables else "") + (
          " --cpu_dry_run" if args.cpu_dry_run else "")
  markdown = to_markdown(table, info, command, title="Benchmarks on an accelerator")
  print(markdown, flush=True)
  out = args.out or (None if args.cpu_dry_run else os.path.join("docs", "benchmarks_gpu.md"))
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(markdown)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="CI sizes")
  parser.add_argument("--gpu", action="store_true",
                      help="the accelerator benchmark on the default GPU/TPU "
                           "(benchmarks/accelerator.py); writes docs/benchmarks_gpu.md")
  parser.add_argument("--text_tables", default=None,
                      help="--gpu: the shapes text tables written by "
                           "`python -m benchmarks.accelerator --save_text_tables` (for a "
                           "machine without the MiniLM package)")
  parser.add_argument("--cpu_dry_run", action="store_true",
                      help="--gpu: run its rows at test sizes on any backend (a test of the "
                           "code path; writes only to --out)")
  parser.add_argument("--out", default=None,
                      help="markdown file (default: docs/benchmarks.md, docs/benchmarks_gpu.md "
                           "with --gpu, none with --quick or --cpu_dry_run)")
  args = parser.parse_args()
  if args.gpu:
    accelerator_main(args)
    return
  if args.cpu_dry_run or args.text_tables:
    sys.exit("--cpu_dry_run and --text_tables go with --gpu")
  xla_cpu.split_host(shapes_config.get_config().train.cpu_devices)  # before JAX starts
  table = run(args.quick)
  command = "python -m benchmarks.run_all" + (" --quick" if args.quick else "")
  markdown = to_markdown(table, machine_info(), command)
  print(markdown)
  out = args.out or (None if args.quick else os.path.join("docs", "benchmarks.md"))
  if out:
    with open(out, "w") as f:
      f.write(markdown)


if __name__ == "__main__":
  main()
