"""The shapes world: primitives, colors, hats, the prompt grammar and scene SDFs.

A scene is one colored primitive standing on the z axis, optionally wearing a
colored hat, at one of two sizes. Prompts follow a small grammar:

  "a [small] <color> <shape>[ wearing a <hat color> <hat>]"

with "an" instead of "a" before a vowel ("an orange cube", "a small orange
cube"). 2 sizes x 8 colors x 8 shapes x (1 + 3 hats x 8 hat colors) gives 3200
prompts, mirroring ATT3D's compositional Animal2400 set.

Geometry (world units; the scene lives well inside the radius-1 bounding sphere
that the NeRF uses, see `nerf/cameras.py` for the frame: +z up, front = +x):
  * Every object has half-height OBJECT_HALF_HEIGHT = 0.4 at the default size
    and is centered at the origin, so it spans z in [-0.4, 0.4].
  * A hat sits on the object's top (sunk by HAT_SINK so it touches round and
    pointed tops) and is 0.3-0.36 tall and 0.44-0.6 wide, i.e. >= 3/8 of
    the object's height, so it stays visible at 32x32 (tested).
  * With a hat, object + hat are shifted down together so that their vertical
    extent is centered at the origin (|z| <= 0.57); every point of every
    scene is within MAX_SCENE_RADIUS = 0.8 of the origin (tested).
  * "small" scales the object by 0.6, a 1.67x size difference. Hats keep
    their size: scaled along, a party hat on a small object would cover ~10
    pixels at 32x32, too few to tell hats apart (now >= 20, tested).

Colors: albedos are saturated, and the background is a muted slate teal, a hue
no object uses, so that every object color stays >= 0.3 away (rgb Euclidean)
from the background under any lambertian shading factor in [AMBIENT, 1] --
including white, which on a white background would vanish (tested).

The SDFs are exact except the pyramid, the octahedron, the beanie's flat cut
and unions (top hat, object + hat) inside, which are bounds: never above the
true distance, and zero exactly on the surface. Bounds are all sphere tracing
needs.
"""

import dataclasses
import difflib
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from att3d_jax.nerf import cameras as cameras_lib

# ----------------------------------------------------------------------------
# Vocabulary.

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "capsule",
          "octahedron")

# Albedo rgb in [0, 1]. Order matters: the Pig64 analog holds out color i with
# shape i.
COLORS = {
    "red": (0.85, 0.10, 0.10),
    "orange": (1.00, 0.50, 0.05),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.65, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.80),
    "pink": (1.00, 0.55, 0.75),
    "white": (0.95, 0.95, 0.95),
}

HATS = ("party hat", "top hat", "beanie")

# Size word -> scale of the object (not its hat). "" is the default size (no word).
SIZES = {"": 1.0, "small": 0.6}

BACKGROUND_RGB = (0.25, 0.45, 0.50)

# Camera ranges of the shapes world (see nerf/cameras.py sample_cameras), shared
# by the diffusion model's training renders, ATT3D's NeRF renders and the
# judge, so all see the same framing: the scene (radius < 0.8) fills 40-70% of
# the image height at every distance.
CAMERA_ELEVATION_RANGE_DEG = (-10.0, 80.0)
CAMERA_AZIMUTH_RANGE_DEG = (-180.0, 180.0)
CAMERA_DISTANCE_RANGE = (1.6, 2.0)
CAMERA_FOV_Y_RANGE_DEG = (40.0, 50.0)
IMAGE_SIZE = 32  # pixels; the resolution the shapes diffusion model works at

# ----------------------------------------------------------------------------
# Geometry constants, world units at the default size.

MAX_SCENE_RADIUS = 0.8  # Every scene lies inside this sphere.
OBJECT_HALF_HEIGHT = 0.4
SPHERE_RADIUS = 0.4
CUBE_HALF_SIZE = 0.4
CYLINDER_RADIUS = 0.3  # Narrower than the cube so face-on views differ.
CONE_BASE_RADIUS = 0.4
TORUS_MAJOR_RADIUS = 0.28  # The ring stands in the yz plane: its hole faces front.
TORUS_MINOR_RADIUS = 0.12
PYRAMID_BASE_HALF_SIZE = 0.4
CAPSULE_RADIUS = 0.22
OCTAHEDRON_RADIUS = 0.4  # Vertex distance from the center.

