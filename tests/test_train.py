"""ATT3D amortized training: batches, the train step, guards, sharding, main."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from unittest import mock
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax import build as build_lib
from att3d_jax import checkpoints
from att3d_jax import evaluation
from att3d_jax import prompt_data
from att3d_jax import sharding
from att3d_jax import train
from att3d_jax import xla_cpu
from att3d_jax.eval import shapes_eval
from att3d_jax.guidance import base as guidance_base
from att3d_jax.guidance import schedule
from att3d_jax.guidance import sds
from att3d_jax.nerf import cameras as cameras_lib
from configs import shapes as shapes_config

import conftest
import test_tensorboard

# Its runs (resumed, repeated, preempted) build the same train step and
# evaluation again and again: one persistent XLA cache compiles each once.
pytestmark = pytest.mark.usefixtures("module_compilation_cache")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_RGB = (0.9, 0.1, 0.1)  # what the oracle guidance pulls every render toward
TEXT_LENGTH, TEXT_WIDTH = 3, 8


def oracle_guidance() -> guidance_base.Guidance:
  """A stand-in for a text-to-image model whose only image is a flat TARGET_RGB
  picture: eps_fn returns the exact noise of that image, so SDS pulls every
  render toward it. Text embeddings are fixed random vectors per prompt."""
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod_from_config(
      {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}), jnp.float32)
  x0 = (2.0 * jnp.asarray(TARGET_RGB) - 1.0)[None, :, None, None]

  def eps_fn(noisy, timesteps, text):
    del text
    alpha_bar = alphas_cumprod[timesteps][:, None, None, None]
    return (noisy - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1.0 - alpha_bar)

  def vectors(strings, shape):
    return np.stack([np.random.default_rng(zlib.crc32(s.encode())).normal(size=shape)
                     for s in strings]).astype(np.float32)

  return guidance_base.Guidance(
      eps_fn=eps_fn, alphas_cumprod=alphas_cumprod,
      uncond=jnp.zeros((1, TEXT_LENGTH, TEXT_WIDTH)), model_input=sds.pixel_model_input,
      encode=lambda captions: vectors(captions, (TEXT_LENGTH, TEXT_WIDTH)),
      embed=lambda prompts: vectors(prompts, (TEXT_WIDTH,)),
      background_color=(0.25, 0.45, 0.5))


def quick_config(**overrides):
  config = shapes_config.get_config("quick")
  for dotted, value in overrides.items():
    section, name = dotted.split("__")
    config[section][name] = value
  return config


def setup(config, guidance=None):
  built = build_lib.build(config, guidance=guidance or oracle_guidance())
  return (built.guidance, built.train_tables, built.model, built.state, built.mesh,
          built.train_step)


def train_until(config, workdir: str, step: int) -> dict:
  """train.train_and_evaluate as if preempted (SIGTERM) right after `step`."""
  with mock.patch.object(train.Preemption, "reached", lambda self, reached: reached == step):
    return train.train_and_evaluate(config, workdir)


def run_steps(config, num_steps, guidance=None):
  guidance, tables, model, state, mesh, step_fn = setup(config, guidance)
  key = jax.random.key(0)
  history = []
  for step in range(num_steps):
    batch = jax.device_put(prompt_data.sample_batch(config, tables, step),
                           sharding.data_sharding(mesh))
    state, metrics = step_fn(state, batch, key)
    history.append(jax.tree.map(np.asarray, metrics))
  return state, history, (guidance, tables, model, step_fn)


def render_error(config, model, guidance, tables, state):
  """Mean squared distance of the first prompts' renders to TARGET_RGB."""
  render = evaluation.make_render_prompts(model, guidance.background_color, 16, 16, chunk=4)
  cameras = cameras_lib.ring_cameras((20.0,), 2, 1.8, 45.0)
  rows = np.arange(4)
  inputs = prompt_data.mapping_inputs(config, tables.embedding[rows])
  rgb = render(state["params"], state["stats"], inputs, rows.astype(np.int32), cameras)["rgb"]
  return float(np.mean((rgb - np.asarray(TARGET_RGB))**2))


