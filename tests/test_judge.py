"""The ground-truth judge (att3d_jax/eval/judge.py) against numpy references,
its ceiling on fresh GT renders, and the --quick evaluation of a tiny model."""

import json

from absl import flags
from absl.testing import flagsaver
import imageio.v3 as iio
import jax
import numpy as np
import pytest

from att3d_jax.eval import judge as judge_lib
from att3d_jax.guidance import unet as unet_lib
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.shapes import diffusion
from att3d_jax.shapes import gt_render
from att3d_jax.shapes import scenes
from configs import base as base_config
from configs import shapes_diffusion as shapes_diffusion_config
from experiments import eval_shapes_diffusion

# Small enough for the default suite; its full-size ceiling is reported by
# experiments/eval_shapes_diffusion.py.
TEST_VIEWS_PER_SHAPE = eval_shapes_diffusion.QUICK_VIEWS_PER_SHAPE


def test_camera_ranges_are_the_shapes_world_config():
  camera = base_config.get_base_config().camera
  base_config.set_shapes_world_cameras(camera)
  assert judge_lib.ELEVATION_RANGE_DEG == tuple(camera.elevation_range_deg)
  assert judge_lib.AZIMUTH_RANGE_DEG == tuple(camera.azimuth_range_deg)
  assert judge_lib.DISTANCE_RANGE == tuple(camera.distance_range)
  assert judge_lib.FOV_Y_RANGE_DEG == tuple(camera.fov_y_range_deg)


def test_background_and_foreground_match_numpy():
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (3, 12, 10, 3)).astype(np.float32)
  background = judge_lib.estimate_background(images)
  for image, estimate in zip(images, np.asarray(background)):
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    assert len(border) == 2 * 12 + 2 * 10 - 4
    np.testing.assert_allclose(estimate, np.median(border, axis=0), atol=1e-6)
  masks = np.asarray(judge_lib.foreground_masks(images, background))
  reference = np.linalg.norm(images - np.asarray(background)[:, None, None], axis=-1)
  np.testing.assert_array_equal(masks, reference > judge_lib.FOREGROUND_THRESHOLD)


def test_color_votes_match_a_brute_force_search_over_shading():
  rng = np.random.default_rng(1)
  images = rng.uniform(0, 1, (2, 6, 7, 3)).astype(np.float32)
  masks = rng.uniform(size=(2, 6, 7)) < 0.7
  albedos = np.asarray(list(scenes.COLORS.values()))
  factors = np.linspace(gt_render.AMBIENT, 1.0, 2001)
  shaded = factors[:, None, None] * albedos[None]  # [F, C, 3]
  errors = np.linalg.norm(images[..., None, None, :] - shaded, axis=-1).min(-2)  # [N, H, W, C]
  nearest = errors.argmin(-1)
  expected = np.stack([np.bincount(nearest[i][masks[i]], minlength=len(albedos))
                       for i in range(2)])
  np.testing.assert_array_equal(judge_lib.color_votes(images, masks), expected)


def test_every_shaded_color_votes_for_itself():
  factors = np.linspace(gt_render.AMBIENT, 1.0, 9)
  albedos = np.asarray(list(scenes.COLORS.values()), np.float32)
  images = (albedos[:, None, None, :] * factors[None, :, None, None]).astype(np.float32)
  votes = np.asarray(judge_lib.color_votes(images, np.ones(images.shape[:3], bool)))
  np.testing.assert_array_equal(votes, np.diag(np.full(len(albedos), len(factors))))


def test_gaussian_blur_matches_numpy():
  rng = np.random.default_rng(2)
  images = rng.uniform(size=(2, 9, 11)).astype(np.float32)
  sigma = 1.5
  taps = np.exp(-0.5 * (np.arange(-3, 4) / sigma)**2)
  taps /= taps.sum()
  padded = np.pad(images, ((0, 0), (3, 3), (3, 3)))
  expected = np.zeros_like(images)
  for dr in range(7):
    for dc in range(7):
      expected += taps[dr] * taps[dc] * padded[:, dr:dr + 9, dc:dc + 11]
  np.testing.assert_allclose(judge_lib.gaussian_blur(images, sigma), expected, atol=1e-6)