# Hats, in a frame whose origin is the center of the hat's base.
HAT_SINK = 0.02  # How far the hat base sits below the object's top.
PARTY_HAT_RADIUS = 0.22
PARTY_HAT_HEIGHT = 0.36
TOP_HAT_BRIM_RADIUS = 0.3
TOP_HAT_BRIM_THICKNESS = 0.05
TOP_HAT_CROWN_RADIUS = 0.16
TOP_HAT_HEIGHT = 0.36
BEANIE_RADIUS = 0.26
BEANIE_HEIGHT = 0.3  # A cylinder of height 0.04 capped by a hemisphere.
HAT_HEIGHTS = (PARTY_HAT_HEIGHT, TOP_HAT_HEIGHT, BEANIE_HEIGHT)  # Order of HATS.

NO_HAT = -1  # `hat_index` of a scene without a hat.

# ----------------------------------------------------------------------------
# Scenes and prompts.


@dataclasses.dataclass(frozen=True)
class Scene:
  """One shapes-world scene; hashable, so usable as a dict key."""

  color: str
  shape: str
  size: str = ""
  hat: Optional[str] = None
  hat_color: Optional[str] = None

  def __post_init__(self):
    checks = (("color", self.color, tuple(COLORS)), ("shape", self.shape, SHAPES),
              ("size", self.size, tuple(SIZES)))
    for field, value, valid in checks:
      if value not in valid:
        raise ValueError(f"Scene {field}={value!r} is not one of {valid}")
    if (self.hat is None) != (self.hat_color is None):
      raise ValueError(f"Scene needs both hat and hat_color or neither; got "
                       f"hat={self.hat!r}, hat_color={self.hat_color!r}")
    if self.hat is not None:
      if self.hat not in HATS:
        raise ValueError(f"Scene hat={self.hat!r} is not one of {HATS}")
      if self.hat_color not in COLORS:
        raise ValueError(
            f"Scene hat_color={self.hat_color!r} is not one of {tuple(COLORS)}")


def all_scenes() -> list[Scene]:
  """Every scene of the grammar in a fixed canonical order (3200 scenes)."""
  hat_options = [(None, None)] + [(hat, hat_color) for hat in HATS
                                  for hat_color in COLORS]
  return [Scene(color, shape, size, hat, hat_color)
          for size in SIZES for color in COLORS for shape in SHAPES
          for hat, hat_color in hat_options]


def _with_article(phrase: str) -> str:
  article = "an" if phrase[0] in "aeiou" else "a"
  return f"{article} {phrase}"


def prompt_of(scene: Scene) -> str:
  """The canonical prompt, e.g. "a small blue torus wearing a yellow party hat"."""
  words = [scene.size, scene.color, scene.shape]
  prompt = _with_article(" ".join(word for word in words if word))
  if scene.hat is not None:
    prompt += " wearing " + _with_article(f"{scene.hat_color} {scene.hat}")
  return prompt


def all_prompts() -> list[str]:
  """Canonical prompts of `all_scenes()`, same order."""
  return [prompt_of(scene) for scene in all_scenes()]


def strip_view_suffix(prompt: str) -> str:
  """Removes a trailing view suffix (", front view", ...; see `nerf/cameras.py`)."""
  for label in cameras_lib.VIEW_LABELS:
    suffix = cameras_lib.view_suffix(label)
    if prompt.endswith(suffix):
      return prompt[:-len(suffix)]
  return prompt


GRAMMAR = "'a [small] <color> <shape>[ wearing a <color> <hat>]'"


def _vocabulary_text() -> str:
  return (f"sizes: {[s for s in SIZES if s]} (or none), colors: {list(COLORS)}, "
          f"shapes: {list(SHAPES)}, hats: {list(HATS)}")


def _word_problem(kind: str, word: str, valid) -> Optional[str]:
  """None if `word` is valid, else a description with the nearest valid words."""
  if word in valid:
    return None
  nearest = difflib.get_close_matches(word, list(valid), n=3, cutoff=0.5)
  hint = (f"did you mean {' or '.join(repr(w) for w in nearest)}?" if nearest
          else f"expected one of {list(valid)}")
  return f"unknown {kind} {word!r} ({hint})"