def test_sample_batch_is_a_function_of_seed_and_step():
  config = quick_config(interpolation__kind="embedding", interpolation__fraction=0.5)
  tables = prompt_data.prompt_tables(oracle_guidance(), prompt_data.load_prompts(config).train)
  first = prompt_data.sample_batch(config, tables, 7)
  again = prompt_data.sample_batch(config, tables, 7)
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])
  other = prompt_data.sample_batch(config, tables, 8)
  assert not np.array_equal(first["alpha"], other["alpha"])
  rows, k = config.batch.prompts_per_step, config.interpolation.num_prompts
  assert first["alpha"].shape == (rows, k)
  np.testing.assert_allclose(first["alpha"].sum(1), 1.0, rtol=1e-6)
  assert first["conditioning"].shape == (rows, k, prompt_data.NUM_VIEWS, TEXT_LENGTH, TEXT_WIDTH)
  # The mapping input is the alpha-mixed embedding of the row's prompts.
  # Each row's prompts, identified by their (unique) conditioning tables.
  conditioning = tables.conditioning.astype(np.float32).reshape(len(tables.prompts), -1)
  index = np.array([[int(np.flatnonzero((conditioning == c.reshape(-1)).all(1))[0])
                     for c in row] for row in first["conditioning"]])
  np.testing.assert_array_equal(index[:, 0], first["prompt_index"])
  mixed = np.einsum("bk,bkd->bd", first["alpha"], tables.embedding[index])
  np.testing.assert_allclose(first["mapping_input"], mixed, rtol=1e-6)


def test_batch_without_replacement_covers_every_prompt():
  config = quick_config(batch__without_replacement=True, batch__prompts_per_step=56)
  tables = prompt_data.prompt_tables(oracle_guidance(), prompt_data.load_prompts(config).train)
  for step in (0, 1):
    batch = prompt_data.sample_batch(config, tables, step)
    assert sorted(batch["prompt_index"].tolist()) == list(range(56))
  first = prompt_data.sample_batch(quick_config(batch__without_replacement=True), tables, 0)
  assert len(set(first["prompt_index"].tolist())) == 4
  with pytest.raises(ValueError, match="without_replacement"):
    prompt_data.sample_batch(quick_config(batch__without_replacement=True,
                                          batch__prompts_per_step=57), tables, 0)


def test_guidance_weight_column_spans_its_range():
  config = quick_config(guidance__amortize_scale=True)
  tables = prompt_data.prompt_tables(oracle_guidance(), prompt_data.load_prompts(config).train)
  batch = prompt_data.sample_batch(config, tables, 0)
  assert batch["mapping_input"].shape[1] == TEXT_WIDTH + 1
  low, high = config.guidance.scale_range
  assert np.all((batch["guidance_scale"] >= low) & (batch["guidance_scale"] <= high))
  np.testing.assert_allclose(batch["mapping_input"][:, -1],
                             (batch["guidance_scale"] - low) / (high - low), rtol=1e-6)


def test_guidance_weight_input_carries_a_share_of_the_text_norm():
  """The CFG column reaches the hypernet centered, at unit variance over the
  training range, times scale_input_share * sqrt(D): the text block's norm."""
  config = quick_config(guidance__amortize_scale=True)
  _, tables, model, state, _, _ = setup(config)
  low, high = config.guidance.scale_range
  inputs = prompt_data.mapping_inputs(config, tables.embedding[:1].repeat(3, 0),
                                      np.array([low, (low + high) / 2, high], np.float32))
  standardized = np.asarray(model.standardize_inputs(state["params"], jnp.asarray(inputs)))
  gain = config.guidance.scale_input_share * np.sqrt(TEXT_WIDTH)
  np.testing.assert_allclose(standardized[:, -1], np.sqrt(3.0) * gain * np.array([-1, 0, 1]),
                             rtol=1e-5, atol=1e-5)
  text = np.asarray(model.standardize_inputs(state["params"], jnp.asarray(
      prompt_data.mapping_inputs(config, tables.embedding, None))))[:, :-1]
  rms_norm = np.sqrt(np.mean(np.sum(text**2, axis=1)))  # ~ sqrt(D) after text_norm
  np.testing.assert_allclose(rms_norm, np.sqrt(TEXT_WIDTH), rtol=1e-4)


