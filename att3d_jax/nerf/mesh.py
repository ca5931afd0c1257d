"""Triangle meshes from a trained field: density grid -> marching cubes -> files.

The density is sampled on a regular lattice of `resolution^3` points that
includes the corners of the cube [-scene_radius, scene_radius]^3, i.e. lattice
point (i, j, k) sits at world position

    -scene_radius + (i, j, k) * voxel_size,  voxel_size = 2 scene_radius / (resolution - 1).

Array axis 0, 1, 2 of the grid are world x, y, z. Marching cubes returns
vertices in lattice-index units along the same axes, so world = -scene_radius +
index * voxel_size; `extract_mesh` applies exactly this map (tested against
analytic shapes in tests/test_mesh.py).

Files: `.obj` keeps the project's world frame (+z up, front faces +x), with
per-vertex colors as `v x y z r g b`. `.glb` follows glTF, whose frame is +y up
and +z front, so its vertices are the cyclic permutation (y, z, x) of world
coordinates (a rotation, so face winding and handedness are kept): the object
stands upright, facing the viewer, in glTF viewers.
"""

import pathlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import skimage.measure
import trimesh

# Points per jitted call: 2^16 points x a small MLP stays well under 1 GB.
DEFAULT_CHUNK_SIZE = 1 << 16
# Density (1 / world units) at which the surface is drawn. torch-ngp's default;
# with ~100 samples over a diameter-2 scene (step ~0.02), alpha = 1 - exp(-10 *
# 0.02) ~ 0.2 per sample, i.e. a few samples make a pixel opaque.
DEFAULT_DENSITY_THRESHOLD = 10.0

PointFn = Callable[[jax.Array], jax.Array]


class Mesh(NamedTuple):
  vertices: np.ndarray  # [num_vertices, 3] float32, world coordinates.
  faces: np.ndarray  # [num_faces, 3] int32, counter-clockwise seen from outside.
  vertex_colors: np.ndarray  # [num_vertices, 3] float32 RGB in [0, 1].


def _evaluate_in_chunks(fn: PointFn, fn_signature: str, value_shape: tuple[int, ...],
                        num_points: int, points_of: Callable[[int, int], np.ndarray],
                        chunk_size: int, jit: bool = True) -> np.ndarray:
  """Applies `fn` to `num_points` points, `chunk_size` at a time.

  Args:
    fn: jnp function, points [chunk, 3] float32 -> values [chunk, *value_shape].
    fn_signature: how errors describe `fn`, e.g. "density_fn: [N, 3] -> [N]".
    value_shape: shape of `fn`'s value per point, checked when tracing.
    num_points: total number of points.
    points_of: (start, stop) -> [stop - start, 3] host points of that range.
    chunk_size: points per call; the last chunk is zero-padded to this size so
      that `fn` is traced and compiled once. Fewer points shrink it to the next
      power of two: a few chunk shapes serve every mesh's vertex count.
    jit: compile `fn` here. False when `fn` is already jitted and reused
      across calls (ATT3DModel.extract_mesh): a jit of a fresh closure per call
      would compile per call, i.e. per prompt.

  Returns:
    [num_points, *value_shape] float32 values as a numpy array.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive number of points, got {chunk_size}")
  chunk_size = min(chunk_size, 1 << max(0, (num_points - 1).bit_length()))

  def checked_fn(points):
    values = fn(points)
    if values.shape != points.shape[:1] + value_shape:
      raise ValueError(f"expected {fn_signature}; for N = {points.shape[0]} points it "
                       f"returned shape {values.shape}")
    return values.astype(jnp.float32)

  compiled_fn = jax.jit(checked_fn) if jit else checked_fn
  outputs = []
  for start in range(0, num_points, chunk_size):
    points = np.asarray(points_of(start, min(start + chunk_size, num_points)), np.float32)
    num_valid = points.shape[0]
    points = np.pad(points, ((0, chunk_size - num_valid), (0, 0)))
    # Keep results on device until the end so that chunks dispatch back to back.
    outputs.append(compiled_fn(jnp.asarray(points))[:num_valid])
  return np.concatenate([np.asarray(out) for out in outputs], axis=0)


def density_for_alpha(alpha: float, step: float) -> float:
  """The density at which one step of length `step` has opacity `alpha`:
  -log(1 - alpha) / step. With the renderer's sample spacing as the step it
  turns "where the surface is" into a density threshold that does not depend
  on a model's density scale."""
  if not 0.0 < alpha < 1.0 or step <= 0.0:
    raise ValueError(f"need 0 < alpha < 1 and step > 0, got alpha={alpha}, step={step}")
  return float(-np.log1p(-alpha) / step)