def parse_prompt(prompt: str) -> Scene:
  """Parses a grammar prompt (case and extra spaces are ignored) into a Scene.

  Either article ("a"/"an") is accepted anywhere. A view suffix is not part of
  the grammar: remove it with `strip_view_suffix` first.

  Raises:
    ValueError: for an empty prompt, or one outside the grammar; the message
      names the bad words and the nearest valid ones.
  """
  if not prompt.strip():
    raise ValueError(f"empty prompt {prompt!r}: expected a prompt like {GRAMMAR}, "
                     "e.g. 'a red cube'")

  words = prompt.lower().split()
  object_words, hat_words = words, None
  if "wearing" in words:
    split_at = words.index("wearing")
    object_words, hat_words = words[:split_at], words[split_at + 1:]

  problems = []
  size, color, shape, hat, hat_color = "", None, None, None, None
  if object_words and object_words[0] in ("a", "an"):
    object_words = object_words[1:]
  else:
    problems.append("it must start with 'a' or 'an'")
  if len(object_words) == 3:
    size = object_words[0]
    problems.append(_word_problem("size", size, [s for s in SIZES if s]))
    object_words = object_words[1:]
  if len(object_words) == 2:
    color, shape = object_words
    problems.append(_word_problem("color", color, COLORS))
    problems.append(_word_problem("shape", shape, SHAPES))
  else:
    problems.append(f"expected '[small] <color> <shape>' after the article, got "
                    f"{' '.join(object_words)!r}")

  if hat_words is not None:
    if len(hat_words) < 3 or hat_words[0] not in ("a", "an"):
      problems.append(f"expected 'wearing a <color> <hat>', got "
                      f"'wearing {' '.join(hat_words)}'")
    else:
      hat_color, hat = hat_words[1], " ".join(hat_words[2:])
      problems.append(_word_problem("hat color", hat_color, COLORS))
      problems.append(_word_problem("hat", hat, HATS))

  problems = [p for p in problems if p is not None]
  if problems:
    hint = ""
    if strip_view_suffix(prompt.strip()) != prompt.strip():
      hint = " The prompt ends with a view suffix: call strip_view_suffix first."
    raise ValueError(f"prompt {prompt!r} is outside the shapes grammar {GRAMMAR}: "
                     f"{'; '.join(problems)}.{hint} Valid words: {_vocabulary_text()}")
  return Scene(color=color, shape=shape, size=size, hat=hat, hat_color=hat_color)


# ----------------------------------------------------------------------------
# Signed distance functions. Each maps points [..., 3] to distances [...];
# negative inside.


def _safe_norm(vectors: jax.Array) -> jax.Array:
  """Euclidean norm over the last axis with a finite gradient at zero."""
  return jnp.sqrt(jnp.maximum(jnp.sum(vectors * vectors, axis=-1), 1e-24))


def _shifted_up(points: jax.Array, height) -> jax.Array:
  """Points in a frame whose origin sits at z = height."""
  return points.at[..., 2].add(-height)


def _box_2d_sdf(qx: jax.Array, qy: jax.Array) -> jax.Array:
  """Exact 2D box SDF from the offsets q = |p| - half_extent per axis."""
  outside = _safe_norm(jnp.stack([jnp.maximum(qx, 0.0), jnp.maximum(qy, 0.0)], -1))
  return outside + jnp.minimum(jnp.maximum(qx, qy), 0.0)


