"""The entry points' XLA:CPU setting: it reaches XLA (the compiled program has
no YNNPACK fusion) and leaves a user's own XLA_FLAGS alone."""

import os
import subprocess
import sys

from att3d_jax import xla_cpu

import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles a matmul chain big enough for XLA:CPU to hand to YNNPACK by default
# and prints whether it did.
_PROBE = """
import sys
from att3d_jax import xla_cpu
if sys.argv[1] == "eigen":
  assert xla_cpu.use_eigen_convolutions()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jax.nn.relu(x @ w) @ w)
x, w = jnp.ones((1024, 512)), jnp.ones((512, 512))
print("ynn" in f.lower(x, w).compile().as_text())
"""


def _compiled_uses_ynn(mode: str) -> bool:
  result = subprocess.run([sys.executable, "-c", _PROBE, mode],
                          env=conftest.entry_point_env(), check=True,
                          capture_output=True, text=True, timeout=300)
  return result.stdout.strip().splitlines()[-1] == "True"


def test_eigen_convolutions_reach_xla():
  assert _compiled_uses_ynn("default")  # else this test could not fail
  assert not _compiled_uses_ynn("eigen")


def test_user_xla_flags_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
  assert not xla_cpu.use_eigen_convolutions()
  assert os.environ["XLA_FLAGS"] == (
      "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert xla_cpu.use_eigen_convolutions()
  assert os.environ["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=")


def test_main_splits_the_cpu_and_trains_on_both_halves(tiny_shapes_model, tmp_path):
  """`python -m att3d_jax.main` with no XLA flags but the tests' compile
  level: the quick config's batch is sharded over config.train.cpu_devices =
  2 host devices, end to end."""
  env = conftest.entry_point_env(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run(
      [sys.executable, "-m", "att3d_jax.main", "--config=configs/shapes.py:quick",
       f"--workdir={tmp_path}", f"--config.guidance.path={tiny_shapes_model}",
       "--config.train.num_steps=4", "--config.train.progress_bar=False",
       "--config.eval.write_outputs=False", "--config.eval.elevations_deg=(20.0,)",
       "--config.eval.views_per_elevation=2", "--config.eval.max_train_prompts=4"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh {'data': 2} over 2 cpu device(s)" in out.stdout
  assert (tmp_path / "eval.json").is_file()
