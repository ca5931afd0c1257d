"""Mesh extraction against analytic shapes, and mesh / turntable file round trips."""

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from att3d_jax.nerf import mesh as mesh_lib
from att3d_jax.nerf import turntable

SPHERE_RADIUS = 0.5
# Even, so that no lattice line runs through the sphere's axes and 0.5 is not a
# lattice coordinate: vertices come from interpolation, not from grid points.
SPHERE_RESOLUTION = 40


def sphere_density(points):
  """The density-bias blob shape: positive inside radius 0.5, linear in |x|."""
  return 10.0 * (SPHERE_RADIUS - jnp.linalg.norm(points, axis=-1))


def albedo(points):
  """A smooth color that differs along every axis (catches axis swaps)."""
  return jax.nn.sigmoid(jnp.stack(
      [3 * points[:, 0] + 1, -2 * points[:, 1], 4 * points[:, 2] - 0.5], axis=-1))


def albedo_numpy(points):
  logits = np.stack([3 * points[:, 0] + 1, -2 * points[:, 1], 4 * points[:, 2] - 0.5],
                    axis=-1)
  return 1 / (1 + np.exp(-logits))


@pytest.fixture(scope="module")
def sphere_mesh():
  return mesh_lib.extract_mesh(sphere_density, albedo, resolution=SPHERE_RESOLUTION,
                               threshold=0.0, chunk_size=10_000)


def test_density_grid_matches_numpy_and_compiles_once():
  num_traces = []

  def density_fn(points):
    num_traces.append(1)
    return points[:, 0] + 10 * points[:, 1] + 100 * points[:, 2]

  resolution, scene_radius = 7, 1.5
  # 343 points in chunks of 50: the last chunk is padded, not recompiled.
  grid = mesh_lib.density_grid(density_fn, resolution, scene_radius, chunk_size=50)
  axis = np.linspace(-scene_radius, scene_radius, resolution)
  x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
  assert grid.shape == (resolution,) * 3 and grid.dtype == np.float32
  np.testing.assert_allclose(grid, x + 10 * y + 100 * z, atol=1e-4)
  assert len(num_traces) == 1


def test_sphere_vertices_on_the_sphere(sphere_mesh):
  voxel_size = 2.0 / (SPHERE_RESOLUTION - 1)
  radii = np.linalg.norm(sphere_mesh.vertices, axis=-1)
  assert sphere_mesh.vertices.dtype == np.float32 and sphere_mesh.faces.dtype == np.int32
  assert len(sphere_mesh.faces) > 1000
  np.testing.assert_allclose(radii, SPHERE_RADIUS, atol=0.5 * voxel_size)
  np.testing.assert_allclose(sphere_mesh.vertices.min(axis=0), -SPHERE_RADIUS,
                             atol=voxel_size)
  np.testing.assert_allclose(sphere_mesh.vertices.max(axis=0), SPHERE_RADIUS,
                             atol=voxel_size)


def test_sphere_is_closed_with_outward_faces(sphere_mesh):
  mesh = trimesh.Trimesh(sphere_mesh.vertices, sphere_mesh.faces, process=False)
  assert mesh.is_watertight
  outward = np.sum(mesh.face_normals * mesh.triangles_center, axis=-1)
  assert np.all(outward > 0)
  # Positive signed volume is the right-hand winding that renderers cull by.
  np.testing.assert_allclose(mesh.volume, 4 / 3 * np.pi * SPHERE_RADIUS**3, rtol=0.02)


def test_vertex_colors_are_albedo_at_the_vertices(sphere_mesh):
  assert sphere_mesh.vertex_colors.shape == sphere_mesh.vertices.shape
  np.testing.assert_allclose(sphere_mesh.vertex_colors, albedo_numpy(sphere_mesh.vertices),
                             atol=1e-5)


def test_off_center_box_bounding_box_is_exact():
  center = np.array([0.2, -0.35, 0.4], np.float32)
  half_size = np.array([0.25, 0.15, 0.3], np.float32)

  def box_density(points):
    # Linear in the distance to the nearest face, so marching cubes puts the
    # vertices of edges crossing a face's middle exactly on that face.
    return 10.0 * jnp.min(half_size - jnp.abs(points - center), axis=-1)

  scene_radius, resolution = 1.5, 37
  voxel_size = 2 * scene_radius / (resolution - 1)
  box = mesh_lib.extract_mesh(box_density, albedo, resolution=resolution, threshold=0.0,
                              scene_radius=scene_radius)
  # An index-space or half-voxel error would be off by >= voxel_size / 2 = 0.04.
  assert voxel_size / 2 > 0.04
  np.testing.assert_allclose(box.vertices.min(axis=0), center - half_size, atol=1e-4)
  np.testing.assert_allclose(box.vertices.max(axis=0), center + half_size, atol=1e-4)


