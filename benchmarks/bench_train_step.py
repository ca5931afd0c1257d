r"""Train-step speed of configs/shapes.py with the shipped shapes model.

    python benchmarks/bench_train_step.py [--steps=15]
    python benchmarks/bench_train_step.py --kinds=hypernet,triplane --prompt_set=shapes_2400

Builds the run with `att3d_jax.build.build` (the train loop's setup), splits
the CPU into config.train.cpu_devices XLA devices as main.py does, compiles
the step once, then reports the median wall time of the next --steps steps
(each on its own batch) and the rendered frames/s (B x V / step time). The
JSON line is the result; with several --kinds (mapping kinds, built in one
process and timed step by step in turn, so that they share the machine's
load) one line per kind, in that order.
"""

import argparse
import json
import os
import statistics
import sys
import time


def _memoized_text(guidance):
  """guidance with encode and embed cached per list of strings."""
  def memoized(fn):
    cache = {}

    def cached(strings):
      key = tuple(strings)
      if key not in cache:
        cache[key] = fn(strings)
      return cache[key]
    return cached
  return guidance._replace(encode=memoized(guidance.encode), embed=memoized(guidance.embed))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=15, help="timed steps after compiling")
  parser.add_argument("--kinds", default="",
                      help="comma-separated mapping kinds (default: the config's)")
  parser.add_argument("--prompt_set", default="", help="config.prompts.set (default: the config's)")
  args = parser.parse_args()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, repo)
  os.chdir(repo)  # prompt sets and the guidance model are found relative to the repo

  from att3d_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  from configs import shapes  # pylint: disable=g-import-not-at-top

  config = shapes.get_config(None)
  xla_cpu.split_host(config.train.cpu_devices)  # before JAX starts
  import jax  # pylint: disable=g-import-not-at-top

  from att3d_jax import build  # pylint: disable=g-import-not-at-top
  from att3d_jax import prompt_data  # pylint: disable=g-import-not-at-top
  from att3d_jax import sharding  # pylint: disable=g-import-not-at-top

  if args.prompt_set:
    config.prompts.set = args.prompt_set
  kinds = args.kinds.split(",") if args.kinds else [config.mapping.kind]
  runs, guidance = [], None
  for kind in kinds:
    kind_config = config.copy_and_resolve_references()
    kind_config.mapping.kind = kind
    built = build.build(kind_config, guidance=guidance)
    guidance = guidance or _memoized_text(built.guidance)  # encode each prompt set once
    batches = [jax.device_put(prompt_data.sample_batch(kind_config, built.train_tables, i),
                              sharding.data_sharding(built.mesh))
               for i in range(args.steps + 1)]
    runs.append({"kind": kind, "state": built.state, "step_fn": built.train_step,
                 "batches": batches, "times": []})
  key = jax.random.key(0)
  for run in runs:  # compiles
    run["state"], metrics = run["step_fn"](run["state"], run["batches"][0], key)
    jax.block_until_ready(metrics)
  for step in range(1, args.steps + 1):
    for run in runs:
      start = time.perf_counter()
      run["state"], metrics = run["step_fn"](run["state"], run["batches"][step], key)
      jax.block_until_ready(metrics)
      run["times"].append(time.perf_counter() - start)
  frames = config.batch.prompts_per_step * config.batch.views_per_prompt
  for run in runs:
    seconds = statistics.median(run["times"])
    row = {"step_ms": round(1e3 * seconds, 1), "frames_per_s": round(frames / seconds, 2),
           "steps": args.steps}
    print(json.dumps({"kind": run["kind"], **row} if args.kinds else row))

if __name__ == "__main__":
  main()
