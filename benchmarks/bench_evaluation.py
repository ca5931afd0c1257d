"""Evaluation and outputs cost: GT evaluation of shapes_2400 and 100 prompts' outputs.

    python -m benchmarks.bench_evaluation [--num_outputs 100] [--cpu_devices 2]

Builds configs/shapes.py with prompts.set=shapes_2400 (random init and random
text embeddings: the cost does not depend on what the model learned, and
encoding 2400 prompts would take minutes), then times, in one process,
`evaluation.evaluate` over its 464 prompts (400 held-out + eval.max_train_prompts
= 64 training ones, configs/shapes.py's eval views) and `evaluation.write_outputs`
(turntable GIF, contact sheet, .obj/.glb mesh) of the first `num_outputs`
held-out prompts. Both first calls include their compilations and the GT
renders (a fresh process has no GT in memory); `evaluate` runs a second time
to show the warm cost (a curve point during training). `--cpu_devices` splits
the host into XLA devices before JAX starts, as main.py does
(config.train.cpu_devices). Each phase reports its wall time and the
process's CPU time (user + system): on a shared machine the wall time grows
with the load, while CPU time / 2 estimates the wall time on an idle 2-core CPU.
"""

import argparse
import json
import os
import pathlib
import tempfile
import time


def run(num_outputs: int = 100, cpu_devices: int = 2) -> dict:
  from att3d_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.split_host(cpu_devices)  # before the first computation
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from att3d_jax import build as build_lib  # pylint: disable=g-import-not-at-top
  from att3d_jax import evaluation  # pylint: disable=g-import-not-at-top
  from att3d_jax import prompt_data  # pylint: disable=g-import-not-at-top
  from att3d_jax.amortize import model as model_lib  # pylint: disable=g-import-not-at-top
  from configs import shapes  # pylint: disable=g-import-not-at-top

  config = shapes.get_config()
  config.prompts.set = "shapes_2400"
  config.train.cpu_devices = cpu_devices
  built = build_lib.build(config, for_training=False)
  rng = np.random.default_rng(0)

  def tables(prompts):
    embedding = rng.standard_normal((len(prompts), built.model.input_dim)).astype(np.float32)
    return prompt_data.PromptTables(prompts=list(prompts), embedding=embedding,
                                    conditioning=None)

  train_tables, heldout_tables = tables(built.prompt_set.train), tables(built.prompt_set.heldout)
  params = {**built.state["params"],
            "text_norm": model_lib.text_normalization(train_tables.embedding)}
  params, stats = jax.device_put((params, built.state["stats"]), jax.local_devices()[0])
  timings = {}

  def timed(name, fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    timings[f"{name}_wall_s"] = round(time.perf_counter() - wall, 2)
    timings[f"{name}_cpu_s"] = round(time.process_time() - cpu, 2)
    return result

  for name in ("evaluate_cold", "evaluate_warm"):
    results = timed(name, lambda: evaluation.evaluate(
        config, built.model, built.guidance, params, stats, train_tables, heldout_tables,
        frames=0.0))
  timings["num_evaluated"] = len(results["per_prompt"])
  rows = np.arange(min(num_outputs, len(heldout_tables.prompts)))
  with tempfile.TemporaryDirectory() as out_dir:
    timed("outputs", lambda: evaluation.write_outputs(
        config, built.model, built.guidance, params, stats, heldout_tables, rows,
        pathlib.Path(out_dir)))
    timings["num_outputs"] = len(rows)
    timings["num_meshes"] = len(list(pathlib.Path(out_dir).glob("*.glb")))
  timings["heldout"] = results["heldout"]
  timings["devices"] = len(jax.local_devices())
  timings["load_average"] = os.getloadavg()
  return timings


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_outputs", type=int, default=100)
  parser.add_argument("--cpu_devices", type=int, default=2)
  args = parser.parse_args()
  print(json.dumps(run(args.num_outputs, args.cpu_devices), indent=2, default=float))


if __name__ == "__main__":
  main()
