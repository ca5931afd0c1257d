r"""ATT3D amortized training: the loop around the train step.

    build(config) -> guidance, prompt tables, model, state, mesh, jitted step
    for step: batch = sample_batch(config, tables, step)  (a pure function of
              (seed, step), so a resumed run sees what an uninterrupted one would)
              state, metrics = train_step(state, batch, key)
    then: eval.json, turntables and meshes (evaluation.py)

docs/design.md describes the modules and the data flow. Only process 0 writes
logs, samples and outputs (orbax coordinates checkpoints). Compute is counted
like ATT3D: rendered frames per training prompt, step * B * V / num_train_prompts.
"""

import json
import pathlib
import signal
import time

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from att3d_jax import assets
from att3d_jax import build as build_lib
from att3d_jax import checkpoints
from att3d_jax import evaluation
from att3d_jax import prompt_data
from att3d_jax import sharding
from att3d_jax import tensorboard


def frames_per_prompt(config: ml_collections.ConfigDict, step: int, num_prompts: int) -> float:
  """ATT3D's compute axis: rendered frames per training prompt after `step` steps."""
  return step * config.batch.prompts_per_step * config.batch.views_per_prompt / num_prompts


# The config sections that make a model's arrays: init_from names those of the
# source that differ (its arrays must fit; their meaning may have changed).
MODEL_SECTIONS = ("mapping", "hashgrid", "field", "guidance.amortize_scale")


def initialize_from(config: ml_collections.ConfigDict, model, state: dict) -> dict:
  """`state` with the params and stats (the mapping's text standardization and
  spectral-norm vectors) of config.train.init_from: an exported model folder, a
  training workdir, or weights/<name> (a shipped model). The optimizer state,
  the step and every schedule start fresh, so a fine-tune of N steps is
  `--config.train.num_steps=N`; frames per prompt count this run's steps only.

  Raises:
    FileNotFoundError: the source holds no config.json or no weights.
    ValueError: its weights do not fit this config's model, or a per-prompt
      model would start from the grids of other prompts.
  """
  flag = f"--config.train.init_from={config.train.init_from!r}"
  source = pathlib.Path(assets.resolve(config.train.init_from))
  if not (source / "config.json").is_file():
    raise FileNotFoundError(f"{flag}: {source} holds no config.json; pass an exported "
                            "model folder or a training workdir")
  source_config = json.loads((source / "config.json").read_text())
  if not model.mapping.generalizes:
    _, differing = checkpoints.config_differences(source_config, config,
                                                    checkpoints.PROMPT_FIELDS)
    if differing:
      raise ValueError(f"{flag}: a mapping.kind={config.mapping.kind!r} model holds one grid "
                       "per training prompt, so it can start only from a model of the same "
                       f"prompts ({differing[0]})")
  loaded = checkpoints.load_params(source, {"params": state["params"], "stats": state["stats"]})
  _, differing = checkpoints.config_differences(source_config, config, MODEL_SECTIONS)
  print(f"initialized the params and stats from {source}"
        + (f"; its model config differs in {'; '.join(differing)}" if differing else ""),
        flush=True)
  return {**state, **jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), loaded,
                                  {name: state[name] for name in loaded})}


