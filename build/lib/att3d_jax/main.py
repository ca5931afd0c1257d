r"""Trains ATT3D on a prompt set, then evaluates and writes turntables and meshes.

  python -m att3d_jax.main --config=configs/shapes.py --workdir=runs/shapes
  python -m att3d_jax.main --config=configs/shapes.py:quick --workdir=runs/shapes_quick

Rerunning the same command resumes from the newest checkpoint in --workdir.
Config fields can be overridden on the command line, e.g.
`--config.mapping.kind=per_prompt` or `--config.guidance.path=/path/to/model`.

Multi-host: run the same command in every process with
`--config.train.distributed=True`; train.initialize_distributed says which
environment variables it needs outside a managed cluster (TPU pod, SLURM, ...).
"""

import json
import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from att3d_jax import compilation_cache
from att3d_jax import train
from att3d_jax import xla_cpu

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and outputs")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", compilation_cache.DEFAULT_DIR,
    "persistent XLA compilation cache folder ('' = off): a resumed run skips compiling")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  xla_cpu.split_host(_CONFIG.value.train.cpu_devices)  # before the first computation
  compilation_cache.enable(_COMPILATION_CACHE.value)
  if _CONFIG.value.train.distributed:  # before anything touches a device
    train.initialize_distributed()
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  summary = {key: results.get(key) for key in ("frames_per_prompt", "train", "heldout",
                                               "preempted", "step") if key in results}
  print(json.dumps(summary, indent=2))


def check_config_path(argv: list[str]) -> None:
  """Exits with the list of available configs if --config names no file (absl's
  own message would only say the file does not exist)."""
  for index, arg in enumerate(argv):
    if arg == "--config" and index + 1 < len(argv):
      value = argv[index + 1]
    elif arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    else:
      continue
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      configs_dir = pathlib.Path(__file__).resolve().parent.parent / "configs"
      available = sorted(f"configs/{p.name}" for p in configs_dir.glob("*.py")
                         if p.name not in ("__init__.py", "base.py"))
      sys.exit(f"--config={value}: no such config file. Available: {', '.join(available)} "
               "(append :quick for the CI-sized variant)")


if __name__ == "__main__":
  check_config_path(sys.argv)
  app.run(main)
