"""Generation latency: prompt -> text embedding -> mapping -> one 64x64 render.

    python -m benchmarks.bench_generate [--workdir RUN] [--repeats 20]

Uses a trained model (default: the shipped att3d_jax/weights/att3d_shapes). After one
warm-up call per stage (compilation), each stage is timed `repeats` times on
prompts cycling through the model's training and unseen prompts; reported are
medians in ms, the end-to-end median (embed + mapping + render, the latency a
user waits for a 64x64 image), and mesh extraction separately (64^3 lattice).
"""

import argparse
import json
import statistics
import time

import jax

from att3d_jax import generate


def run(workdir: str | None = None, repeats: int = 20, image_size: int = 64,
        mesh_resolution: int = 64) -> dict:
  trained = generate.load_trained(workdir or str(generate.SHIPPED_MODEL))
  generator = generate.Generator(trained, image_size)
  camera = generator.cameras([30.0])
  prompts = [trained.train_prompts[i % len(trained.train_prompts)] for i in range(repeats)]
  mapped = generator.mapping(generator.mapping_input(prompts[:1]))  # warm-up
  jax.block_until_ready(generator.render(mapped, camera))
  generator.mesh(mapped, mesh_resolution)
  stages = {"embed": [], "mapping": [], "render": [], "total": [], "mesh": []}
  for prompt in prompts:
    start = time.perf_counter()
    mapping_input = generator.mapping_input([prompt])
    embedded = time.perf_counter()
    mapped = jax.block_until_ready(generator.mapping(mapping_input))
    mapped_at = time.perf_counter()
    jax.block_until_ready(generator.render(mapped, camera))
    rendered = time.perf_counter()
    stages["embed"].append(embedded - start)
    stages["mapping"].append(mapped_at - embedded)
    stages["render"].append(rendered - mapped_at)
    stages["total"].append(rendered - start)
  for prompt in prompts[:5]:
    mapped = generator.mapping(generator.mapping_input([prompt]))
    start = time.perf_counter()
    try:
      generator.mesh(mapped, mesh_resolution)
    except ValueError:
      pass
    stages["mesh"].append(time.perf_counter() - start)
  return {f"{name}_ms_median": round(1000 * statistics.median(times), 2)
          for name, times in stages.items()} | {
              "repeats": repeats, "image_size": image_size, "mesh_resolution": mesh_resolution,
              "devices": str(jax.devices()[0].platform)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  print(json.dumps(run(args.workdir, args.repeats), indent=2))


if __name__ == "__main__":
  main()