# concat and per_prompt are slow (about 25 s each): the default run keeps the
# two generators the shipped configs use; test_mapping covers concat's mapping
# and test_per_prompt_grids_move_only_when_rendered per_prompt's step.
@pytest.mark.parametrize("kind", ["hypernet", pytest.param("concat", marks=pytest.mark.slow),
                                  pytest.param("per_prompt", marks=pytest.mark.slow),
                                  "triplane"])
def test_twenty_steps_pull_renders_toward_the_oracle_image(kind):
  """The whole step (mapping -> render -> SDS -> Adam) learns: after 20 steps
  the renders are much closer to the only image the oracle model knows."""
  config = quick_config(mapping__kind=kind)
  guidance, tables, model, state, _, _ = setup(config)
  before = render_error(config, model, guidance, tables, state)
  state, history, _ = run_steps(config, 20)
  after = render_error(config, model, guidance, tables, state)
  assert all(h["finite"] for h in history)
  assert int(state["step"]) == 20
  assert after < 0.8 * before, (before, after)


def test_per_prompt_grids_move_only_when_rendered():
  config = quick_config(mapping__kind="per_prompt")
  state, _, (_, tables, _, _) = run_steps(config, 1)
  guidance, _, model, initial, _, _ = setup(config)
  rendered = set(prompt_data.sample_batch(config, tables, 0)["prompt_index"].tolist())
  before, after = (np.asarray(s["params"]["mapping"]["tables"]) for s in (initial, state))
  for row in range(len(tables.prompts)):
    moved = not np.array_equal(before[row], after[row])
    assert moved == (row in rendered), row


@pytest.mark.parametrize("kind", ["embedding", "loss"])
def test_interpolation_training_runs(kind):
  config = quick_config(interpolation__kind=kind, interpolation__fraction=1.0)
  state, history, _ = run_steps(config, 2)
  assert all(h["finite"] for h in history)
  assert int(state["step"]) == 2


def test_interpolation_needs_a_mapping_that_reads_the_embedding():
  config = quick_config(mapping__kind="per_prompt", interpolation__kind="loss")
  with pytest.raises(ValueError, match="per_prompt"):
    prompt_data.num_mixed(config)


def test_train_step_compiles_once_over_ten_steps():
  config = quick_config()
  _, _, (_, _, _, step_fn) = run_steps(config, 10)
  assert step_fn._cache_size() == 1  # pylint: disable=protected-access


def test_non_finite_step_is_skipped_and_counted():
  config = quick_config()
  _, tables, _, state, mesh, step_fn = setup(config)
  key = jax.random.key(0)

  def batch(step):
    batch = prompt_data.sample_batch(config, tables, step)
    if step == 1:  # a NaN guidance weight makes this step's loss and gradient NaN
      batch["guidance_scale"] = np.full_like(batch["guidance_scale"], np.nan)
    return jax.device_put(batch, sharding.data_sharding(mesh))
  state, _ = step_fn(state, batch(0), key)
  snapshot = jax.tree.map(np.array, state)
  state, metrics = step_fn(state, batch(1), key)
  assert not bool(metrics["finite"])
  assert int(state["nan_total"]) == 1 and int(state["nan_streak"]) == 1
  for name in ("params", "stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state[name]),
                 snapshot[name])
  state, metrics = step_fn(state, batch(2), key)
  assert bool(metrics["finite"]) and int(state["nan_streak"]) == 0
  assert int(state["nan_total"]) == 1


