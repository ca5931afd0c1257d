"""Checkpoint I/O of a training workdir (orbax) and of exported models.

workdir/checkpoints/<step>/ holds the train state; a checkpoint that does not
restore is skipped (and moved to workdir/unreadable_checkpoints/ when the run
saves past it), and a workdir made by an incompatible config is refused. An
exported model folder holds config.json and params.msgpack (params and
stats, no optimizer state); `load_params` reads either kind and checks every
array against the model it is loaded into.
"""

import json
import pathlib
import time
from typing import Any

import flax.serialization
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"
PARAMS_FILE = "params.msgpack"  # an exported model's {"params", "stats"}


def checkpoint_manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """Synchronous orbax manager of workdir/checkpoints, keeping the newest `keep`."""
  return ocp.CheckpointManager(
      (workdir / CHECKPOINT_DIR).resolve(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False))


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> None:
  """Saves `state` (any pytree) as `step`; orbax skips a non-forced save
  between its save intervals."""
  manager.save(step, args=ocp.args.StandardSave(state), force=force)


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves the checkpoints of `steps` to workdir/unreadable_checkpoints/: kept
  for inspection, but no longer in the way of the run saving those steps again
  (orbax skips a save at or below its latest step)."""
  if jax.process_index() == 0:
    directory = pathlib.Path(manager.directory)
    target = directory.parent / UNREADABLE_DIR
    target.mkdir(exist_ok=True)
    for step in steps:
      moved = target / f"{step}_{time.strftime('%Y%m%d-%H%M%S')}"
      (directory / str(step)).rename(moved)
      print(f"WARNING: moved the unreadable checkpoint of step {step} to {moved}", flush=True)
  multihost_utils.sync_global_devices("att3d_jax: unreadable checkpoints set aside")
  manager.reload()


def restore_latest(manager: ocp.CheckpointManager, state: dict) -> dict:
  """The newest checkpoint that restores; a corrupt one is skipped with a
  warning and the previous one used. Returns `state` if there is none.

  Raises:
    RuntimeError: if checkpoints exist but none restores: starting over would
      delete them, so the run stops instead.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as error:  # pylint: disable=broad-except
      print(f"WARNING: checkpoint at step {step} is unreadable ({type(error).__name__}: "
            f"{str(error)[:200]}); trying the previous one", flush=True)
      continue
    print(f"resumed from step {step}", flush=True)
    return restored
  if steps:
    raise RuntimeError(
        f"none of the checkpoints {steps} in {manager.directory} could be restored into "
        "this config's train state (see the warnings above: corrupt files, or a different "
        "model structure). Refusing to start over, which would delete them; move the "
        "workdir away or pass a fresh --workdir.")
  return state


def _leaves(tree) -> dict[str, Any]:
  """{"['params']['mlp']...": leaf} of a pytree."""
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_fits(loaded: dict, template: dict, source: pathlib.Path) -> None:
  """Raises ValueError unless `loaded` has `template`'s arrays: the same names,
  shapes and dtypes (weights of another model config would otherwise load and
  compute garbage, or fail far from the cause)."""
  have, want = _leaves(loaded), _leaves(template)
  problems = [f"{name} missing" for name in sorted(want.keys() - have.keys())]
  problems += [f"{name} not in this model" for name in sorted(have.keys() - want.keys())]
  for name in sorted(want.keys() & have.keys()):
    there, here = np.asarray(have[name]), want[name]
    if there.shape != tuple(here.shape) or there.dtype != here.dtype:
      problems.append(f"{name} is {there.dtype}{list(there.shape)} there, "
                      f"{here.dtype}{list(here.shape)} here")
  if problems:
    raise ValueError(
        f"the weights in {source} do not fit this config's model ({len(problems)} of "
        f"{len(want)} arrays differ: {'; '.join(problems[:3])}"
        f"{'; ...' if len(problems) > 3 else ''}). They were made by another model config "
        "(mapping, hashgrid, field; a per-prompt model also by another prompt count).")