@pytest.mark.parametrize("constant_density", [-3.0, 50.0])
def test_empty_level_set_is_a_clear_error(constant_density):
  with pytest.raises(ValueError, match="empty level set") as error:
    mesh_lib.extract_mesh(lambda points: jnp.full(points.shape[:1], constant_density),
                          albedo, resolution=8, threshold=10.0)
  message = str(error.value)
  assert f"min density {constant_density:.4g}" in message
  assert f"max density {constant_density:.4g}" in message
  assert "threshold 10.0" in message and "Try a threshold" in message


def test_wrong_output_shapes_are_clear_errors():
  with pytest.raises(ValueError, match=r"density \[N\].*shape \(100, 1\)"):
    mesh_lib.density_grid(lambda points: points[:, :1], resolution=10, chunk_size=100)
  with pytest.raises(ValueError, match=r"RGB \[N, 3\].*shape \(\d+, 4\)"):
    mesh_lib.extract_mesh(sphere_density, lambda points: jnp.ones((len(points), 4)),
                          resolution=10, threshold=0.0)


def test_obj_and_glb_reload_with_trimesh(sphere_mesh, tmp_path):
  paths = mesh_lib.export_mesh(sphere_mesh, tmp_path / "meshes", "sphere")
  assert set(paths) == {"obj", "glb"} and all(path.exists() for path in paths.values())
  colors_uint8 = np.round(sphere_mesh.vertex_colors * 255)

  first_vertex_line = next(line for line in paths["obj"].read_text().splitlines()
                           if line.startswith("v "))
  assert len(first_vertex_line.split()) == 7  # v x y z r g b

  obj = trimesh.load(paths["obj"], process=False)
  assert obj.vertices.shape == sphere_mesh.vertices.shape
  assert obj.faces.shape == sphere_mesh.faces.shape
  np.testing.assert_allclose(obj.vertices, sphere_mesh.vertices, atol=1e-5)
  np.testing.assert_array_equal(obj.faces, sphere_mesh.faces)
  np.testing.assert_allclose(obj.visual.vertex_colors[:, :3], colors_uint8, atol=1)

  glb = trimesh.load(paths["glb"], force="mesh", process=False)
  assert glb.vertices.shape == sphere_mesh.vertices.shape
  assert glb.faces.shape == sphere_mesh.faces.shape
  # glTF is +y up: world (x, y, z) is stored as (y, z, x).
  np.testing.assert_allclose(glb.vertices[:, [2, 0, 1]], sphere_mesh.vertices, atol=1e-6)
  np.testing.assert_array_equal(glb.visual.vertex_colors[:, :3], colors_uint8)
  assert glb.volume > 0  # still wound outward after the axis change


def turntable_frames(num_frames, height, width):
  """Distinct, smooth float frames: a gradient whose phase turns with the frame."""
  rows = np.linspace(0, 1, height)[:, None]
  cols = np.linspace(0, 1, width)[None, :]
  frames = []
  for index in range(num_frames):
    phase = 2 * np.pi * index / num_frames
    frames.append(np.stack([
        0.5 + 0.4 * np.sin(phase + 3 * rows + 0 * cols),
        0.5 + 0.4 * np.cos(phase + 2 * cols + 0 * rows),
        np.full((height, width), index / num_frames)], axis=-1))
  return np.stack(frames).astype(np.float32)


def test_gif_has_every_frame(tmp_path):
  frames = turntable_frames(6, 24, 20)
  path = turntable.write_gif(frames, tmp_path / "turntable.gif", fps=10)
  read = iio.imread(path, index=None)
  assert read.shape[:3] == (6, 24, 20)
  assert np.abs(read[..., :3].astype(np.float32) - frames * 255).mean() < 8


# ffmpeg runs as a subprocess; JAX warns on any fork, but fork + exec is safe.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
@pytest.mark.parametrize("height,width", [(32, 48), (33, 47)])
def test_mp4_reads_back_with_every_frame(tmp_path, height, width):
  frames = turntable_frames(8, height, width)
  path = turntable.write_mp4(frames, tmp_path / "turntable.mp4", fps=12)
  read = iio.imread(path, index=None, plugin="FFMPEG")
  even_height, even_width = height + height % 2, width + width % 2
  assert read.shape == (8, even_height, even_width, 3)
  # Lossy, but the same pictures in the same order.
  error = np.abs(read[:, :height, :width].astype(np.float32) - frames * 255)
  assert error.mean() < 4
  assert iio.improps(path, plugin="FFMPEG").shape[1:3] == (even_height, even_width)


