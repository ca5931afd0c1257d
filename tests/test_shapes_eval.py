"""GT evaluation of shapes NeRFs: recolored geometries equal gt_render, the
per-part error sums equal brute force, and the per-factor metrics single out
the factor a render gets wrong."""

import numpy as np
import pytest

from att3d_jax.eval import shapes_eval
from att3d_jax.shapes import gt_geometry
from att3d_jax.shapes import gt_render
from att3d_jax.shapes import scenes

HEIGHT = WIDTH = 16


@pytest.fixture(scope="module")
def cameras():
  return shapes_eval.eval_cameras((20.0, 50.0), 2)


def _random_scenes(count, seed):
  everything = scenes.all_scenes()
  rows = np.random.default_rng(seed).choice(len(everything), count, replace=False)
  # A top hat's brim is flush with a cylinder's side: the tie rule's case.
  return [everything[i] for i in rows] + [scenes.Scene("blue", "cylinder", "", "top hat",
                                                       "green")]


def test_recolored_geometries_equal_gt_render(cameras):
  scene_list = _random_scenes(5, seed=0)
  recolored = gt_geometry.scene_views(scene_list, cameras, HEIGHT, WIDTH)
  for index, scene in enumerate(scene_list):
    reference = gt_render.render_views(scenes.encode_scene(scene), cameras, HEIGHT, WIDTH)
    np.testing.assert_array_equal(recolored["part"][index], reference["part"])
    np.testing.assert_array_equal(recolored["mask"][index], reference["mask"])
    # Normals by central differences round differently in the two programs.
    np.testing.assert_allclose(recolored["rgb"][index], reference["rgb"], atol=1e-3)
  assert set(np.unique(recolored["part"])) == {gt_render.PART_BACKGROUND,
                                               gt_render.PART_OBJECT, gt_render.PART_HAT}


def test_geometries_are_traced_once_per_camera_set(cameras):
  first = gt_geometry.geometry_views([3, 5], cameras, HEIGHT, WIDTH)
  key = gt_geometry._camera_key(cameras, HEIGHT, WIDTH, gt_render.DEFAULT_NUM_STEPS)
  cached = gt_geometry._cache[key]
  cached[3] = (cached[3][0], np.full_like(cached[3][1], 7.0))  # a marker: read, not traced
  again = gt_geometry.geometry_views([5, 3], cameras, HEIGHT, WIDTH)
  np.testing.assert_array_equal(again["part"][0], first["part"][1])
  assert np.all(again["shading"][1] == 7.0)
  del cached[3]  # leave the cache true for the other tests


def test_geometry_index_covers_the_world():
  indices = {gt_geometry.geometry_index(scene) for scene in scenes.all_scenes()}
  assert indices == set(range(len(gt_geometry.GEOMETRIES))) and len(indices) == 64


def test_candidate_errors_equal_brute_force(cameras):
  scene_list = _random_scenes(4, seed=1)
  rng = np.random.default_rng(2)
  rendered = rng.uniform(0.0, 1.0, (3, 4, HEIGHT, WIDTH, 3)).astype(np.float32)
  indices = sorted({gt_geometry.geometry_index(scene) for scene in scene_list})
  geometry = gt_geometry.geometry_views(indices, cameras, HEIGHT, WIDTH)
  part = geometry["part"].reshape(len(indices), -1)
  shading = geometry["shading"].reshape(len(indices), -1)
  stats = shapes_eval.part_statistics(rendered.reshape(3, -1, 3), part, shading)
  norms = {name: np.sum(np.where(part == value, shading.astype(np.float64)**2, 0.0), axis=1)
           for name, value in (("object", gt_render.PART_OBJECT), ("hat", gt_render.PART_HAT))}
  truth = gt_geometry.scene_views(scene_list, cameras, HEIGHT, WIDTH)["rgb"]
  albedos = gt_geometry.scene_albedos(scene_list)
  for render in range(3):
    errors = shapes_eval.candidate_errors(
        stats, norms, np.full(len(scene_list), render),
        np.asarray([indices.index(gt_geometry.geometry_index(s)) for s in scene_list]),
        albedos["object_rgb"], albedos["hat_rgb"])
    brute = np.sum((rendered[render].astype(np.float64) - truth)**2, axis=(1, 2, 3, 4))
    np.testing.assert_allclose(errors, brute, rtol=1e-5)