def lattice_axis(resolution: int, scene_radius: float = 1.0) -> np.ndarray:
  """[resolution] float32 world coordinates of the lattice along one axis."""
  if resolution < 2:
    raise ValueError(f"resolution must be >= 2 lattice points per axis, got {resolution}")
  if scene_radius <= 0:
    raise ValueError(f"scene_radius must be positive, got {scene_radius}")
  return np.linspace(-scene_radius, scene_radius, resolution, dtype=np.float32)


def density_grid(density_fn: PointFn, resolution: int, scene_radius: float = 1.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, jit: bool = True) -> np.ndarray:
  """Samples a density field on the lattice described in the module docstring.

  Args:
    density_fn: jnp function, points [num_points, 3] -> density [num_points].
    resolution: lattice points per axis (>= 2).
    scene_radius: half the side of the sampled cube.
    chunk_size: points per jitted call.
    jit: compile density_fn here (False: it is jitted already, see
      `_evaluate_in_chunks`).

  Returns:
    [resolution, resolution, resolution] float32, axes (x, y, z).
  """
  axis = lattice_axis(resolution, scene_radius)
  shape = (resolution,) * 3

  def points_of(start, stop):
    ijk = np.unravel_index(np.arange(start, stop), shape)
    return np.stack([axis[index] for index in ijk], axis=-1)

  values = _evaluate_in_chunks(density_fn, "density_fn: points [N, 3] -> density [N]", (),
                               resolution**3, points_of, chunk_size, jit)
  return values.reshape(shape)