def test_pad_to_even_repeats_the_edge():
  frames = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
  padded = turntable.pad_to_even(frames)
  assert padded.shape == (2, 4, 6, 3)
  np.testing.assert_array_equal(padded[:, :3, :5], frames)
  np.testing.assert_array_equal(padded[:, 3, :5], frames[:, 2])
  np.testing.assert_array_equal(padded[:, :3, 5], frames[:, :, 4])


def test_contact_sheet_places_frames_row_major():
  frames = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
  sheet = turntable.contact_sheet(frames, columns=2)
  assert sheet.shape == (3 * 4, 2 * 6, 3) and sheet.dtype == np.uint8
  for index, frame in enumerate(frames):
    row, col = divmod(index, 2)
    np.testing.assert_array_equal(sheet[row * 4:(row + 1) * 4, col * 6:(col + 1) * 6], frame)
  assert np.all(sheet[8:, 6:] == 255)  # the empty sixth cell
  assert turntable.contact_sheet(frames).shape == (2 * 4, 3 * 6, 3)  # ceil(sqrt(5)) columns


def test_png_round_trip(tmp_path):
  image = turntable_frames(1, 9, 11)[0]
  path = turntable.save_png(image, tmp_path / "sub" / "frame.png")
  np.testing.assert_array_equal(iio.imread(path), np.round(image * 255).astype(np.uint8))


@pytest.mark.parametrize("frames,error,match", [
    (np.zeros((4, 8, 8)), ValueError, r"\[num_frames, height, width, 3\].*\(4, 8, 8\)"),
    (np.zeros((4, 8, 8, 4)), ValueError, r"shape \(4, 8, 8, 4\)"),
    (np.zeros((4, 8, 8, 3), np.int64), TypeError, "int64"),
    (np.linspace(0, 255, 4 * 8 * 8 * 3).reshape(4, 8, 8, 3), ValueError,
     r"\[0, 1\], got values in \[0, 255\]"),
    (np.full((4, 8, 8, 3), np.nan), ValueError, "NaN"),
])
def test_bad_frames_are_clear_errors(tmp_path, frames, error, match):
  with pytest.raises(error, match=match):
    turntable.write_gif(frames, tmp_path / "bad.gif")
  with pytest.raises(error, match=match):
    turntable.write_mp4(frames, tmp_path / "bad.mp4")


def test_clip_to_sphere_and_largest_component_drop_floaters():
  # A sphere of radius 0.4 at the origin, a small floater blob at (0.6, 0, 0)
  # inside the scene sphere, and one in a corner of the cube (outside it).
  def density_fn(x):
    main = 10.0 * (0.4 - jnp.linalg.norm(x, axis=-1))
    floater = 10.0 * (0.1 - jnp.linalg.norm(x - jnp.array([0.7, 0.0, 0.0]), axis=-1))
    corner = 10.0 * (0.1 - jnp.linalg.norm(x - jnp.array([0.9, 0.9, 0.9]), axis=-1))
    return jnp.maximum(jnp.maximum(main, floater), corner)

  albedo_fn = lambda x: jnp.full(x.shape, 0.5)
  everything = mesh_lib.extract_mesh(density_fn, albedo_fn, resolution=64, threshold=0.0)
  assert everything.vertices.max() > 0.85  # the corner blob is there
  clipped = mesh_lib.extract_mesh(density_fn, albedo_fn, resolution=64, threshold=0.0,
                                  clip_to_sphere=True)
  assert clipped.vertices.max() < 0.85 and clipped.vertices[:, 0].max() > 0.75
  cleaned = mesh_lib.extract_mesh(density_fn, albedo_fn, resolution=64, threshold=0.0,
                                  clip_to_sphere=True, keep_largest_component=True)
  voxel = 2.0 / 63
  np.testing.assert_allclose(cleaned.vertices.min(axis=0), -0.4, atol=voxel)
  np.testing.assert_allclose(cleaned.vertices.max(axis=0), 0.4, atol=voxel)
  assert cleaned.faces.max() == len(cleaned.vertices) - 1
  np.testing.assert_allclose(np.linalg.norm(cleaned.vertices, axis=-1), 0.4, atol=voxel)


def test_density_for_alpha_inverts_the_opacity_of_one_step():
  density = mesh_lib.density_for_alpha(0.8, 0.05)
  np.testing.assert_allclose(1.0 - np.exp(-density * 0.05), 0.8, rtol=1e-6)
  with pytest.raises(ValueError, match="alpha"):
    mesh_lib.density_for_alpha(1.0, 0.05)
