"""Shapes world: grammar, parsing, prompt sets, colors and the primitive SDFs."""

import itertools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.shapes import gt_render
from att3d_jax.shapes import prompt_sets
from att3d_jax.shapes import scenes

# ---------------------------------------------------------------------------
# Grammar and parsing.


def test_grammar_has_enough_distinct_prompts():
  prompts = scenes.all_prompts()
  assert len(prompts) == len(set(prompts)) == 3200
  assert len(scenes.SHAPES) >= 8 and len(scenes.COLORS) >= 8
  for required in ("sphere", "cube", "cylinder", "cone", "torus"):
    assert required in scenes.SHAPES
  for required in ("red", "green", "blue", "yellow", "purple"):
    assert required in scenes.COLORS


def test_canonical_prompts():
  assert scenes.prompt_of(scenes.Scene("red", "cube")) == "a red cube"
  assert scenes.prompt_of(scenes.Scene("orange", "cube")) == "an orange cube"
  assert scenes.prompt_of(
      scenes.Scene("blue", "torus", "small", "party hat", "yellow")
  ) == "a small blue torus wearing a yellow party hat"
  assert scenes.prompt_of(
      scenes.Scene("white", "octahedron", "", "top hat", "orange")
  ) == "a white octahedron wearing an orange top hat"


def test_parse_round_trips_every_prompt():
  for scene in scenes.all_scenes():
    prompt = scenes.prompt_of(scene)
    parsed = scenes.parse_prompt(prompt)
    assert parsed == scene, prompt
    assert scenes.prompt_of(parsed) == prompt


def test_parse_ignores_case_spacing_and_article():
  expected = scenes.Scene("orange", "cube", "small", "beanie", "white")
  assert scenes.parse_prompt("  A small  ORANGE cube wearing an White beanie ") == expected
  assert hash(expected) == hash(scenes.parse_prompt(scenes.prompt_of(expected)))


@pytest.mark.parametrize("prompt, expected_words", [
    ("a red cubee", ["'cubee'", "'cube'"]),
    ("a bleu sphere", ["'bleu'", "'blue'"]),
    ("a tiny red cone", ["'tiny'", "'small'"]),
    ("a red cube wearing a yelow party hatt", ["'yelow'", "'yellow'", "'party hatt'",
                                               "'party hat'"]),
    ("a red cube wearing a party hat", ["'party'", "'hat'"]),
    ("red cube", ["'a' or 'an'"]),
    ("a red cube, front view", ["strip_view_suffix"]),
    ("a dog", ["'[small] <color> <shape>' after the article, got 'dog'"]),
])
def test_parse_rejects_prompts_outside_the_grammar(prompt, expected_words):
  with pytest.raises(ValueError) as error:
    scenes.parse_prompt(prompt)
  for word in expected_words + [repr(prompt)]:
    assert word in str(error.value)


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_parse_rejects_empty_prompts(prompt):
  with pytest.raises(ValueError, match="empty prompt") as error:
    scenes.parse_prompt(prompt)
  assert repr(prompt) in str(error.value)


def test_strip_view_suffix():
  assert scenes.strip_view_suffix("a red cube, side view") == "a red cube"
  assert scenes.strip_view_suffix("a red cube, overhead view") == "a red cube"
  assert scenes.strip_view_suffix("a red cube") == "a red cube"


@pytest.mark.parametrize("kwargs, message", [
    (dict(color="teal", shape="cube"), "color='teal'"),
    (dict(color="red", shape="cube", hat="top hat"), "both hat and hat_color"),
    (dict(color="red", shape="cube", hat="crown", hat_color="red"), "hat='crown'"),
    (dict(color="red", shape="cube", size="large"), "size='large'"),
])
def test_scene_validates_its_fields(kwargs, message):
  with pytest.raises(ValueError, match=message):
    scenes.Scene(**kwargs)


# ---------------------------------------------------------------------------
# Prompt sets.


def test_prompt_files_are_in_sync_with_their_generator():
  for relative_path, text in prompt_sets.generate_prompt_files().items():
    path = prompt_sets.PROMPTS_DIR / relative_path
    assert path.read_text() == text, (
        f"{path} is stale: run `python -m att3d_jax.shapes.prompt_sets`")


def test_pig64_is_the_color_shape_grid_minus_its_diagonal():
  pig = prompt_sets.load_prompt_set("shapes_pig64")
  assert len(pig.train) == 56 and len(pig.heldout) == 8
  grid = {scenes.prompt_of(scenes.Scene(c, s)) for c in scenes.COLORS
          for s in scenes.SHAPES}
  assert set(pig.train) | set(pig.heldout) == grid
  assert not set(pig.train) & set(pig.heldout)
  diagonal = [scenes.parse_prompt(p) for p in pig.heldout]
  assert [(s.color, s.shape) for s in diagonal] == list(zip(scenes.COLORS,
                                                            scenes.SHAPES))


