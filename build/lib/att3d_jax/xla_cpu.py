"""XLA:CPU settings for this project's workloads, applied by its entry points.

Both only add a flag to the environment variable XLA_FLAGS, and only where it
does not already mention that flag, so a user's own XLA_FLAGS win. They take
effect if they run before JAX creates its backends (the first computation;
importing the project does not). Accelerator backends ignore them.

`split_host(n)` makes the CPU n XLA devices, so that the train step's data mesh
runs its halves of the batch side by side: much of rendering (gathers,
scatter-adds, elementwise fusions) runs on one thread per program, and two
programs keep both cores busy. The default train step on the project's 2-core
CPU: 300 ms with 2 host devices vs 361 ms with one (run_all's side-by-side row,
docs/benchmarks.md). The shapes-diffusion trainer splits its batch the same
way (`data_mesh`): 1.01 vs 1.27 s per batch-32 step, with Eigen convolutions
in both (one-off timings, 2026-11-27).

`use_eigen_convolutions()` turns off XLA:CPU's YNNPACK fusions (jaxlib 0.10's
default for convolutions and large dots) so that they run on XLA's Eigen
kernels, which use every core. On the project's 2-core CPU that makes the
shapes guidance UNet's forward pass, which every SDS step runs, ~1.5x faster
(batch 32: 238 -> 154 ms) and its forward+backward, what the shapes-diffusion
trainer runs, ~1.15x (one-off timings, 2026-11-26); benchmarks/run_all.py
measures the IF-style UNet both ways side by side. The trainer and the
sampler/judge use it. The train step gains less from
it (0.37 s) than from split_host, and the two together are no faster than
split_host alone, so main.py splits the host only; the diffusion trainer,
dominated by convolutions, uses both. The flag is experimental, so
it is set only on the jaxlib versions it was measured with (an unknown flag
aborts XLA); elsewhere XLA's defaults stay.
"""

import os

import jax
from jaxlib import version as jaxlib_version
import numpy as np

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# jaxlib versions on which the flag exists and was measured to help.
MEASURED_JAXLIB_VERSIONS = ("0.10.2",)


def _add_flag(name: str, value: str) -> bool:
  flags = os.environ.get("XLA_FLAGS", "")
  if name in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {name}={value}".strip()
  return True


def split_host(num_devices: int) -> bool:
  """Adds `--xla_force_host_platform_device_count=num_devices` to XLA_FLAGS
  (num_devices <= 1: nothing); returns whether it did."""
  return num_devices > 1 and _add_flag(HOST_DEVICES_FLAG, str(num_devices))


def use_eigen_convolutions() -> bool:
  """Adds `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions) to
  XLA_FLAGS; returns whether it did (False: already set, or another jaxlib)."""
  if jaxlib_version.__version__ not in MEASURED_JAXLIB_VERSIONS:
    return False
  return _add_flag(YNN_FUSION_FLAG, "")


def data_mesh(batch_size: int) -> jax.sharding.Mesh:
  """A 1-D mesh, axis "data", over as many local devices as divide
  `batch_size`: with `split_host`, the way a script keeps every core busy."""
  devices = jax.local_devices()
  count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
  return jax.sharding.Mesh(np.asarray(devices[:count]), ("data",))