def _scores(prompts, shown, cameras):
  """score_prompts of renders that are exactly the GT of the `shown` scenes."""
  images = gt_geometry.scene_views(shown, cameras, HEIGHT, WIDTH)
  return shapes_eval.score_prompts(prompts, images["rgb"], images["mask"], cameras)


def test_gt_renders_get_every_factor_right(cameras):
  prompts = ["a small red torus wearing a blue top hat", "a green cube",
             "a white cone wearing a purple beanie"]
  rows = _scores(prompts, [scenes.parse_prompt(p) for p in prompts], cameras)
  for row in rows:
    assert row["r_hit"] and row["color_ok"] and row["iou"] == 1.0, row
    assert row["area_ratio"] == 1.0, row
    assert all(row[name] for name in ("factor_color", "factor_shape", "factor_size",
                                      "factor_hat")), row
  assert rows[0]["factor_hat_color"] and rows[2]["factor_hat_color"]
  assert rows[1]["factor_hat_color"] is None
  summary = shapes_eval.summarize(rows)
  assert set(summary) == set(shapes_eval.METRIC_NAMES)
  assert summary["factor_hat_color"] == 1.0 and summary["factor_color"] == 1.0
  assert shapes_eval.summarize(rows[1:2])["factor_hat_color"] is None


HATTED = "a small blue torus wearing a red top hat"


# Each of these neighbors costs another factor too if the factors are judged
# one at a time with the others held at their true values (shapes_eval's
# docstring); the nearest world scene gets them right.
@pytest.mark.parametrize("prompt, shown, factor", [
    (HATTED, "a small green torus wearing a red top hat", "color"),
    (HATTED, "a small blue sphere wearing a red top hat", "shape"),
    (HATTED, "a blue torus wearing a red top hat", "size"),
    (HATTED, "a small blue torus wearing a red party hat", "hat"),
    (HATTED, "a small blue torus wearing an orange top hat", "hat_color"),
    (HATTED, "a small blue torus", "hat+hat_color"),  # no hat, so no hat color either
    ("a green cube", "a small green cube", "size"),
    ("a green cube", "a green cube wearing a red beanie", "hat"),
])
def test_a_render_of_a_neighbor_gets_exactly_that_factor_wrong(cameras, prompt, shown, factor):
  row, = _scores([prompt], [scenes.parse_prompt(shown)], cameras)
  assert row["nearest_scene"] == shown
  wrong = {name for name in shapes_eval.FACTOR_METRICS if row[name] is False}
  assert wrong == {f"factor_{name}" for name in factor.split("+")}, row
  assert (row["factor_hat_color"] is None) == (scenes.parse_prompt(prompt).hat is None)


def test_color_votes_ignore_the_hat(cameras):
  # The small torus shows fewer pixels than its top hat: voting over the whole
  # foreground would name the hat's color.
  prompt = "a small red torus wearing a blue top hat"
  images = gt_geometry.scene_views([scenes.parse_prompt(prompt)], cameras, HEIGHT, WIDTH)
  assert shapes_eval.color_of(images["rgb"][0], images["mask"][0]) == "blue"
  row, = shapes_eval.score_prompts([prompt], images["rgb"], images["mask"], cameras)
  assert row["color"] == "red" and row["color_ok"]


def test_area_ratio_is_rendered_over_true_silhouette_area(cameras):
  """Showing the default-size cube for "a small red cube" (and the reverse)
  gives the ratio of the two GT silhouettes' pixel counts over all views."""
  small, large = scenes.parse_prompt("a small red cube"), scenes.parse_prompt("a red cube")
  masks = gt_geometry.scene_views([small, large], cameras, HEIGHT, WIDTH)["mask"] > 0.5
  expected = masks[1].sum() / masks[0].sum()
  rows = _scores(["a small red cube", "a red cube"], [large, small], cameras)
  assert expected > 2.0  # (1 / 0.6)^2 in area, up to pixelation
  assert rows[0]["area_ratio"] == pytest.approx(expected)
  assert rows[1]["area_ratio"] == pytest.approx(1.0 / expected)
  summary = shapes_eval.summarize(rows)
  assert summary["area_ratio"] == pytest.approx((expected + 1.0 / expected) / 2)