def largest_component(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Keeps the connected piece of a mesh with the most faces (drops floaters).

  Returns (vertices [V', 3], faces [F', 3]) with faces re-indexed.
  """
  num_vertices = len(vertices)
  edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
  adjacency = scipy.sparse.coo_matrix(
      (np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])),
      shape=(num_vertices, num_vertices))
  _, labels = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
  face_labels = labels[faces[:, 0]]
  keep_label = np.argmax(np.bincount(face_labels))
  kept_faces = faces[face_labels == keep_label]
  used = np.unique(kept_faces)
  new_index = np.full(num_vertices, -1, np.int64)
  new_index[used] = np.arange(len(used))
  return vertices[used], new_index[kept_faces].astype(faces.dtype)


def extract_mesh(density_fn: PointFn, albedo_fn: PointFn, *, resolution: int = 128,
                 threshold: float = DEFAULT_DENSITY_THRESHOLD, scene_radius: float = 1.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, clip_to_sphere: bool = False,
                 keep_largest_component: bool = False, jit: bool = True) -> Mesh:
  """The surface {x : density(x) = threshold} with albedo vertex colors.

  Args:
    density_fn: jnp function, points [N, 3] -> density [N] (1 / world units).
    albedo_fn: jnp function, points [N, 3] -> RGB [N, 3] in [0, 1].
    resolution: lattice points per axis; the mesh resolves features down to
      about one voxel, 2 scene_radius / (resolution - 1).
    threshold: density level of the surface.
    scene_radius: half the side of the sampled cube [-r, r]^3. Surfaces are
      cut open where the object crosses the cube's boundary.
    chunk_size: points per jitted call of either function.
    clip_to_sphere: treat density outside the ball of radius scene_radius as
      zero. A NeRF is only ever rendered inside that ball, so whatever its grid
      holds in the cube's corners was never trained.
    keep_largest_component: drop every connected piece but the one with the
      most faces: floaters in space no training view constrained.
    jit: compile both functions here; pass False for functions jitted once
      and reused across meshes, so that many meshes compile once.

  Returns:
    `Mesh` in world coordinates, faces wound counter-clockwise seen from the
    low-density side (outward normals).

  Raises:
    ValueError: if the density is not finite, or never crosses `threshold`.
  """
  grid = density_grid(density_fn, resolution, scene_radius, chunk_size, jit)
  if clip_to_sphere:
    axis = lattice_axis(resolution, scene_radius)
    radius = np.sqrt(axis[:, None, None]**2 + axis[None, :, None]**2 + axis[None, None, :]**2)
    grid = np.where(radius < scene_radius, grid, 0.0).astype(np.float32)
  num_bad = int(np.size(grid) - np.isfinite(grid).sum())
  if num_bad:
    raise ValueError(f"density_fn returned {num_bad} NaN/Inf values on the "
                     f"{resolution}^3 grid; check the field's parameters for NaNs")
  min_density, max_density = float(grid.min()), float(grid.max())
  voxel_size = 2 * scene_radius / (resolution - 1)
  if not min_density < threshold < max_density:
    raise ValueError(
        f"empty level set: density never crosses threshold {threshold} on the "
        f"{resolution}^3 grid of [-{scene_radius}, {scene_radius}]^3 (min density "
        f"{min_density:.4g}, max density {max_density:.4g}). Try a threshold between "
        f"them (e.g. {0.5 * (min_density + max_density):.4g}); if the field is empty, "
        f"train longer; if the object is thinner than a voxel ({voxel_size:.3g}), "
        "raise the resolution; if it fills the cube, raise scene_radius.")

  # "descent" = density is higher inside. skimage then winds faces by the
  # left-hand rule; reversing them gives the right-hand (OpenGL / glTF)
  # counter-clockwise-from-outside winding, i.e. outward normals.
  vertices, faces, _, _ = skimage.measure.marching_cubes(
      grid, level=threshold, spacing=(voxel_size,) * 3, gradient_direction="descent",
      allow_degenerate=False)
  faces = faces[:, ::-1]
  vertices = (vertices - scene_radius).astype(np.float32)
  if keep_largest_component:
    vertices, faces = largest_component(vertices, faces)

  colors = _evaluate_in_chunks(albedo_fn, "albedo_fn: points [N, 3] -> RGB [N, 3]", (3,),
                               len(vertices), lambda start, stop: vertices[start:stop],
                               chunk_size, jit)
  return Mesh(vertices=vertices, faces=np.ascontiguousarray(faces, np.int32),
              vertex_colors=np.clip(colors, 0.0, 1.0))


def _colors_uint8(mesh: Mesh) -> np.ndarray:
  """[num_vertices, 3] uint8 vertex colors."""
  return np.round(np.clip(mesh.vertex_colors, 0.0, 1.0) * 255).astype(np.uint8)


def save_obj(mesh: Mesh, path) -> pathlib.Path:
  """Writes a Wavefront OBJ in world coordinates with `v x y z r g b` lines."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  vertex_rows = np.concatenate([mesh.vertices, mesh.vertex_colors], axis=1)
  with open(path, "w") as f:
    f.write(f"# att3d_jax mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces,"
            " world frame +z up\n")
    np.savetxt(f, vertex_rows, fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
    np.savetxt(f, mesh.faces.astype(np.int64) + 1, fmt="f %d %d %d")  # OBJ is 1-based.
  return path


def world_to_gltf(points: np.ndarray) -> np.ndarray:
  """[..., 3] world (+z up, +x front) -> glTF frame (+y up, +z front)."""
  return points[..., [1, 2, 0]]


def save_glb(mesh: Mesh, path) -> pathlib.Path:
  """Writes binary glTF (vertices in the glTF frame, see module docstring)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  trimesh_mesh = trimesh.Trimesh(
      vertices=world_to_gltf(mesh.vertices), faces=mesh.faces,
      vertex_colors=_colors_uint8(mesh), process=False)
  trimesh_mesh.export(path, file_type="glb")
  return path


def export_mesh(mesh: Mesh, out_dir, name: str) -> dict[str, pathlib.Path]:
  """Writes `out_dir/name.obj` and `out_dir/name.glb`; returns {"obj": ..., "glb": ...}."""
  out_dir = pathlib.Path(out_dir)
  return {"obj": save_obj(mesh, out_dir / f"{name}.obj"),
          "glb": save_glb(mesh, out_dir / f"{name}.glb")}