def test_batch_must_divide_over_devices():
  config = quick_config(batch__prompts_per_step=3)
  if len(jax.devices()) == 1:
    sharding.make_mesh(config)  # 3 rows on one device is fine
  else:
    with pytest.raises(ValueError, match="multiple of"):
      sharding.make_mesh(config)


_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    import test_train
    config = test_train.quick_config(train__model_parallelism={model})
    state, history, _ = test_train.run_steps(config, 3)
    leaves = jax.tree.leaves(state["params"])
    sharded = any("model" in str(getattr(x.sharding, "spec", "")) for x in leaves)
    print(json.dumps({{"devices": len(jax.devices()), "sharded": sharded,
                      "grad_norm": [float(h["grad_norm"]) for h in history],
                      "param_sum": float(sum(np.abs(np.asarray(x)).sum() for x in leaves))}}))
""")


def _run_on_devices(num_devices: int, model_parallelism: int = 1) -> dict:
  env = conftest.entry_point_env(f"{xla_cpu.HOST_DEVICES_FLAG}={num_devices}",
                                 JAX_PLATFORMS="cpu")
  script = _DEVICE_SCRIPT.format(tests=os.path.join(REPO, "tests"), model=model_parallelism)
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


# 4 devices as 4 x "data" (slow: the 2 x 2 mesh below also splits "data", and
# test_xla_cpu trains main.py over 2 data devices) and as 2 "data" x 2 "model".
@pytest.mark.parametrize("model_parallelism", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_four_devices_match_one_device(model_parallelism):
  """4 devices: data parallel, or 2 x 2 with the hypernet's output layer split."""
  one, four = _run_on_devices(1), _run_on_devices(4, model_parallelism)
  assert (one["devices"], four["devices"]) == (1, 4)
  assert four["sharded"] == (model_parallelism > 1) and not one["sharded"]
  np.testing.assert_allclose(four["grad_norm"], one["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(four["param_sum"], one["param_sum"], rtol=1e-5)


def test_prompts_file_trains_every_line_and_holds_none_out(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("# my prompts\na red cube\na dragon made of glass\n")
  config = quick_config(prompts__file=str(path))
  prompt_set = prompt_data.load_prompts(config)
  assert prompt_set.train == ["a red cube", "a dragon made of glass"]
  assert prompt_set.heldout == []
  path.write_text("a red cube\n\na blue torus\n")
  with pytest.raises(ValueError, match=r"prompts.txt:2: blank line"):
    prompt_data.load_prompts(config)
  path.write_text("# nothing but a comment\n")
  with pytest.raises(ValueError, match="prompts.file.*holds no prompts"):
    prompt_data.load_prompts(config)
  with pytest.raises(ValueError, match="missing"):
    prompt_data.load_prompts(quick_config(prompts__file=str(tmp_path / "absent.txt")))


def test_prompts_file_run_evaluates_the_training_prompts_only(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("a red cube\na blue torus\n")
  config = quick_config(prompts__file=str(path), batch__prompts_per_step=2)
  built = build_lib.build(config, guidance=oracle_guidance())
  assert built.train_tables.prompts == ["a red cube", "a blue torus"]
  assert built.heldout_tables is None
  config.eval.elevations_deg = (20.0,)
  config.eval.views_per_elevation = 2
  config.eval.kind = "shapes"  # both prompts are in the shapes grammar: GT exists
  results = evaluation.evaluate(config, built.model, built.guidance, built.state["params"],
                                built.state["stats"], built.train_tables, None, 0.0)
  assert results["heldout"] is None
  assert [row["prompt"] for row in results["per_prompt"]] == ["a red cube", "a blue torus"]


def test_unknown_prompt_set_lists_the_available_ones():
  config = quick_config(prompts__set="shapes_9000")
  with pytest.raises(ValueError, match="available"):
    prompt_data.load_prompts(config)


def _main_config(model_dir, **overrides):
  config = quick_config(**overrides)
  config.guidance.path = model_dir
  config.train.progress_bar = False
  config.eval.elevations_deg = (20.0,)
  config.eval.views_per_elevation = 2
  return config


def test_quick_main_writes_eval_json_and_outputs(tiny_shapes_model, tmp_path):
  config = _main_config(tiny_shapes_model)
  results = train.train_and_evaluate(config, str(tmp_path))
  saved = json.loads((tmp_path / "eval.json").read_text())
  assert saved["frames_per_prompt"] == pytest.approx(
      20 * config.batch.prompts_per_step * config.batch.views_per_prompt / 56)
  for split, count in (("train", 56), ("heldout", 8)):
    assert set(saved[split]) == set(shapes_eval.METRIC_NAMES)
    assert sum(row["split"] == split for row in saved["per_prompt"]) == count
  assert results["heldout"] == saved["heldout"]
  heldout_dir = tmp_path / "outputs" / "heldout"
  assert len(list(heldout_dir.glob("*.gif"))) == 8
  assert len(list((tmp_path / "outputs" / "train").glob("*.gif"))) == 2
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4
  events = test_tensorboard.read_events(tmp_path / "tensorboard")
  assert {"eval/train/iou", "eval/heldout/iou", "eval/per_prompt/text_summary"} <= set(events)
  assert sum(tag.startswith("outputs/heldout/") for tag in events) == 8  # contact sheets
  # A second run resumes at the end: nothing left to train, same metrics; it
  # writes the outputs again, of the first 3 held-out prompts when told so.
  shutil.rmtree(tmp_path / "outputs")
  config.eval.num_heldout_outputs = 3
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["train"] == results["train"]
  assert len(list(heldout_dir.glob("*.gif"))) == 3


def test_resumed_run_equals_uninterrupted_run(tiny_shapes_model, tmp_path):
  config = _main_config(tiny_shapes_model)
  config.train.num_steps = 8
  config.train.checkpoint_every = 3
  config.eval.write_outputs = False

  def final_state(workdir, stop_at=None):
    if stop_at is None:
      train.train_and_evaluate(config, str(workdir))
    else:
      train_until(config, str(workdir), stop_at)
    return checkpoints.restore_latest(checkpoints.checkpoint_manager(workdir, 3),
                                      setup(config, build_lib.load_guidance(config))[3])

  straight = final_state(tmp_path / "straight")
  assert final_state(tmp_path / "resumed", stop_at=5)["step"] == 5
  resumed = final_state(tmp_path / "resumed")
  assert int(resumed["step"]) == int(straight["step"]) == 8
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed),
               jax.tree.map(np.asarray, straight))


def test_workdir_of_another_config_is_refused(tiny_shapes_model, tmp_path):
  """Before anything is written: the workdir's config.json stays the run's.
  (A workdir as a run leaves it: its config.json and a checkpoint folder.)"""
  config = _main_config(tiny_shapes_model)
  (tmp_path / checkpoints.CHECKPOINT_DIR / "2").mkdir(parents=True)
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  other = _main_config(tiny_shapes_model, mapping__kind="concat")
  with pytest.raises(ValueError, match="mapping"):
    train.train_and_evaluate(other, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["mapping"]["kind"] == "hypernet"


def test_eval_rows_are_all_or_the_same_fixed_subset():
  np.testing.assert_array_equal(evaluation.eval_rows(5, 0), np.arange(5))
  np.testing.assert_array_equal(evaluation.eval_rows(5, 8), np.arange(5))
  rows = evaluation.eval_rows(400, 32)
  assert len(rows) == 32 and np.all(np.diff(rows) > 0) and rows.max() < 400
  np.testing.assert_array_equal(rows, evaluation.eval_rows(400, 32))  # every evaluation