def test_shapes2400_splits_are_nested_disjoint_and_cover_every_factor():
  sets = {split: prompt_sets.load_prompt_set("shapes_2400", split)
          for split in ("12.5%", "50%", "100%")}
  sizes = {split: len(s.train) for split, s in sets.items()}
  assert sizes == {"12.5%": 250, "50%": 1000, "100%": 2000}
  small, half, full = (sets[k].train for k in ("12.5%", "50%", "100%"))
  assert full[:len(half)] == half and half[:len(small)] == small
  heldout = sets["100%"].heldout
  assert len(heldout) == len(set(heldout)) == 400
  assert len(set(full)) == 2000 and not set(full) & set(heldout)
  assert all(s.heldout == heldout for s in sets.values())
  # Every factor value appears in the smallest train split, so held-out
  # prompts are new combinations, never new words.
  train_scenes = [scenes.parse_prompt(p) for p in small]
  for field, values in (("color", scenes.COLORS), ("shape", scenes.SHAPES),
                        ("size", scenes.SIZES), ("hat", scenes.HATS),
                        ("hat_color", scenes.COLORS)):
    assert set(values) <= {getattr(s, field) for s in train_scenes}, field


def test_prompt_sets_are_deterministic():
  assert prompt_sets.shapes2400_prompts() == prompt_sets.shapes2400_prompts()
  assert prompt_sets.pig64_prompts() == prompt_sets.pig64_prompts()


def test_load_rejects_unknown_names_and_splits():
  with pytest.raises(ValueError, match="shapes_pig64.*shapes_2400"):
    prompt_sets.load_prompt_set("animals9000")
  with pytest.raises(ValueError, match=r"'12.5%'.*'50%'.*'100%'"):
    prompt_sets.load_prompt_set("shapes_2400", split="25%")


@pytest.mark.parametrize("bad_line, message", [
    ("a red cubee", "'cube'"),
    ("", "blank line"),
    (" a red cube", "whitespace"),
    (None, "duplicate prompt"),  # None: repeat the line above.
])
def test_load_names_file_and_line_of_a_malformed_prompt(tmp_path, bad_line,
                                                        message):
  shutil.copytree(prompt_sets.PROMPTS_DIR, tmp_path, dirs_exist_ok=True)
  path = tmp_path / "shapes_2400" / "heldout.txt"
  lines = path.read_text().splitlines()
  lines[9] = lines[8] if bad_line is None else bad_line  # Line 10 of the file.
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message) as error:
    prompt_sets.load_prompt_set("shapes_2400", directory=tmp_path)
  assert f"{path}:10:" in str(error.value)


def test_load_names_a_missing_file(tmp_path):
  with pytest.raises(ValueError, match="missing"):
    prompt_sets.load_prompt_set("shapes_pig64", directory=tmp_path)


# ---------------------------------------------------------------------------
# Colors.


def test_every_shaded_color_stands_out_from_the_background():
  shading = np.linspace(gt_render.AMBIENT, 1.0, 41)
  background = np.array(scenes.BACKGROUND_RGB)
  for name, rgb in scenes.COLORS.items():
    rgb = np.array(rgb)
    assert np.all((rgb >= 0) & (rgb <= 1)), name
    distance = np.linalg.norm(shading[:, None] * rgb - background, axis=-1)
    assert distance.min() >= 0.3, (name, distance.min())


# ---------------------------------------------------------------------------
# Primitive SDFs against independent numpy inside tests.

H = scenes.OBJECT_HALF_HEIGHT


def _rho(p):
  return np.hypot(p[..., 0], p[..., 1])


def _capsule_inside(p, radius, half_height, center_z=0.0):
  half_segment = half_height - radius
  z = np.clip(p[..., 2] - center_z, -half_segment, half_segment)
  return np.hypot(_rho(p), p[..., 2] - center_z - z) < radius


def _cone_inside(p, radius, bottom, top):
  z = p[..., 2]
  return (z > bottom) & (z < top) & (_rho(p) < radius * (top - z) / (top - bottom))


INSIDE = {
    "sphere": lambda p: np.linalg.norm(p, axis=-1) < scenes.SPHERE_RADIUS,
    "cube": lambda p: np.abs(p).max(-1) < scenes.CUBE_HALF_SIZE,
    "cylinder": lambda p: (_rho(p) < scenes.CYLINDER_RADIUS) & (np.abs(p[..., 2]) < H),
    "cone": lambda p: _cone_inside(p, scenes.CONE_BASE_RADIUS, -H, H),
    "torus": lambda p: (np.hypot(np.hypot(p[..., 1], p[..., 2]) - scenes.TORUS_MAJOR_RADIUS,
                                 p[..., 0]) < scenes.TORUS_MINOR_RADIUS),
    "pyramid": lambda p: ((np.abs(p[..., 2]) < H) & (
        np.abs(p[..., :2]).max(-1) < scenes.PYRAMID_BASE_HALF_SIZE * (H - p[..., 2]) / (2 * H))),
    "capsule": lambda p: _capsule_inside(p, scenes.CAPSULE_RADIUS, H),
    "octahedron": lambda p: np.abs(p).sum(-1) < scenes.OCTAHEDRON_RADIUS,
    "party hat": lambda p: _cone_inside(p, scenes.PARTY_HAT_RADIUS, 0.0,
                                        scenes.PARTY_HAT_HEIGHT),
    "top hat": lambda p: (p[..., 2] > 0) & (
        ((_rho(p) < scenes.TOP_HAT_BRIM_RADIUS) & (p[..., 2] < scenes.TOP_HAT_BRIM_THICKNESS))
        | ((_rho(p) < scenes.TOP_HAT_CROWN_RADIUS) & (p[..., 2] < scenes.TOP_HAT_HEIGHT))),
    "beanie": lambda p: (p[..., 2] > 0) & _capsule_inside(
        p, scenes.BEANIE_RADIUS, scenes.BEANIE_HEIGHT / 2, scenes.BEANIE_HEIGHT / 2),
}
SDFS = dict(zip(scenes.SHAPES, scenes.SHAPE_SDFS)) | dict(zip(scenes.HATS, scenes.HAT_SDFS))
EXACT = ("sphere", "cube", "cylinder", "cone", "torus", "capsule", "party hat")


