"""Instant generation from a trained (here: tiny, 2-step) ATT3D model."""

import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from att3d_jax import build
from att3d_jax import checkpoints
from att3d_jax import evaluation
from att3d_jax import generate
from att3d_jax import names
from att3d_jax import train
from configs import shapes as shapes_config

pytestmark = pytest.mark.usefixtures("module_compilation_cache")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_config(tiny_shapes_model):
  """configs/shapes.py:quick on the tiny guidance model: 2 steps, a small eval."""
  config = shapes_config.get_config("quick")
  config.guidance.path = tiny_shapes_model
  config.train.num_steps = 2
  config.train.progress_bar = False
  config.eval.write_outputs = False
  config.eval.elevations_deg = (20.0,)
  config.eval.views_per_elevation = 2
  return config


@pytest.fixture(scope="module")
def trained_dir(tiny_shapes_model, tmp_path_factory):
  config = _run_config(tiny_shapes_model)
  workdir = tmp_path_factory.mktemp("att3d_run")
  train.train_and_evaluate(config, str(workdir))
  return workdir


def test_export_keeps_params_and_drops_optimizer_state(trained_dir, tmp_path):
  exported = generate.export_model(str(trained_dir), str(tmp_path / "export"))
  from_workdir = generate.load_trained(str(trained_dir))
  from_export = generate.load_trained(str(exported))
  jax.tree.map(np.testing.assert_array_equal, from_workdir.params, from_export.params)
  jax.tree.map(np.testing.assert_array_equal, from_workdir.stats, from_export.stats)
  size = (exported / checkpoints.PARAMS_FILE).stat().st_size
  checkpoint_size = sum(p.stat().st_size for p in (trained_dir / "checkpoints").rglob("*")
                        if p.is_file()) / len(list((trained_dir / "checkpoints").iterdir()))
  assert size < checkpoint_size


def test_generate_writes_every_output_and_reports_latency(trained_dir, tmp_path):
  generator = generate.Generator(generate.load_trained(str(trained_dir)), image_size=16)
  timings = generate.generate_prompt(generator, "a red cube", tmp_path, num_frames=4,
                                     mesh_resolution=16)
  assert timings["kind"] == "seen"
  assert set(timings) >= {"embed_ms", "mapping_ms", "render_ms", "mesh_ms"}
  for suffix in (".gif", ".mp4", ".png"):
    assert (tmp_path / f"a_red_cube{suffix}").is_file()
  json.dumps(timings)


def test_prompt_kinds(trained_dir):
  trained = generate.load_trained(str(trained_dir))
  assert generate.describe_prompt(trained, "a red cube") == "seen"
  assert generate.describe_prompt(trained, "a red sphere") == "unseen"  # held out
  assert generate.describe_prompt(trained, "a flying banana") == "out of distribution"
  with pytest.raises(ValueError, match="empty"):
    generate.describe_prompt(trained, "   ")


def test_out_of_grammar_prompt_still_generates(trained_dir, tmp_path):
  generator = generate.Generator(generate.load_trained(str(trained_dir)), image_size=16)
  timings = generate.generate_prompt(generator, "a flying banana", str(tmp_path),
                                     num_frames=2, mesh_resolution=16)
  assert timings["kind"] == "out of distribution"
  assert (tmp_path / "a_flying_banana.gif").is_file()


def test_interpolation_writes_video_and_strip(trained_dir, tmp_path):
  generator = generate.Generator(generate.load_trained(str(trained_dir)), image_size=16)
  # A str folder, as the notebook passes it (tempfile.mkdtemp()).
  strip = generate.interpolate(generator, "a red cube", "a blue torus", str(tmp_path),
                               num_frames=4)
  assert strip.is_file()
  assert (tmp_path / "a_red_cube_to_a_blue_torus.mp4").is_file()


class _Initialized(Exception):
  pass