def _segment_distance_2d(px, py, ax, ay, bx, by) -> jax.Array:
  """Unsigned distance from points (px, py) to the segment a-b (scalars)."""
  ex, ey = bx - ax, by - ay
  s = jnp.clip(((px - ax) * ex + (py - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
  return _safe_norm(jnp.stack([px - ax - s * ex, py - ay - s * ey], -1))


def sphere_sdf(points: jax.Array, radius: float = SPHERE_RADIUS) -> jax.Array:
  return _safe_norm(points) - radius


def box_sdf(points: jax.Array, half_size: float = CUBE_HALF_SIZE) -> jax.Array:
  """Exact SDF of an axis-aligned cube."""
  q = jnp.abs(points) - half_size
  outside = _safe_norm(jnp.maximum(q, 0.0))
  return outside + jnp.minimum(jnp.max(q, axis=-1), 0.0)


def cylinder_sdf(points: jax.Array, radius: float = CYLINDER_RADIUS,
                 half_height: float = OBJECT_HALF_HEIGHT) -> jax.Array:
  """Exact SDF of a vertical capped cylinder centered at the origin."""
  rho = _safe_norm(points[..., :2])
  return _box_2d_sdf(rho - radius, jnp.abs(points[..., 2]) - half_height)


def cone_sdf(points: jax.Array, base_radius: float = CONE_BASE_RADIUS,
             half_height: float = OBJECT_HALF_HEIGHT) -> jax.Array:
  """Exact SDF of a vertical cone: base disk at z = -h, apex at z = +h.

  A solid of revolution's distance is the 2D distance to its cross-section in
  the (rho, z) half-plane: here the triangle (0, h), (r, -h), (0, -h).
  """
  rho, z = _safe_norm(points[..., :2]), points[..., 2]
  to_slant = _segment_distance_2d(rho, z, 0.0, half_height, base_radius, -half_height)
  to_base = _segment_distance_2d(rho, z, 0.0, -half_height, base_radius, -half_height)
  inside = ((z >= -half_height) &
            (rho * 2 * half_height <= base_radius * (half_height - z)))
  return jnp.where(inside, -1.0, 1.0) * jnp.minimum(to_slant, to_base)


def torus_sdf(points: jax.Array, major_radius: float = TORUS_MAJOR_RADIUS,
              minor_radius: float = TORUS_MINOR_RADIUS) -> jax.Array:
  """Exact SDF of a torus standing in the yz plane (its axis is x)."""
  ring = _safe_norm(points[..., 1:]) - major_radius
  return _safe_norm(jnp.stack([ring, points[..., 0]], -1)) - minor_radius


def pyramid_sdf(points: jax.Array, base_half_size: float = PYRAMID_BASE_HALF_SIZE,
                half_height: float = OBJECT_HALF_HEIGHT) -> jax.Array:
  """Bound SDF of a square pyramid: base at z = -h, apex at z = +h, faces
  toward +-x and +-y. The max over its five face planes."""
  height = 2 * half_height
  # Side plane through the apex (0, 0, h) and the base edge at |x| = b, with
  # unit normal proportional to (height, 0, b).
  lateral = jnp.maximum(jnp.abs(points[..., 0]), jnp.abs(points[..., 1]))
  side = ((height * lateral + base_half_size * (points[..., 2] - half_height))
          / np.hypot(height, base_half_size))
  return jnp.maximum(side, -half_height - points[..., 2])


def capsule_sdf(points: jax.Array, radius: float = CAPSULE_RADIUS,
                half_height: float = OBJECT_HALF_HEIGHT) -> jax.Array:
  """Exact SDF of a vertical capsule of total half-height `half_height`."""
  half_segment = half_height - radius
  nearest_axis_z = jnp.clip(points[..., 2], -half_segment, half_segment)
  return _safe_norm(_shifted_up(points, nearest_axis_z)) - radius


def octahedron_sdf(points: jax.Array,
                   radius: float = OCTAHEDRON_RADIUS) -> jax.Array:
  """Bound SDF of a regular octahedron |x| + |y| + |z| <= radius."""
  return (jnp.sum(jnp.abs(points), axis=-1) - radius) / np.sqrt(3.0)


def party_hat_sdf(points: jax.Array) -> jax.Array:
  half = 0.5 * PARTY_HAT_HEIGHT
  return cone_sdf(_shifted_up(points, half), PARTY_HAT_RADIUS, half)


def top_hat_sdf(points: jax.Array) -> jax.Array:
  brim_half, crown_half = 0.5 * TOP_HAT_BRIM_THICKNESS, 0.5 * TOP_HAT_HEIGHT
  brim = cylinder_sdf(_shifted_up(points, brim_half), TOP_HAT_BRIM_RADIUS, brim_half)
  crown = cylinder_sdf(_shifted_up(points, crown_half), TOP_HAT_CROWN_RADIUS,
                       crown_half)
  return jnp.minimum(brim, crown)


def beanie_sdf(points: jax.Array) -> jax.Array:
  """A dome: a capsule cut flat at its base plane z = 0 (a bound)."""
  half = 0.5 * BEANIE_HEIGHT
  capsule = capsule_sdf(_shifted_up(points, half), BEANIE_RADIUS, half)
  return jnp.maximum(capsule, -points[..., 2])


SHAPE_SDFS: tuple[Callable[[jax.Array], jax.Array], ...] = (
    sphere_sdf, box_sdf, cylinder_sdf, cone_sdf, torus_sdf, pyramid_sdf,
    capsule_sdf, octahedron_sdf)  # Order of SHAPES.
HAT_SDFS: tuple[Callable[[jax.Array], jax.Array], ...] = (
    party_hat_sdf, top_hat_sdf, beanie_sdf)  # Order of HATS.

# ----------------------------------------------------------------------------
# Scenes as arrays, so one jitted function serves every scene (and vmaps).


class SceneArrays(NamedTuple):
  """A Scene as arrays; every field may carry the same leading batch shape."""

  shape_index: jax.Array  # [] int32, index into SHAPES.
  object_rgb: jax.Array  # [3] float32 albedo.
  scale: jax.Array  # [] float32, the object's SIZES[size].
  hat_index: jax.Array  # [] int32, index into HATS, or NO_HAT.
  hat_rgb: jax.Array  # [3] float32 albedo; zeros without a hat.


def encode_scene(scene: Scene) -> SceneArrays:
  has_hat = scene.hat is not None
  return SceneArrays(
      shape_index=jnp.asarray(SHAPES.index(scene.shape), jnp.int32),
      object_rgb=jnp.asarray(COLORS[scene.color], jnp.float32),
      scale=jnp.asarray(SIZES[scene.size], jnp.float32),
      hat_index=jnp.asarray(HATS.index(scene.hat) if has_hat else NO_HAT, jnp.int32),
      hat_rgb=jnp.asarray(COLORS[scene.hat_color] if has_hat else (0.0, 0.0, 0.0),
                          jnp.float32))


def encode_scenes(scene_list: list[Scene]) -> SceneArrays:
  """Stacks `encode_scene` over a list: every field gets a leading [num_scenes]."""
  return jax.tree.map(lambda *fields: jnp.stack(fields),
                      *[encode_scene(scene) for scene in scene_list])


def vertical_layout(hat_index: jax.Array,
                    scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Where the object and the hat sit (world z).

  Args:
    hat_index: [] index into HATS or NO_HAT.
    scale: [] the object's size scale.

  Returns:
    (object_center_z, hat_base_z): object + hat are centered vertically
    together; without a hat the object stays at the origin.
  """
  hat_height = jnp.asarray(HAT_HEIGHTS, jnp.float32)[jnp.maximum(hat_index, 0)]
  # Bottom -s H + c and top c + s H - sink + hat_height average to 0 when:
  object_center_z = jnp.where(hat_index >= 0, -0.5 * (hat_height - HAT_SINK), 0.0)
  return object_center_z, object_center_z + scale * OBJECT_HALF_HEIGHT - HAT_SINK


def scene_sdf_parts(points: jax.Array, scene: SceneArrays):
  """Distances to the object and to the hat (+inf without a hat).

  Args:
    points: [..., 3] world points.
    scene: an unbatched SceneArrays (vmap for several scenes).

  Returns:
    (object_distance [...], hat_distance [...]) in world units.
  """
  object_center_z, hat_base_z = vertical_layout(scene.hat_index, scene.scale)
  # Uniform scaling keeps an SDF exact: d_scaled(x) = s d(x / s).
  object_local = _shifted_up(points, object_center_z) / scene.scale
  object_distance = scene.scale * jax.lax.switch(scene.shape_index, SHAPE_SDFS,
                                                 object_local)
  hat_distance = jax.lax.switch(jnp.maximum(scene.hat_index, 0), HAT_SDFS,
                                _shifted_up(points, hat_base_z))
  hat_distance = jnp.where(scene.hat_index >= 0, hat_distance, jnp.inf)
  return object_distance, hat_distance


def scene_sdf(points: jax.Array, scene: SceneArrays) -> jax.Array:
  """SDF of the whole scene (object union hat): points [..., 3] -> [...]."""
  return jnp.minimum(*scene_sdf_parts(points, scene))
