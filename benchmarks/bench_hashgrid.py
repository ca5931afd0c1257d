"""Hash-grid encoding throughput: `encode` against `encode_reference`.

Forward, and forward+backward for the table gradient alone (what training the
mapping network needs) and for tables and points (normals), in points per
second, both implementations jitted and warmed up in the same run; the median
of several repeats. Points are uniform in the cube, the worst case for cache
locality (ray samples are spatially coherent).

  python -m benchmarks.bench_hashgrid [--quick]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from att3d_jax.nerf import hashgrid

IMPLEMENTATIONS = {"encode": hashgrid.encode,
                   "encode_reference": hashgrid.encode_reference}
PASSES = ("forward", "grad_tables", "grad_tables_and_points")


def _pass_fn(encoder, pass_name, spec, cotangent):
  """A jitted (points, tables) -> result for one pass."""
  if pass_name == "forward":
    return jax.jit(lambda points, tables: encoder(points, tables, spec))
  loss = lambda points, tables: jnp.sum(encoder(points, tables, spec) * cotangent)
  argnums = 1 if pass_name == "grad_tables" else (0, 1)
  return jax.jit(jax.grad(loss, argnums=argnums))


def _median_seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(quick: bool) -> list[dict]:
  """Times every (implementation, pass); one dict per row, with the speedup of
  `encode` over `encode_reference` in the `encode` rows."""
  spec = hashgrid.HashGridSpec()  # 16 levels, F = 2, T = 2**19
  num_points, repeats = (32_768, 2) if quick else (262_144, 5)
  points_key, tables_key, cotangent_key = jax.random.split(jax.random.PRNGKey(0), 3)
  points = jax.random.uniform(points_key, (num_points, 3), jnp.float32)
  tables = hashgrid.init_tables(tables_key, spec)
  cotangent = jax.random.normal(cotangent_key,
                                (num_points, spec.num_output_features))
  rows = []
  for pass_name in PASSES:
    seconds = {
        name: _median_seconds(_pass_fn(encoder, pass_name, spec, cotangent),
                              (points, tables), repeats)
        for name, encoder in IMPLEMENTATIONS.items()}
    for name, time_s in seconds.items():
      row = dict(benchmark="hashgrid", implementation=name, pass_name=pass_name,
                 num_points=num_points, num_levels=spec.num_levels,
                 features_per_level=spec.features_per_level,
                 log2_table_size=spec.log2_table_size, repeats=repeats,
                 device=jax.devices()[0].device_kind, seconds=time_s,
                 points_per_s=num_points / time_s)
      if name == "encode":
        row["speedup_vs_reference"] = seconds["encode_reference"] / time_s
      rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer points and repeats (a smoke run)")
  rows = run(parser.parse_args().quick)
  first = rows[0]
  print(f"hash-grid encoding: {first['num_points']} points x "
        f"{first['num_levels']} levels, F={first['features_per_level']}, "
        f"T=2^{first['log2_table_size']}, {first['device']}, median of "
        f"{first['repeats']}")
  print(f"{'pass':<24}{'encode pts/s':>15}{'reference pts/s':>18}{'speedup':>10}")
  by_pass = {}
  for row in rows:
    by_pass.setdefault(row["pass_name"], {})[row["implementation"]] = row
  for pass_name, pair in by_pass.items():
    print(f"{pass_name:<24}{pair['encode']['points_per_s']:>15.3g}"
          f"{pair['encode_reference']['points_per_s']:>18.3g}"
          f"{pair['encode']['speedup_vs_reference']:>9.2f}x")


if __name__ == "__main__":
  main()