def test_a_fresh_run_with_init_from_initializes_before_training(tiny_shapes_model, tmp_path,
                                                                 monkeypatch):
  """The loop's call, cheaply: it happens at step 0, before anything trains."""
  def initialize_from(config, model, state):
    raise _Initialized(int(state["step"]))
  monkeypatch.setattr(train, "initialize_from", initialize_from)
  config = _run_config(tiny_shapes_model)
  config.train.init_from = "any"
  with pytest.raises(_Initialized, match="^0$"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not list((tmp_path / "run").glob(f"{checkpoints.CHECKPOINT_DIR}/*"))  # nothing saved


@pytest.mark.slow
def test_fine_tune_starts_from_an_exported_model(trained_dir, tiny_shapes_model, tmp_path,
                                                 capsys):
  """train.init_from end to end: the run's first params are the source's (a
  1-step run at learning rate 0 ends with them)."""
  exported = generate.export_model(str(trained_dir), str(tmp_path / "export"))
  source = generate.load_trained(str(exported))
  config = _run_config(tiny_shapes_model)
  config.train.init_from = str(exported)
  config.train.num_steps = 1
  config.optim.lr_mapping = config.optim.lr_mlp = 0.0
  train.train_and_evaluate(config, str(tmp_path / "fine_tune"))
  assert f"initialized the params and stats from {exported}" in capsys.readouterr().out
  tuned = generate.load_trained(str(tmp_path / "fine_tune"))
  jax.tree.map(np.testing.assert_array_equal, tuned.params, source.params)
  fresh = build.build(config, for_training=False).state["params"]  # a random init differs
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, fresh, source.params)))


def test_initialize_from_a_workdir_keeps_a_fresh_optimizer(trained_dir, tiny_shapes_model):
  config = _run_config(tiny_shapes_model)
  config.train.init_from = str(trained_dir)
  built = build.build(config, for_training=False)
  state = train.initialize_from(config, built.model, built.state)
  source = generate.load_trained(str(trained_dir))
  jax.tree.map(np.testing.assert_array_equal, (state["params"], state["stats"]),
               (source.params, source.stats))
  assert int(state["step"]) == 0
  jax.tree.map(np.testing.assert_array_equal, state["opt_state"], built.state["opt_state"])


def test_weights_of_another_model_config_are_refused(trained_dir, tiny_shapes_model, tmp_path):
  """An export whose config.json is not the one its params were made with (and
  init_from with another model config) fail naming the arrays, not later."""
  other = _run_config(tiny_shapes_model)
  other.hashgrid.log2_table_size = 10
  exported = generate.export_model(str(trained_dir), str(tmp_path / "export"))
  (exported / "config.json").write_text(other.to_json_best_effort())
  message = r"do not fit this config's model \(\d+ of \d+ arrays differ: \['params'\]"
  with pytest.raises(ValueError, match=message):
    generate.load_trained(str(exported))
  other.train.init_from = str(trained_dir)
  built = build.build(other, for_training=False)
  with pytest.raises(ValueError, match="do not fit this config's model"):
    train.initialize_from(other, built.model, built.state)


def test_corrupt_or_missing_weights_are_named(trained_dir, tiny_shapes_model, tmp_path):
  exported = generate.export_model(str(trained_dir), str(tmp_path / "export"))
  params_file = exported / checkpoints.PARAMS_FILE
  params_file.write_bytes(params_file.read_bytes()[:100])
  with pytest.raises(ValueError, match="not a readable export"):
    generate.load_trained(str(exported))
  config = _run_config(tiny_shapes_model)
  config.train.init_from = str(tmp_path / "nowhere")
  built = build.build(config, for_training=False)
  with pytest.raises(FileNotFoundError, match=r"--config.train.init_from=.*nowhere"):
    train.initialize_from(config, built.model, built.state)


def test_a_per_prompt_model_starts_only_from_the_same_prompts(tiny_shapes_model, tmp_path):
  config = _run_config(tiny_shapes_model)
  config.mapping.kind = "per_prompt"
  source = tmp_path / "source"
  source.mkdir()
  (source / "config.json").write_text(config.to_json_best_effort())
  config.prompts.file = str(tmp_path / "prompts.txt")
  (tmp_path / "prompts.txt").write_text("a red cube\na blue torus\n")
  config.train.init_from = str(source)
  built = build.build(config, for_training=False)
  with pytest.raises(ValueError, match="same prompts .*prompts.file"):
    train.initialize_from(config, built.model, built.state)

  # The same prompts with another text-cache size are the same grids.
  config.prompts.file = ""
  config.prompts.text_cache_mb = 1
  built = build.build(config, for_training=False)
  (source / checkpoints.PARAMS_FILE).write_bytes(flax.serialization.to_bytes(
      {"params": built.state["params"], "stats": built.state["stats"]}))
  state = train.initialize_from(config, built.model, built.state)
  jax.tree.map(np.testing.assert_array_equal, state["params"], built.state["params"])