class Preemption:
  """Turns SIGTERM into a flag the loop polls: save, then exit cleanly.

  With several processes, JAX's preemption service (started by
  jax.distributed.initialize) catches the signal instead, and `reached` makes
  every process stop after the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      if jax.process_count() == 1:
        self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler
      self._previous = None
    return self

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; call it after every step."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir), then writes eval.json, turntables and meshes.

  Args:
    config: the experiment config (configs/shapes.py documents the fields).
    workdir: checkpoints, metrics.jsonl, tensorboard/, samples/, eval.json, outputs/.

  Returns:
    the eval results (also in workdir/eval.json); on SIGTERM,
    {"preempted": True, "step": ...} after saving a checkpoint. With several
    processes, every one trains and evaluates alike; only process 0 writes.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints.check_workdir(workdir, config)
  evaluation.eval_kind(config).check(config)  # fail now, not after training
  built = build_lib.build(config)
  guidance, model, mesh = built.guidance, built.model, built.mesh
  train_tables, heldout_tables = built.train_tables, built.heldout_tables
  manager = checkpoints.checkpoint_manager(workdir, config.train.keep_checkpoints)
  state = checkpoints.restore_latest(manager, built.state)  # straight into its sharding
  unreadable = [step for step in manager.all_steps() if step > int(state["step"])]
  if unreadable:
    checkpoints.set_aside(manager, unreadable)
  if int(state["step"]) == 0 and config.train.get("init_from"):
    state = initialize_from(config, model, state)
  writes = jax.process_index() == 0  # logs, samples, eval.json, outputs
  if writes:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.default_backend()} "
          f"device(s)", flush=True)
  train_step = built.train_step
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  num_train = len(train_tables.prompts)

  start_step = int(state["step"])
  log, writer = None, None
  if writes:
    log = open(workdir / "metrics.jsonl", "a")
    writer = tensorboard.open_writer(workdir / "tensorboard")
    (workdir / "samples").mkdir(exist_ok=True)

  def local_params():
    """(params, stats) on this process's first device: evaluation, samples and
    outputs then run without the other processes."""
    return jax.device_put(jax.device_get((state["params"], state["stats"])),
                          jax.local_devices()[0])

  def log_curve(step):
    """GT metrics (no outputs) at `step` into eval_curve.jsonl: quality vs compute."""
    if not writes:
      return
    results = evaluation.evaluate(config, model, guidance, *local_params(), train_tables,
                                  heldout_tables, frames_per_prompt(config, step, num_train))
    results.pop("per_prompt")
    tensorboard.add_results(writer, "eval_curve", results, step)
    with open(workdir / "eval_curve.jsonl", "a") as curve:
      curve.write(json.dumps({"step": step, **results}) + "\n")

  if config.eval.curve_every and start_step == 0:
    log_curve(0)  # the density-bias blob alone: the floor every run starts from
  start = time.time()
  step = start_step
  preempted = False
  with Preemption() as preemption, tqdm.tqdm(
      total=config.train.num_steps, initial=start_step, desc="att3d",
      disable=not (config.train.progress_bar and writes)) as progress:
    while step < config.train.num_steps:
      batch = jax.device_put(prompt_data.sample_batch(config, train_tables, step),
                             sharding.data_sharding(mesh))
      state, metrics = train_step(state, batch, key)
      step += 1
      progress.update(1)
      if step % config.train.log_every == 0 or step == config.train.num_steps:
        metrics = {k: float(v) for k, v in metrics.items()}
        nan_streak, nan_total = int(state["nan_streak"]), int(state["nan_total"])
        seconds = time.time() - start
        record = {"step": step, "seconds": seconds,
                  "frames_per_prompt": frames_per_prompt(config, step, num_train),
                  "steps_per_second": (step - start_step) / max(seconds, 1e-9),
                  "nan_skips": nan_total, **metrics}
        if log is not None:
          log.write(json.dumps(record) + "\n")
          log.flush()
        if writer is not None:
          for name, value in record.items():
            if name != "step":
              writer.add_scalar(name, value, step)
        progress.set_postfix(grad=f"{metrics['grad_norm']:.3g}", skips=nan_total)
        if nan_streak >= config.train.max_nan_streak:
          checkpoints.save(manager, step, state, force=True)
          raise FloatingPointError(
              f"{nan_streak} consecutive steps had a non-finite loss or gradient (up to "
              f"step {step}); their updates were skipped. Lower optim.lr_mapping / "
              "optim.lr_mlp or set optim.grad_clip_norm. The last good state is saved.")
      if step % config.train.checkpoint_every == 0:
        checkpoints.save(manager, step, state)
      if writes and config.train.sample_every and step % config.train.sample_every == 0:
        sheet = workdir / "samples" / f"step_{step:06d}.png"
        evaluation.sample_sheet(config, model, guidance, *local_params(), train_tables, sheet)
        tensorboard.add_image_file(writer, "samples", sheet, step)
      if config.eval.curve_every and step % config.eval.curve_every == 0:
        log_curve(step)
      if preemption.reached(step):
        preempted = True
        break
      if config.train.time_budget_s:
        over = time.time() - start > config.train.time_budget_s
        if jax.process_count() > 1:  # process 0's clock decides: all stop at one step
          over = bool(multihost_utils.broadcast_one_to_all(np.asarray(over)))
        if over:
          print(f"\ntime budget of {config.train.time_budget_s:.0f} s reached at step {step}")
          break
  if manager.latest_step() != step:
    checkpoints.save(manager, step, state, force=True)
  manager.wait_until_finished()
  if log is not None:
    log.close()
  if writer is not None and preempted:
    writer.close()
  if preempted:
    print(f"SIGTERM: saved step {step}; rerun the same command to resume", flush=True)
    return {"preempted": True, "step": step}

  frames = frames_per_prompt(config, step, num_train)
  params, stats = local_params()
  results = evaluation.evaluate(config, model, guidance, params, stats, train_tables,
                                heldout_tables, frames)
  results.update(steps=step, train_seconds=time.time() - start,
                 num_train_prompts=num_train, mapping=config.mapping.kind)
  if not writes:
    return results
  (workdir / "eval.json").write_text(json.dumps(results, indent=2))
  tensorboard.add_results(writer, "eval", results, step)
  if config.eval.write_outputs:
    num_show = min(config.eval.num_train_outputs, num_train)
    evaluation.write_outputs(config, model, guidance, params, stats, train_tables,
                             np.arange(num_show), workdir / "outputs" / "train")
    if heldout_tables is not None and model.mapping.generalizes:
      num_heldout = len(heldout_tables.prompts)
      num_show = min(config.eval.num_heldout_outputs or num_heldout, num_heldout)
      evaluation.write_outputs(config, model, guidance, params, stats, heldout_tables,
                               np.arange(num_show), workdir / "outputs" / "heldout")
    tensorboard.add_image_folder(writer, "outputs", workdir / "outputs", step)
  writer.close()
  return results