def load_params(path: pathlib.Path, template: dict) -> dict:
  """{"params", "stats"} of an exported model folder (PARAMS_FILE) or of a
  training workdir (its newest readable checkpoint), checked against `template`
  ({"params", "stats"} of the model they are loaded into; its arrays or their
  shape-dtype structs).

  Raises:
    FileNotFoundError: path holds neither, or no checkpoint of it reads.
    ValueError: PARAMS_FILE does not parse, or the weights do not fit `template`.
  """
  params_file = path / PARAMS_FILE
  if params_file.is_file():
    try:
      loaded = flax.serialization.msgpack_restore(params_file.read_bytes())
    except Exception as error:  # pylint: disable=broad-except
      raise ValueError(f"{params_file} is not a readable export ({type(error).__name__}: "
                       f"{str(error)[:200]}); export the model again") from error
    loaded = {key: loaded.get(key, {}) for key in ("params", "stats")}
  elif (path / CHECKPOINT_DIR).is_dir():
    # Restored as saved, without a target: the optimizer state of the run that
    # wrote it need not match this config's, only the params and stats must.
    # On one local device when the run's device mesh is not this process's.
    manager = checkpoint_manager(path, keep=1_000_000)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(fallback_sharding=local))
      except Exception as error:  # pylint: disable=broad-except
        print(f"WARNING: checkpoint at step {step} of {path} is unreadable "
              f"({type(error).__name__}); trying the previous one", flush=True)
        continue
      loaded = {key: restored[key] for key in ("params", "stats")}
      break
    else:
      raise FileNotFoundError(f"no readable checkpoint under {path / CHECKPOINT_DIR}")
  else:
    raise FileNotFoundError(f"{path} holds neither {PARAMS_FILE} nor {CHECKPOINT_DIR}/")
  check_fits(loaded, template, path)
  return jax.tree.map(np.asarray, loaded)


# The fields that choose a run's training prompts (not prompts.text_cache_mb,
# a memory setting that changes no result).
PROMPT_FIELDS = ("prompts.set", "prompts.split", "prompts.file")
IDENTITY_KEYS = (*PROMPT_FIELDS, "mapping", "hashgrid", "field", "guidance.kind",
                 "batch.prompts_per_step")


def _flatten(tree, prefix: str = "") -> dict:
  """{"a.b.c": value} of a nested dict's non-dict leaves."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  leaves = {}
  for name, value in tree.items():
    leaves.update(_flatten(value, f"{prefix}.{name}" if prefix else name))
  return leaves


def config_differences(old: dict, config: ml_collections.ConfigDict,
                       sections: tuple[str, ...]) -> tuple[list[str], list[str]]:
  """(fields of `sections` that `config` has and `old` lacks, fields that differ
  or that `config` lacks), as dotted names; `old` is a run's parsed config.json."""
  old = _flatten(old)
  new = _flatten(json.loads(config.to_json_best_effort()))
  added, differing = [], []
  for dotted in sorted(old.keys() | new.keys()):
    if not any(dotted == key or dotted.startswith(key + ".") for key in sections):
      continue
    if dotted not in old:
      added.append(dotted)
    elif dotted not in new or old[dotted] != new[dotted]:
      now = repr(new[dotted]) if dotted in new else "no such field"
      differing.append(f"{dotted}: {old[dotted]!r} there, {now} now")
  return added, differing


def check_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir whose checkpoints come from an incompatible config.

  The IDENTITY_KEYS sections are compared field by field. A field missing from
  the workdir's config.json was added to the code after that run started: it
  is accepted (and named), because a new field's default keeps the behaviour
  that came before it. A field whose value differs, or that the run had and
  this config lacks, is refused.
  """
  path = workdir / "config.json"
  if not path.exists() or not (workdir / CHECKPOINT_DIR).exists():
    return
  added, differing = config_differences(json.loads(path.read_text()), config, IDENTITY_KEYS)
  if differing:
    raise ValueError(
        f"workdir {workdir} holds checkpoints of a different config ({differing[0]}); "
        "use a fresh --workdir or the config it was made with. Nothing was overwritten.")
  if added:
    print(f"resuming {workdir}, made before these fields existed (taking their "
          f"values from this config): {', '.join(added)}", flush=True)