def _ellipse(size, center, semi_axes, angle=0.0):
  rows, cols = np.mgrid[:size, :size].astype(np.float64)
  dr, dc = rows - center[0], cols - center[1]
  u = np.cos(angle) * dr + np.sin(angle) * dc
  v = -np.sin(angle) * dr + np.cos(angle) * dc
  return ((u / semi_axes[0])**2 + (v / semi_axes[1])**2 <= 1).astype(np.float32)


def test_canonical_features_remove_position_and_scale_but_keep_shape():
  size = 64
  # (center, semi-axes): moved, moved and 1.25x larger, and turned by 90 degrees.
  ellipses = [((24, 30), (9, 6)), ((38, 26), (9, 6)), ((33, 34), (11.25, 7.5)),
              ((30, 30), (6, 9))]
  masks = np.stack([_ellipse(size, center, axes) for center, axes in ellipses])
  # A shading gradient from top to bottom, the same in every ellipse's frame.
  rows = np.mgrid[:size, :size][0]
  shading = np.stack([1.0 - 0.2 * (rows - center[0]) / axes[0]
                      for center, axes in ellipses]).astype(np.float32)
  features = judge_lib.canonical_features(masks, shading)
  for name in ("silhouette", "shading"):
    values = np.asarray(features[name])
    np.testing.assert_allclose(values[1], values[0], atol=1e-4)  # whole-pixel move
    # The blur is in pixels, so scaling changes the features a little.
    scaled = np.linalg.norm(values[2] - values[0])
    turned = np.linalg.norm(values[3] - values[0])
    assert scaled < 0.25 * turned, (name, scaled, turned)
  # Centered: the silhouette's centroid is the canonical frame's center.
  grid = np.asarray(features["silhouette"][2]).reshape(judge_lib.CANONICAL_SIZE, -1)
  offsets = np.arange(judge_lib.CANONICAL_SIZE) - (judge_lib.CANONICAL_SIZE - 1) / 2
  assert abs(np.sum(grid.sum(1) * offsets) / grid.sum()) < 0.05
  assert abs(np.sum(grid.sum(0) * offsets) / grid.sum()) < 0.05