def _sample_points(name, rng, num_points):
  """Uniform points in a box around the primitive (hats start at z = 0)."""
  points = rng.uniform(-0.6, 0.6, (num_points, 3))
  if name in scenes.HATS:
    points = 0.6 * points + np.array([0.0, 0.0, 0.2])
  return points.astype(np.float32)


@pytest.mark.parametrize("name", list(SDFS))
def test_sdf_sign_and_lower_bound(name):
  rng = np.random.default_rng(0)
  points = _sample_points(name, rng, 1500)
  distance = np.asarray(SDFS[name](jnp.asarray(points)))
  inside = INSIDE[name](points)
  assert inside.mean() > 0.03  # The sample sees the shape.
  away = np.abs(distance) > 1e-4
  np.testing.assert_array_equal((distance < 0)[away], inside[away])
  # A lower bound: the open ball of radius |d| around each point holds no
  # boundary, i.e. all of it is on the point's side.
  offsets = rng.normal(size=(1, 64, 3))
  offsets *= rng.uniform(0, 1, (1, 64, 1)) ** (1 / 3) / np.linalg.norm(offsets, axis=-1,
                                                                       keepdims=True)
  ball = points[:, None] + 0.999 * np.abs(distance)[:, None, None] * offsets
  np.testing.assert_array_equal(INSIDE[name](ball), np.broadcast_to(inside[:, None],
                                                                    ball.shape[:2]))


@pytest.mark.parametrize("name", EXACT)
def test_exact_sdf_points_at_the_nearest_surface_point(name):
  """q = p - d(p) grad d(p) is on the boundary (the numpy inside test changes
  within 5e-4 of it): with the lower bound above, |d| is the exact distance."""
  rng = np.random.default_rng(1)
  points = jnp.asarray(_sample_points(name, rng, 1000))
  distance, gradient = jax.vmap(jax.value_and_grad(SDFS[name]))(points)
  np.testing.assert_allclose(np.linalg.norm(gradient, axis=-1), 1.0, atol=1e-4)
  surface = np.asarray(points - distance[:, None] * gradient)
  offsets = rng.normal(size=(1, 256, 3))
  offsets *= 5e-4 / np.linalg.norm(offsets, axis=-1, keepdims=True)
  inside = INSIDE[name](surface[:, None] + offsets)
  assert inside.any(axis=1).all() and not inside.all(axis=1).any()


def _axis_extent(distance, z):
  occupied = z[np.asarray(distance) < 0]
  return occupied.min(), occupied.max()


def test_every_scene_fits_its_bound_and_wears_its_hat_on_top():
  rng = np.random.default_rng(2)
  directions = rng.normal(size=(1500, 3))
  directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
  radii = np.linspace(0.0, 1.0, 161)
  radial = jnp.asarray(directions[:, None] * radii[:, None], jnp.float32)
  z = np.linspace(-1.0, 1.0, 4001)
  axis = jnp.asarray(np.stack([0 * z, 0 * z, z], -1), jnp.float32)
  sdf_parts = jax.jit(scenes.scene_sdf_parts)
  for shape, hat in itertools.product(scenes.SHAPES, (None,) + scenes.HATS):
    scene = scenes.encode_scene(scenes.Scene("red", shape, "", hat, hat and "blue"))
    occupied = np.asarray(jnp.minimum(*sdf_parts(radial, scene)) < 0)
    assert radii[occupied.any(0)].max() <= scenes.MAX_SCENE_RADIUS, (shape, hat)
    object_distance, hat_distance = sdf_parts(axis, scene)
    object_bottom, object_top = _axis_extent(object_distance, z)
    if hat is None:
      np.testing.assert_allclose([object_bottom, object_top], [-H, H], atol=1e-3)
      continue
    hat_bottom, hat_top = _axis_extent(hat_distance, z)
    # Centered together; the hat touches the object and is >= 1/3 as tall.
    np.testing.assert_allclose(object_bottom + hat_top, 0.0, atol=1e-3)
    assert object_top - scenes.HAT_SINK - 1e-3 <= hat_bottom <= object_top
    assert hat_top - hat_bottom >= (object_top - object_bottom) / 3
