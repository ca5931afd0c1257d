r"""Train-step speed of configs/shapes.py for this checkout or an older one: the
before/after table of a speedup, measured side by side.

    git worktree add /tmp/before <rev>
    for repo in /tmp/before .; do
      python benchmarks/bench_train_step.py --repo=$repo --guidance_path=weights/shapes
    done

Each call imports att3d_jax and configs from --repo (so run it as a script, not
with -m, and one process per checkout), compiles the step once, then reports
the median wall time of the next --steps steps (each on its own batch) and the
rendered frames/s (B x V / step time). The guidance model is read from
--guidance_path, which older checkouts may not ship. The JSON line is the result.
"""

import argparse
import json
import os
import statistics
import sys
import time


def build_step(config, guidance=None):
  """(guidance, tables, model, state, mesh, jitted step, optimizer) of `config`, with
  the att3d_jax found on sys.path; works with the first version's API too. `guidance`:
  a prebuilt one instead of config's (e.g. with precomputed text tables)."""
  from att3d_jax import train  # pylint: disable=g-import-not-at-top
  from att3d_jax.amortize import model as model_lib  # pylint: disable=g-import-not-at-top
  guidance = train.load_guidance(config) if guidance is None else guidance
  tables = train.prompt_tables(guidance, train.load_prompts(config).train)
  model = model_lib.ATT3DModel.from_config(config, num_train_prompts=len(tables.prompts),
                                           embedding_dim=tables.embedding.shape[1])
  state, optimizer = train.init_state(config, model, tables.embedding)
  mesh = train.make_mesh(config)
  step_fn = train.make_train_step(config, model, guidance, optimizer)
  if hasattr(train, "place_state"):
    state = train.place_state(state, mesh)
    step_fn = train.jit_train_step(step_fn, mesh, state)
  else:  # the first version (e397c91): replicated state, no shardings argument
    state = train.replicate(state, mesh)
    step_fn = train.jit_train_step(step_fn, mesh)
  return guidance, tables, model, state, mesh, step_fn, optimizer


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repo", default=".", help="checkout whose att3d_jax is timed")
  parser.add_argument("--guidance_path", default="weights/shapes",
                      help="the shapes guidance model (diffusers folder)")
  parser.add_argument("--steps", type=int, default=15, help="timed steps after compiling")
  args = parser.parse_args()
  guidance_path = os.path.abspath(args.guidance_path)
  repo = os.path.abspath(args.repo)
  sys.path.insert(0, repo)
  os.chdir(repo)  # prompt sets and configs are found relative to the checkout

  import jax  # pylint: disable=g-import-not-at-top
  from att3d_jax import train  # pylint: disable=g-import-not-at-top
  from configs import shapes  # pylint: disable=g-import-not-at-top

  config = shapes.get_config(None)
  config.guidance.path = guidance_path
  if "cpu_devices" in config.train:  # as main.py runs it (later versions than e397c91)
    from att3d_jax import xla_cpu  # pylint: disable=g-import-not-at-top
    xla_cpu.split_host(config.train.cpu_devices)
  _, tables, _, state, mesh, step_fn, _ = build_step(config)
  key = jax.random.key(0)
  batches = [jax.device_put(train.sample_batch(config, tables, i), train.data_sharding(mesh))
             for i in range(args.steps + 1)]
  state, metrics = step_fn(state, batches[0], key)  # compiles
  jax.block_until_ready(metrics)
  times = []
  for batch in batches[1:]:
    start = time.perf_counter()
    state, metrics = step_fn(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  frames = config.batch.prompts_per_step * config.batch.views_per_prompt
  print(json.dumps({"repo": repo, "step_ms": round(1e3 * seconds, 1),
                    "frames_per_s": round(frames / seconds, 2), "steps": args.steps}))


if __name__ == "__main__":
  main()
