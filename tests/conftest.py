"""Shared fixtures: tiny random models built here (nothing is downloaded)."""

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax import compilation_cache
from att3d_jax.guidance import unet as unet_lib
from configs import shapes_diffusion as shapes_diffusion_config

# Tests compile far more than they run, and at LLVM's optimization level 1
# XLA:CPU compiles this project's programs faster than at its default 3, with
# about the same run time (docs/design.md, History). Test processes and the
# subprocesses they start use it; XLA_FLAGS that set a level win in-process.
COMPILE_LEVEL_FLAG = "--xla_backend_optimization_level"
COMPILE_FASTER = f"{COMPILE_LEVEL_FLAG}=1"


def pytest_configure(config):
  """Before any test builds JAX's backends, which read XLA_FLAGS once."""
  del config
  flags = os.environ.get("XLA_FLAGS", "")
  if COMPILE_LEVEL_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {COMPILE_FASTER}".strip()


def entry_point_env(*xla_flags: str, **extra: str) -> dict[str, str]:
  """This process's environment with XLA_FLAGS reduced to the tests' compile
  level and `xla_flags`, plus `extra`: a subprocess then gets those and the
  XLA flags its entry point sets itself, and no others."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = " ".join((COMPILE_FASTER, *xla_flags))
  env.update(extra)
  return env


def run_experiment(module: str, flags: list[str], out_dir) -> tuple[dict, str]:
  """Runs `python -m <module> <flags> --out_dir=<out_dir>` from the repository
  root and returns (its results.json, its stdout). A process, because the
  experiments define their flags only under __main__: a flag clash with
  another experiment's fails here, not at import."""
  result = subprocess.run([sys.executable, "-m", module, *flags, f"--out_dir={out_dir}"],
                          capture_output=True, text=True, timeout=300,
                          env=entry_point_env(), cwd=pathlib.Path(__file__).parent.parent)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads((pathlib.Path(out_dir) / "results.json").read_text()), result.stdout


def caption_image_denoiser(alphas_cumprod: jax.Array):
  """A denoiser whose known answer is its "caption": it reads the clean image
  from the conditioning [N, 3, H, W] and inverts x_t = sqrt(a) x + sqrt(1 - a) eps,
  so its one-step estimate of x is the caption, at every t and noise."""
  def eps_fn(noisy, t, conditioning):
    alpha = alphas_cumprod[t][:, None, None, None]
    return (noisy - jnp.sqrt(alpha) * conditioning) / jnp.sqrt(1.0 - alpha)
  return eps_fn


@contextlib.contextmanager
def persistent_compilation_cache(cache_dir: str):
  """JAX's persistent XLA cache at `cache_dir` for every program, however fast
  it compiles (the CLIs' `compilation_cache.enable`, whose settings `names`
  lists); the previous settings are restored after. A size cap turns on JAX's
  file lock around each read and write, so processes can share the folder."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")
  previous = {name: getattr(jax.config, name) for name in names}
  compilation_cache.enable(cache_dir, min_compile_seconds=0.0)
  jax.config.update("jax_compilation_cache_max_size", 8 << 30)
  jax_compilation_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    jax_compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def shared_xla_cache_dir(tmp_path_factory) -> str:
  """One cache folder for the whole run, shared by pytest-xdist's workers (each
  has its own basetemp under the run's)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  path = base / "xla_cache"
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope="module")
def module_compilation_cache(shared_xla_cache_dir):
  """The run's persistent XLA cache for one test module's tests: modules that
  build the same train step, renderer or GT renderer again (each
  `train.train_and_evaluate` jits afresh) then compile each program once per
  run, not once per test. A module opts in with
  `pytestmark = pytest.mark.usefixtures("module_compilation_cache")`."""
  with persistent_compilation_cache(shared_xla_cache_dir):
    yield


def random_shapes_export(folder, seed: int = 0):
  """A tiny shapes diffusion model with random weights, exported like the
  shipped one (unet/, scheduler/, text_encoder.json). Returns its config."""
  from experiments import train_shapes_diffusion  # pylint: disable=g-import-not-at-top
  config = shapes_diffusion_config.get_config("quick")
  module_config = unet_lib.UNetConfig.from_dict(dict(config.unet))
  shapes = unet_lib.param_shapes(unet_lib.UNet2DConditionModel(module_config))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(scale=0.2, size=s.shape), jnp.float32), shapes)
  train_shapes_diffusion.export(str(folder), config, module_config, params)
  return config


@pytest.fixture(scope="session")
def tiny_shapes_model(tmp_path_factory):
  """Path of a tiny random shapes diffusion model folder."""
  folder = tmp_path_factory.mktemp("tiny_shapes_model")
  random_shapes_export(folder)
  return str(folder)