def _triplane_config(tiny_shapes_model):
  config = shapes_config.get_config("quick")
  config.guidance.path = tiny_shapes_model
  config.mapping.kind = "triplane"
  config.mapping.triplane_resolution = 16
  config.eval.turntable_frames = 2
  config.eval.turntable_size = 16
  config.eval.mesh_resolution = 16
  return config


def _check_generates_unseen(trained, out_dir):
  """An unseen prompt through the Generator: turntable and mesh written."""
  generator = generate.Generator(trained, image_size=16)
  timings = generate.generate_prompt(generator, "a red sphere", out_dir, num_frames=2,
                                     mesh_resolution=16)
  assert timings["kind"] == "unseen"
  assert (out_dir / "a_red_sphere.gif").is_file()
  assert (out_dir / "a_red_sphere.obj").is_file()


def test_triplane_model_writes_outputs_and_generates(tiny_shapes_model, tmp_path):
  """mapping.kind=triplane's per-prompt triplanes through evaluation's
  turntables and meshes and through generation (untrained: the blob)."""
  config = _triplane_config(tiny_shapes_model)
  built = build.build(config)
  params, stats = built.state["params"], built.state["stats"]
  evaluation.write_outputs(config, built.model, built.guidance, params, stats,
                           built.train_tables, np.arange(1), tmp_path / "outputs")
  name = names.for_prompt(built.train_tables.prompts[0])
  assert (tmp_path / "outputs" / f"{name}.obj").is_file()
  trained = generate.TrainedModel(config, built.model, params, stats, built.guidance,
                                  built.prompt_set.train)
  _check_generates_unseen(trained, tmp_path / "out")


@pytest.mark.slow
def test_triplane_model_trains_evaluates_and_generates(tiny_shapes_model, tmp_path):
  """mapping.kind=triplane through the whole path: a train step, evaluation
  with turntables and meshes (write_outputs), checkpoint, generation."""
  config = _triplane_config(tiny_shapes_model)
  config.train.num_steps = 1
  config.train.progress_bar = False
  config.eval.elevations_deg = (20.0,)
  config.eval.views_per_elevation = 2
  config.eval.num_train_outputs = 1
  config.eval.max_heldout_prompts = 1
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  assert json.loads((workdir / "eval.json").read_text())["heldout"] is not None
  trained = generate.load_trained(str(workdir))
  assert trained.params["mapping"]["output"]["kernel"].shape[-1] == (
      config.mapping.triplane_features)
  _check_generates_unseen(trained, tmp_path / "out")


def test_compilation_cache_is_written_and_off_when_empty(tmp_path):
  """A jitted program lands in the cache folder; "" leaves JAX's settings alone."""
  script = (
      "import jax, jax.numpy as jnp, sys\n"
      "from att3d_jax import compilation_cache\n"
      "compilation_cache.enable('', 0.0)\n"
      "assert jax.config.jax_compilation_cache_dir is None\n"
      "compilation_cache.enable(sys.argv[1], 0.0)\n"
      "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n")
  cache = tmp_path / "cache"
  subprocess.run([sys.executable, "-c", script, str(cache)], check=True, cwd=REPO,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert any(cache.iterdir())


def test_meshes_of_more_prompts_compile_nothing_new(tiny_shapes_model):
  """After one prompt's mesh, another prompt's mesh of the same resolution
  compiles nothing: the field is evaluated through one jitted function whose
  params are arguments, in power-of-two chunk shapes (per-prompt compiles made
  100 prompts' outputs take minutes)."""
  config = _triplane_config(tiny_shapes_model)
  config.mapping.kind = "hypernet"
  built = build.build(config, for_training=False)
  params, stats = built.state["params"], built.state["stats"]
  embedding = built.guidance.embed(["a red sphere", "a small blue cube wearing a red beanie"])
  mapped, _ = built.model.apply_mapping(params, stats, embedding, np.zeros(2, np.int32))
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **kwargs: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  meshes = []
  for i in range(2):
    tables = jax.tree.map(lambda x, i=i: x[i], mapped.tables)
    before = len(compiles)
    meshes.append(built.model.extract_mesh(params["mlp"], tables, None, resolution=24))
    new = len(compiles) - before
  assert new == 0, f"the second prompt's mesh compiled {new} programs"
  assert len(meshes[1].vertices) > 0
