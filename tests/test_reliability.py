"""Reliability (docs/design.md, Distribution and reliability): kill -9 and SIGTERM mid-run, corrupt
checkpoints, NaN abort, bad inputs, and two processes under jax.distributed.

The run tests (marked slow: `pytest -m slow tests/test_reliability.py`) launch
`python -m att3d_jax.main` on the quick config with the tiny random shapes
model, as a user would, and compare final checkpoints bit for bit with an
uninterrupted run (CPU XLA is deterministic).
"""

import contextlib
import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from att3d_jax import build as build_lib
from att3d_jax import checkpoints
from att3d_jax import prompt_data
from att3d_jax import train
from att3d_jax import xla_cpu
from att3d_jax.guidance import base as guidance_base
from att3d_jax.guidance import minilm
from configs import shapes as shapes_config

import conftest
import test_train

# The in-process runs train and resume the same tiny config several times.
pytestmark = pytest.mark.usefixtures("module_compilation_cache")

REPO = pathlib.Path(__file__).resolve().parent.parent
NUM_STEPS = 16  # of the subprocess runs; one checkpoint every 2 steps
INTERRUPT_AFTER = 6  # kill or SIGTERM once this step's checkpoint exists
RUN_TIMEOUT_S = 600


# ---------------------------------------------------------------------------
# Helpers: the command, checkpoints on disk, subprocesses.


def main_command(workdir, model_dir, *overrides) -> list[str]:
  """`python -m att3d_jax.main` on the quick config, shrunk: a checkpoint
  every 2 steps (all kept), a metrics line every step, a tiny evaluation, no
  outputs."""
  return [sys.executable, "-m", "att3d_jax.main", "--config=configs/shapes.py:quick",
          f"--workdir={workdir}", f"--config.guidance.path={model_dir}",
          f"--config.train.num_steps={NUM_STEPS}", "--config.train.checkpoint_every=2",
          f"--config.train.keep_checkpoints={NUM_STEPS}",
          "--config.train.log_every=1", "--config.train.progress_bar=False",
          "--config.eval.write_outputs=False", "--config.eval.elevations_deg=(20.0,)",
          "--config.eval.views_per_elevation=2", "--config.eval.max_train_prompts=4",
          *overrides]


def subprocess_env(**extra) -> dict:
  """One CPU device per process, whatever the test process was given (main.py
  would otherwise split the CPU into config.train.cpu_devices)."""
  return conftest.entry_point_env(f"{xla_cpu.HOST_DEVICES_FLAG}=1", JAX_PLATFORMS="cpu",
                                 PYTHONPATH=str(REPO), **extra)


def run_main(command, env=None) -> str:
  out = subprocess.run(command, cwd=REPO, env=env or subprocess_env(), capture_output=True,
                       text=True, timeout=RUN_TIMEOUT_S)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def checkpoint_steps(workdir) -> list[int]:
  """Finished orbax checkpoints (orbax renames a step's temporary folder to
  its step number once the save is complete)."""
  directory = pathlib.Path(workdir) / checkpoints.CHECKPOINT_DIR
  if not directory.is_dir():
    return []
  return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def read_checkpoint(workdir, step=None) -> dict:
  """The train state of a checkpoint (the newest by default) as numpy arrays,
  whatever devices wrote it."""
  step = checkpoint_steps(workdir)[-1] if step is None else step
  path = pathlib.Path(workdir) / checkpoints.CHECKPOINT_DIR / str(step) / "default"
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            metadata)
    return jax.tree.map(np.asarray, checkpointer.restore(path, abstract))


def assert_states_equal(actual: dict, expected: dict):
  assert int(actual["step"]) == int(expected["step"])
  for name in ("params", "stats", "opt_state", "nan_total"):
    jax.tree.map(np.testing.assert_array_equal, actual[name], expected[name])


