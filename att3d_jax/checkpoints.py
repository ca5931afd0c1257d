"""Checkpoint I/O of a training workdir (orbax): save, restore, recover.

workdir/checkpoints/<step>/ holds the train state; a checkpoint that does not
restore is skipped (and moved to workdir/unreadable_checkpoints/ when the run
saves past it), and a workdir made by an incompatible config is refused.
"""

import json
import pathlib
import time

import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"


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


IDENTITY_KEYS = ("prompts", "mapping", "hashgrid", "field", "guidance.kind",
                 "batch.prompts_per_step")


def _flatten(tree, prefix: str = "") -> dict:
  """{"a.b.c": value} of a nested dict's non-dict leaves."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  leaves = {}
  for name, value in tree.items():
    leaves.update(_flatten(value, f"{prefix}.{name}" if prefix else name))
  return leaves


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
  old = _flatten(json.loads(path.read_text()))
  new = _flatten(json.loads(config.to_json_best_effort()))
  added = []
  for dotted in sorted(old.keys() | new.keys()):
    if not any(dotted == key or dotted.startswith(key + ".") for key in IDENTITY_KEYS):
      continue
    if dotted not in old:
      added.append(dotted)
    elif dotted not in new or old[dotted] != new[dotted]:
      now = repr(new[dotted]) if dotted in new else "no such field"
      raise ValueError(
          f"workdir {workdir} holds checkpoints of a different config ({dotted}: "
          f"{old[dotted]!r} there, {now} now); use a fresh --workdir or the "
          "config it was made with. Nothing was overwritten.")
  if added:
    print(f"resuming {workdir}, made before these fields existed (taking their "
          f"values from this config): {', '.join(added)}", flush=True)