def test_feature_distances_match_a_brute_force_gain_search():
  rng = np.random.default_rng(3)
  query = {name: rng.uniform(size=(4, 10)).astype(np.float32)
           for name in ("silhouette", "shading")}
  bank = {name: rng.uniform(size=(5, 10)).astype(np.float32)
          for name in ("silhouette", "shading")}
  bank["shading"][0] = 1.1 * query["shading"][0]  # inside the gain range: no shading cost
  gains = np.linspace(1 / judge_lib.MAX_GAIN, judge_lib.MAX_GAIN, 4001)
  silhouette = np.sum((query["silhouette"][:, None] - bank["silhouette"][None])**2, -1)
  shading = np.sum((gains[:, None, None, None] * query["shading"][None, :, None]
                    - bank["shading"][None, None])**2, -1).min(0)
  expected = silhouette + judge_lib.SHADING_WEIGHT**2 * shading
  distances = np.asarray(judge_lib.feature_distances(query, bank))
  np.testing.assert_allclose(distances, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(distances[0, 0], silhouette[0, 0], rtol=1e-4)


def test_bank_cameras_spread_over_the_shapes_world_ranges():
  cameras = judge_lib.bank_cameras(512)
  for values, (low, high) in ((np.rad2deg(cameras.elevation), judge_lib.ELEVATION_RANGE_DEG),
                              (np.rad2deg(cameras.azimuth), judge_lib.AZIMUTH_RANGE_DEG),
                              (cameras.distance, judge_lib.DISTANCE_RANGE),
                              (np.rad2deg(cameras.fov_y), judge_lib.FOV_Y_RANGE_DEG)):
    values = np.asarray(values)
    assert low - 1e-3 <= values.min() and values.max() <= high + 1e-3
    # Evenly spread: every tenth of the range holds 10% +- 2% of the cameras.
    counts = np.histogram(values, bins=10, range=(low, high))[0]
    assert np.all(np.abs(counts / len(values) - 0.1) < 0.02), counts
  labels = cameras_lib.view_labels(cameras)
  shares = {label: labels.count(label) / len(labels) for label in cameras_lib.VIEW_LABELS}
  assert min(shares.values()) > 0.15, shares
  # Deterministic, and a smaller bank is a prefix of a larger one.
  np.testing.assert_array_equal(judge_lib.bank_cameras(64).azimuth, cameras.azimuth[:64])


def test_score_counts_and_chance_levels():
  captions = ["a red cube, front view", "a red sphere, side view",
              "a blue cube, front view", "a white torus, overhead view"]
  consistent = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 1]], bool)
  judgements = {"color": np.array(["red", "red", "blue", "pink"]),
                "shape": np.array(["cube", "cube", "cube", "torus"]),
                "view": np.array(["front", "front", "side", "overhead"]),
                "consistent_views": consistent}
  scores = judge_lib.score(judgements, captions)
  assert scores["color_acc"] == 0.75
  assert scores["shape_acc"] == 0.75
  assert scores["color_and_shape_acc"] == 0.5
  assert scores["view_agreement"] == 0.75  # images 0, 1 and 3
  assert scores["view_exact"] == 0.5  # images 0 and 3
  # Truth frequencies times judged frequencies, summed over labels.
  assert scores["color_chance"] == pytest.approx(0.5 * 0.5 + 0.25 * 0.25 + 0.25 * 0)
  assert scores["shape_chance"] == pytest.approx(0.5 * 0.75 + 0.25 * 0 + 0.25 * 0.25)
  assert scores["color_and_shape_chance"] == pytest.approx(3 * 0.25 * 0.25)
  assert scores["view_exact_chance"] == pytest.approx(0.5 * 0.5 + 0.25 * 0.25 + 0.25 * 0.25)
  # Caption views: front 1/2, side 1/4, overhead 1/4; summed over consistent views.
  assert scores["view_agreement_chance"] == pytest.approx((0.5 + 1.0 + 0.25 + 0.25) / 4)
  assert scores["num_images"] == 4
  # The front-view images alone, against the whole set's caption views: chance
  # is not their own agreement (which the subset's own distribution would give).
  front = {key: np.asarray(value)[[0, 2]] for key, value in judgements.items()}
  subset = judge_lib.score(front, [captions[0], captions[2]], np.array([0.5, 0.25, 0.0, 0.25]))
  assert subset["view_agreement"] == 0.5  # image 2 looks like a side view
  assert subset["view_agreement_chance"] == pytest.approx((0.5 + 0.25) / 2)
  assert subset["view_exact_chance"] == pytest.approx((0.5 + 0.25) / 2)  # judged front, side
  own = judge_lib.score(front, [captions[0], captions[2]])  # all captions "front"
  assert own["view_agreement_chance"] == own["view_agreement"]


def test_bad_inputs_are_explained():
  with pytest.raises(ValueError, match="no view suffix"):
    judge_lib.caption_parts("a red cube")
  assert judge_lib.caption_parts("an orange torus, back view") == (
      scenes.Scene("orange", "torus"), "back")
  judgements = {"color": np.array(["red"])}
  with pytest.raises(ValueError, match="one caption per image"):
    judge_lib.score(judgements, ["a red cube, front view"] * 2)


def test_color_shape_captions_order():
  captions = judge_lib.color_shape_captions(["front", "back"])
  assert len(captions) == 64 * 2
  assert captions[:3] == ["a red sphere, front view", "a red sphere, back view",
                          "a red cube, front view"]
  assert captions[-1] == "a white octahedron, back view"


@pytest.fixture(scope="module")
def judge():
  return judge_lib.Judge(32, 32, TEST_VIEWS_PER_SHAPE)


def test_judge_rejects_other_sizes_and_names_empty_images(judge):
  with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
    judge.judge(np.zeros((2, 64, 64, 3), np.float32))
  empty = np.broadcast_to(np.float32(scenes.BACKGROUND_RGB), (1, 32, 32, 3))
  out = judge.judge(empty)
  assert out["color"][0] == out["shape"][0] == out["view"][0] == judge_lib.NOTHING
  assert not out["consistent_views"].any() and out["foreground_fraction"][0] == 0