@contextlib.contextmanager
def started(command, log_path, env=None):
  """Popen with output to log_path; killed (by its pid) if still running."""
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, cwd=REPO, env=env or subprocess_env(), stdout=log,
                               stderr=subprocess.STDOUT)
  try:
    yield process
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()


def wait_for_checkpoint(process, workdir, step: int, log_path) -> int:
  """Polls until a checkpoint at `step` or later exists; fails clearly if the
  run ends (finished or crashed) first. Returns the newest step seen."""
  deadline = time.time() + RUN_TIMEOUT_S
  while time.time() < deadline:
    steps = checkpoint_steps(workdir)
    if steps and steps[-1] >= step:
      assert process.poll() is None, (
          f"the run ended before it could be interrupted (checkpoints {steps}); raise "
          f"NUM_STEPS above {NUM_STEPS}:\n{pathlib.Path(log_path).read_text()[-3000:]}")
      return steps[-1]
    if process.poll() is not None:
      pytest.fail(f"the run exited with {process.returncode} before step {step}:\n"
                  f"{pathlib.Path(log_path).read_text()[-3000:]}")
    time.sleep(0.02)
  pytest.fail(f"no checkpoint at step {step} after {RUN_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def uninterrupted(tiny_shapes_model, tmp_path_factory) -> pathlib.Path:
  """The workdir of NUM_STEPS steps in one go (a checkpoint every 2 steps)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_main(main_command(workdir, tiny_shapes_model))
  assert checkpoint_steps(workdir) == list(range(2, NUM_STEPS + 1, 2))
  return workdir


# ---------------------------------------------------------------------------
# Interruptions.


@pytest.mark.slow  # several launches of the main program (1-4 min)
def test_kill_9_then_rerun_equals_uninterrupted_run(uninterrupted, tiny_shapes_model,
                                                     tmp_path):
  """SIGKILL (no handler runs, a save may be half written) loses at most the
  steps since the last checkpoint; rerunning the command ends bit-identical."""
  workdir, log_path = tmp_path / "run", tmp_path / "killed.log"
  command = main_command(workdir, tiny_shapes_model)
  with started(command, log_path) as process:
    wait_for_checkpoint(process, workdir, INTERRUPT_AFTER, log_path)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
  killed_at = checkpoint_steps(workdir)[-1]
  assert INTERRUPT_AFTER <= killed_at < NUM_STEPS
  output = run_main(command)
  assert f"resumed from step {killed_at}" in output
  assert_states_equal(read_checkpoint(workdir), read_checkpoint(uninterrupted))


@pytest.mark.slow  # several launches of the main program (1-4 min)
def test_sigterm_saves_exits_0_and_resumes(uninterrupted, tiny_shapes_model, tmp_path):
  workdir, log_path = tmp_path / "run", tmp_path / "terminated.log"
  command = main_command(workdir, tiny_shapes_model)
  with started(command, log_path) as process:
    wait_for_checkpoint(process, workdir, INTERRUPT_AFTER, log_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=RUN_TIMEOUT_S) == 0, log_path.read_text()[-3000:]
  output = log_path.read_text()
  stopped_at = checkpoint_steps(workdir)[-1]
  assert INTERRUPT_AFTER <= stopped_at < NUM_STEPS
  assert f"SIGTERM: saved step {stopped_at}" in output
  assert '"preempted": true' in output
  assert not (workdir / "eval.json").exists()
  assert int(read_checkpoint(workdir)["step"]) == stopped_at
  output = run_main(command)
  assert f"resumed from step {stopped_at}" in output
  assert_states_equal(read_checkpoint(workdir), read_checkpoint(uninterrupted))


# ---------------------------------------------------------------------------
# Corrupt checkpoints and NaN, in process with the oracle guidance (fast).


def oracle_config(**overrides):
  config = test_train.quick_config(train__progress_bar=False, eval__write_outputs=False,
                                   eval__views_per_elevation=2, eval__max_train_prompts=4,
                                   train__checkpoint_every=2, **overrides)
  config.eval.elevations_deg = (20.0,)
  return config


def corrupt(step_dir: pathlib.Path, how: str) -> None:
  """Truncates every file of a checkpoint to half, or deletes its array data."""
  for path in sorted(step_dir.rglob("*")):
    if not path.is_file():
      continue
    if how == "truncate":
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif how == "delete_data" and path.parent.name == "d":
      path.unlink()


def file_listing(directory: pathlib.Path) -> dict:
  return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
          if p.is_file()}


def test_corrupt_latest_checkpoint_falls_back_and_all_corrupt_is_refused(
    monkeypatch, capsys, tmp_path):
  monkeypatch.setattr(build_lib, "load_guidance", lambda config: test_train.oracle_guidance())
  config = oracle_config(train__num_steps=6)
  test_train.train_until(config, str(tmp_path), 6)
  assert checkpoint_steps(tmp_path) == [2, 4, 6]
  good_six = read_checkpoint(tmp_path, 6)
  corrupt(tmp_path / checkpoints.CHECKPOINT_DIR / "6", "truncate")
  corrupted_files = file_listing(tmp_path / checkpoints.CHECKPOINT_DIR / "6")
  capsys.readouterr()

  # The newest is unreadable: warn, resume from step 4, keep the bad one aside.
  train.train_and_evaluate(config, str(tmp_path))
  output = capsys.readouterr().out
  assert "WARNING: checkpoint at step 6 is unreadable" in output
  assert "resumed from step 4" in output
  (aside,) = (tmp_path / checkpoints.UNREADABLE_DIR).iterdir()
  assert aside.name.startswith("6_") and file_listing(aside) == corrupted_files
  # Step 6 was trained again and saved again, as the first time.
  assert checkpoint_steps(tmp_path) == [2, 4, 6]
  assert_states_equal(read_checkpoint(tmp_path, 6), good_six)

  # Every checkpoint unreadable: refuse to start over, touch nothing.
  corrupt(tmp_path / checkpoints.CHECKPOINT_DIR / "6", "truncate")
  corrupt(tmp_path / checkpoints.CHECKPOINT_DIR / "4", "delete_data")
  corrupt(tmp_path / checkpoints.CHECKPOINT_DIR / "2", "truncate")
  before = file_listing(tmp_path)
  with pytest.raises(RuntimeError, match=r"none of the checkpoints \[6, 4, 2\].*Refusing"):
    train.train_and_evaluate(config, str(tmp_path))
  assert file_listing(tmp_path) == before


def nan_guidance() -> guidance_base.Guidance:
  """The oracle, but its noise prediction is NaN: every step is non-finite."""
  oracle = test_train.oracle_guidance()
  return oracle._replace(eps_fn=lambda noisy, t, text: jnp.full_like(noisy, jnp.nan))


def test_nan_streak_aborts_with_the_last_good_state_saved(monkeypatch, tmp_path):
  config = oracle_config(train__num_steps=10, train__max_nan_streak=2, train__log_every=1)
  monkeypatch.setattr(build_lib, "load_guidance", lambda config: test_train.oracle_guidance())
  test_train.train_until(config, str(tmp_path), 3)
  good = read_checkpoint(tmp_path, 3)
  monkeypatch.setattr(build_lib, "load_guidance", lambda config: nan_guidance())
  with pytest.raises(FloatingPointError, match=r"2 consecutive steps had a non-finite loss "
                     r"or gradient \(up to step 5\).*last good state is saved"):
    train.train_and_evaluate(config, str(tmp_path))
  saved = read_checkpoint(tmp_path)
  assert int(saved["step"]) == 5 and int(saved["nan_total"]) == 2
  for name in ("params", "stats", "opt_state"):  # the skipped steps changed nothing
    jax.tree.map(np.testing.assert_array_equal, saved[name], good[name])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["finite"], r["nan_skips"]) for r in records[-2:]] == [(4, 0.0, 1),
                                                                              (5, 0.0, 2)]


# ---------------------------------------------------------------------------
# Bad input not covered elsewhere (prompt files: test_shapes.py and
# test_real_configs.py; weights with missing keys or wrong shapes:
# test_convert.py and test_minilm.py; real guidance folders: test_real_configs.py).


def test_missing_shapes_guidance_folder_names_path_and_layout(tmp_path):
  config = oracle_config()
  config.guidance.path = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError,
                     match=r"--config.guidance.path=.*nowhere.*unet/config.json.*text_encoder.json"):
    build_lib.load_guidance(config)


def test_empty_or_whitespace_training_prompt_is_named(tiny_shapes_model):
  config = oracle_config()
  config.guidance.path = tiny_shapes_model
  guidance = build_lib.load_guidance(config)
  with pytest.raises(ValueError, match=r"prompt 1 is ' \\t '"):
    prompt_data.prompt_tables(guidance, ["a red cube", " \t "])
  with pytest.raises(ValueError, match="empty prompt list"):
    prompt_data.prompt_tables(guidance, [])


def test_long_and_non_ascii_prompts_encode():
  """MiniLM never fails on them: a long prompt keeps its first max_length - 2
  wordpieces (so a training caption's ", side view" suffix is cut off and
  every view gets the same text); accents are stripped, CJK characters split,
  characters outside the vocabulary (emoji, full-width Latin) become [UNK],
  control and zero-width characters vanish."""
  encoder = minilm.MiniLMEncoder.from_package(max_length=16)
  long_prompt = "a red cube " * 2000
  prompts = [long_prompt, long_prompt + ", side view", "un cube rouge à côté d'un cône",
             "a red cube", "立方体 🎩", "a red\x00cube\u200b"]
  token_ids, mask = encoder.tokenize(prompts)
  assert mask[0].all() and mask[1].all()
  np.testing.assert_array_equal(token_ids[0], token_ids[1])  # suffix truncated away
  accents = encoder.tokenize(["un cube rouge a cote d'un cone"])[0]
  np.testing.assert_array_equal(token_ids[2], accents[0])
  unknown = encoder._tokenizer.token_to_id("[UNK]")  # pylint: disable=protected-access
  assert unknown in token_ids[4][mask[4]]
  assert encoder._tokenizer.decode(token_ids[5].tolist()) == "a redcube"  # pylint: disable=protected-access
  pooled = np.asarray(encoder.encode(prompts)["pooled"])
  assert np.all(np.isfinite(pooled))
  np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------
# Two processes.


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def run_two_processes(workdir, model_dir, tmp_path, name, terminate_after=None) -> list[str]:
  """The main command in 2 processes of one CPU device each (a 2-device mesh);
  with terminate_after, SIGTERM to process 1 once that checkpoint exists.
  Returns both outputs; asserts both exit 0."""
  command = main_command(workdir, model_dir, "--config.train.distributed=True")
  port = free_port()
  logs = [tmp_path / f"{name}_{index}.log" for index in range(2)]
  with contextlib.ExitStack() as stack:
    processes = [stack.enter_context(started(command, logs[index], env=subprocess_env(
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(index)))) for index in range(2)]
    if terminate_after is not None:
      wait_for_checkpoint(processes[1], workdir, terminate_after, logs[1])
      processes[1].send_signal(signal.SIGTERM)
    for process, log in zip(processes, logs):
      assert process.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-3000:]
  return [log.read_text() for log in logs]


@pytest.mark.slow  # several launches of the main program (1-4 min)
def test_two_processes_match_one_and_stop_together(uninterrupted, tiny_shapes_model,
                                                   tmp_path):
  """jax.distributed over 2 local processes (a 2-device mesh): after
  INTERRUPT_AFTER steps the state matches the single-process run's to 1e-5;
  SIGTERM to one process stops both after the same step with a checkpoint;
  the rerun resumes and finishes."""
  workdir = tmp_path / "run"
  outputs = run_two_processes(workdir, tiny_shapes_model, tmp_path, "terminated",
                              terminate_after=INTERRUPT_AFTER)
  stopped_at = checkpoint_steps(workdir)[-1]
  assert INTERRUPT_AFTER <= stopped_at < NUM_STEPS
  for output in outputs:
    assert f"SIGTERM: saved step {stopped_at}" in output
  # The cross-process all-reduce sums in another order than one process:
  # float32 rounding differences, which Adam amplifies a little every step.
  state, expected = (read_checkpoint(path, INTERRUPT_AFTER) for path in (workdir, uninterrupted))
  for name in ("params", "stats"):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=0, atol=1e-5),
                 state[name], expected[name])
  outputs = run_two_processes(workdir, tiny_shapes_model, tmp_path, "resumed")
  for output in outputs:
    assert f"resumed from step {stopped_at}" in output
  # Only process 0 writes logs: one metrics line per step over both runs.
  steps = [json.loads(line)["step"]
           for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, NUM_STEPS + 1))
  assert (workdir / "eval.json").is_file()
  final, expected = read_checkpoint(workdir), read_checkpoint(uninterrupted)
  assert int(final["step"]) == NUM_STEPS
  # 10 more steps widen those differences: proposal sampling places each step's
  # bins from the current densities, so a rounding-level change moves the bins
  # (2.4e-4 relative measured at step 16 with 16 + 16 samples).
  for leaf, expected_leaf in zip(jax.tree.leaves(final["params"]),
                                 jax.tree.leaves(expected["params"])):
    difference = np.linalg.norm(leaf - expected_leaf)
    assert difference <= 1e-3 * np.linalg.norm(expected_leaf), difference


def test_unknown_config_file_lists_the_available_ones(tmp_path):
  out = subprocess.run([sys.executable, "-m", "att3d_jax.main", "--config=configs/nope.py",
                        f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0
  assert "configs/nope.py" in out.stderr and "configs/shapes.py" in out.stderr
  assert "configs/animals.py" in out.stderr


def workdir_made_with(tmp_path, config_dict: dict) -> pathlib.Path:
  """A workdir whose run was made with config_dict (its config.json) and has checkpoints."""
  workdir = tmp_path / "run"
  (workdir / checkpoints.CHECKPOINT_DIR).mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(config_dict))
  return workdir


def test_resume_accepts_fields_added_since_the_run_and_names_them(tmp_path, capsys):
  config = shapes_config.get_config("quick")
  old = json.loads(config.to_json_best_effort())
  del old["mapping"]["triplane_combine"]  # as if the run predates the field
  checkpoints.check_workdir(workdir_made_with(tmp_path, old), config)
  assert "mapping.triplane_combine" in capsys.readouterr().out


def test_resume_accepts_another_text_cache_size(tmp_path, capsys):
  config = shapes_config.get_config("quick")
  old = json.loads(config.to_json_best_effort())
  old["prompts"]["text_cache_mb"] = 1  # memory only: the same prompts and model
  checkpoints.check_workdir(workdir_made_with(tmp_path, old), config)
  assert "text_cache_mb" not in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (lambda old: old["mapping"].update(hidden_width=64), "mapping.hidden_width: 64 there, 32"),
    (lambda old: old["hashgrid"].update(retired_field=1), "hashgrid.retired_field: 1 there, "
                                                          "no such field"),
    (lambda old: old["prompts"].update(set="shapes_2400"), "prompts.set: 'shapes_2400'"),
])
def test_resume_refuses_a_changed_or_removed_identity_field(tmp_path, change, message):
  config = shapes_config.get_config("quick")
  old = json.loads(config.to_json_best_effort())
  change(old)
  with pytest.raises(ValueError, match=re.escape(message)):
    checkpoints.check_workdir(workdir_made_with(tmp_path, old), config)
