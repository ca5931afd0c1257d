r"""Train-step speed of configs/shapes.py with the shipped shapes model.

    python benchmarks/bench_train_step.py [--steps=15]

Builds the run with `att3d_jax.build.build` (the train loop's setup), splits
the CPU into config.train.cpu_devices XLA devices as main.py does, compiles
the step once, then reports the median wall time of the next --steps steps
(each on its own batch) and the rendered frames/s (B x V / step time). The
JSON line is the result.
"""

import argparse
import json
import os
import statistics
import sys
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=15, help="timed steps after compiling")
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

  built = build.build(config)
  state, step_fn = built.state, built.train_step
  key = jax.random.key(0)
  batches = [jax.device_put(prompt_data.sample_batch(config, built.train_tables, i),
                            sharding.data_sharding(built.mesh))
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
  print(json.dumps({"step_ms": round(1e3 * seconds, 1),
                    "frames_per_s": round(frames / seconds, 2), "steps": args.steps}))


if __name__ == "__main__":
  main()