def test_judge_ceiling_on_fresh_ground_truth_renders(judge):
  # 128 renders from random cameras, drawn independently of the bank's.
  images, captions = judge_lib.ground_truth_renders(seed=7, cameras_per_prompt=2)
  judgements = judge.judge(images)
  scores = judge_lib.score(judgements, captions)
  assert scores["color_acc"] >= 0.97, scores
  assert scores["shape_acc"] >= 0.97, scores
  assert scores["view_agreement"] > scores["view_agreement_chance"] + 0.3, scores
  assert np.all(judgements["foreground_fraction"] > 0.05)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  """A random quick-config UNet exported like the training script does
  (unet/, scheduler/, text_encoder.json). Random normal parameters of the
  right shapes instead of `module.init`, whose compilation alone takes ~30 s."""
  folder = tmp_path_factory.mktemp("tiny_shapes_model")
  config = shapes_diffusion_config.get_config("quick")
  module_config = unet_lib.UNetConfig.from_dict(dict(config.unet))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: rng.normal(0.0, 0.05, leaf.shape).astype(np.float32),
                        unet_lib.param_shapes(unet_lib.UNet2DConditionModel(module_config)))
  unet_lib.save_unet(str(folder / "unet"), module_config, params)
  (folder / "scheduler").mkdir()
  (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(config.scheduler)))
  (folder / diffusion.TEXT_ENCODER_FILE).write_text(
      json.dumps({"model": "all-MiniLM-L6-v2", "max_length": config.text_max_length}))
  return folder


@pytest.mark.slow  # minutes under `pytest -n 2`: kept out of the default suite
def test_quick_evaluation_of_a_tiny_model(tiny_model_dir, tmp_path):
  out_dir = tmp_path / "eval"
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(model_dir=str(tiny_model_dir), out_dir=str(out_dir), quick=True):
    eval_shapes_diffusion.main([])
  results = json.loads((out_dir / "scores.json").read_text())
  settings = results["settings"]
  assert settings["guidance_scales"] == [1.0] and settings["num_steps"] == 10
  assert settings["views"] == ["front", "side"]
  assert list(results["by_guidance_scale"]) == ["1"]
  entry = results["by_guidance_scale"]["1"]
  assert set(entry["scores"]) == {"all", "front", "side"}
  assert entry["scores"]["all"]["num_images"] == 128
  assert entry["scores"]["front"]["num_images"] == 64
  for key in ("color_acc", "shape_acc", "view_agreement", "view_agreement_chance"):
    assert 0.0 <= entry["scores"]["all"][key] <= 1.0
  assert results["ceiling"]["color_acc"] >= 0.97 and results["ceiling"]["shape_acc"] >= 0.97
  grid = iio.imread(out_dir / entry["grid"])
  assert grid.shape == (8 * 32, 2 * 8 * 32 + eval_shapes_diffusion.GRID_GAP, 3)
  judged = json.loads((out_dir / entry["judgements"]).read_text())
  assert [item["caption"] for item in judged] == judge_lib.color_shape_captions(["front", "side"])
  assert results["timings"]["total_s"] > 0


def test_sample_grid_rows_are_colors_columns_shapes_blocks_views():
  num_views, size = 2, 2
  index = np.arange(64 * num_views)  # color_shape_captions order
  images = np.broadcast_to((index / 255.0)[:, None, None, None],
                           (len(index), size, size, 3)).astype(np.float32)
  grid = eval_shapes_diffusion.sample_grid(images, num_views)
  block_width = 8 * size + eval_shapes_diffusion.GRID_GAP
  assert grid.shape == (8 * size, num_views * block_width - eval_shapes_diffusion.GRID_GAP, 3)
  for color in range(8):
    for shape in range(8):
      for view in range(num_views):
        pixel = grid[color * size, view * block_width + shape * size, 0]
        assert pixel == (color * 8 + shape) * num_views + view
  assert np.all(grid[:, 8 * size:block_width] == 255)  # the gap
