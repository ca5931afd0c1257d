r"""Train-step speed of configs/shapes.py with the shipped shapes model.

    python benchmarks/bench_train_step.py [--steps=15]
    python benchmarks/bench_train_step.py --kinds=hypernet,triplane --prompt_set=shapes_2400
    python benchmarks/bench_train_step.py --config=configs/shapes_2400.py \
        --variants="mapping.hidden_width=32;mapping.hidden_width=128"

Builds the run with `att3d_jax.build.build` (the train loop's setup), splits
the CPU into config.train.cpu_devices XLA devices as main.py does, compiles
the step once, then reports the median wall time of the next --steps steps
(each on its own batch) and the rendered frames/s (B x V / step time). The
JSON line is the result. With several --variants (each a comma-separated
list of config overrides; --kinds=a,b is short for
--variants="mapping.kind=a;mapping.kind=b"), all are built in one process and
timed step by step in turn, so that they share the machine's load: one line
per variant, in that order.
"""

import argparse
import ast
import importlib.util
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


def _apply_overrides(config, overrides: str):
  """Sets "a.b=1,c.d=x" on a ConfigDict (values parsed as Python literals,
  else kept as strings); returns the resolved copy."""
  config = config.copy_and_resolve_references()
  for override in filter(None, overrides.split(",")):
    path, sep, text = override.partition("=")
    if not sep:
      raise ValueError(f"override {override!r} is not key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = path.strip().split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"unknown config field {path!r}")
    node[leaf] = value
  return config


def _load_config(path: str):
  """get_config() of a config file such as configs/shapes.py."""
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=15, help="timed steps after compiling")
  parser.add_argument("--kinds", default="",
                      help="comma-separated mapping kinds (default: the config's)")
  parser.add_argument("--variants", default="",
                      help="';'-separated variants, each comma-separated key=value overrides")
  parser.add_argument("--prompt_set", default="", help="config.prompts.set (default: the config's)")
  parser.add_argument("--config", default="configs/shapes.py", help="config file")
  args = parser.parse_args()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, repo)
  os.chdir(repo)  # prompt sets and the guidance model are found relative to the repo

  from att3d_jax import xla_cpu  # pylint: disable=g-import-not-at-top

  config = _load_config(args.config)
  xla_cpu.split_host(config.train.cpu_devices)  # before JAX starts
  import jax  # pylint: disable=g-import-not-at-top

  from att3d_jax import build  # pylint: disable=g-import-not-at-top
  from att3d_jax import prompt_data  # pylint: disable=g-import-not-at-top
  from att3d_jax import sharding  # pylint: disable=g-import-not-at-top

  if args.prompt_set:
    config.prompts.set = args.prompt_set
  if args.kinds and args.variants:
    raise ValueError("pass --kinds or --variants, not both")
  variants = (args.variants.split(";") if args.variants
              else [f"mapping.kind={kind}" for kind in args.kinds.split(",")] if args.kinds
              else [""])
  runs, guidance = [], None
  for variant in variants:
    kind_config = _apply_overrides(config, variant)
    built = build.build(kind_config, guidance=guidance)
    guidance = guidance or _memoized_text(built.guidance)  # encode each prompt set once
    batches = [jax.device_put(prompt_data.sample_batch(kind_config, built.train_tables, i),
                              sharding.data_sharding(built.mesh))
               for i in range(args.steps + 1)]
    frames = kind_config.batch.prompts_per_step * kind_config.batch.views_per_prompt
    runs.append({"variant": variant, "kind": kind_config.mapping.kind, "frames": frames,
                 "state": built.state, "step_fn": built.train_step,
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
  for run in runs:
    seconds = statistics.median(run["times"])
    row = {"step_ms": round(1e3 * seconds, 1), "frames_per_s": round(run["frames"] / seconds, 2),
           "steps": args.steps}
    if args.kinds:
      row = {"kind": run["kind"], **row}
    elif args.variants:
      row = {"variant": run["variant"], **row}
    print(json.dumps(row))

if __name__ == "__main__":
  main()
