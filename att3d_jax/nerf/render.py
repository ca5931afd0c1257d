"""Volume rendering of a density / albedo field inside a bounding sphere.

Pure functions of arrays (multinerf style). Conventions:
  * Rays are `cameras.Rays` flattened to `[num_rays, 3]`. Distances `t` along a
    ray are in units of `|direction|` (unit directions from `generate_rays`
    make them world units).
  * A ray's segment inside the scene sphere is cut into bins by edges
    `t_edges: [num_rays, num_bins + 1]`. The field is evaluated once per bin, at
    the bin's midpoint, and is taken as constant over the bin: the quadrature
    of NeRF (Mildenhall et al. 2020, eq. 3) with exact bin widths, so the edges
    cover `[near, far]` exactly and a constant density gives the exact opacity.
  * Colors are the field's albedo: the guidance models this project trains
    with see baked lighting, so no shading model is applied.
"""

import math
from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp

from att3d_jax.nerf.cameras import Cameras
from att3d_jax.nerf.cameras import Rays
from att3d_jax.nerf.cameras import generate_rays

# Floor added to every bin's weight before importance resampling, so that rays
# with no opacity (or all mass in one bin) still resample the whole interval.
RESAMPLE_WEIGHT_FLOOR = 1e-5
# Smallest squared length that `safe_normalize` divides by.
NORMALIZE_EPS = 1e-20

FieldFn = Callable[[jax.Array], dict]
BackgroundFn = Callable[[jax.Array], jax.Array]


def safe_normalize(vectors: jax.Array) -> jax.Array:
  """Unit vectors along `vectors [..., 3]`; zero vectors stay zero (no NaN
  value or gradient)."""
  squared = jnp.sum(vectors * vectors, axis=-1, keepdims=True)
  return vectors * jax.lax.rsqrt(jnp.maximum(squared, NORMALIZE_EPS))


def intersect_sphere(rays: Rays, radius: float) -> tuple[jax.Array, jax.Array]:
  """Where each ray enters and leaves the sphere of `radius` at the origin.

  Args:
    rays: origins and directions `[num_rays, 3]` (directions need not be unit).
    radius: sphere radius.

  Returns:
    near, far: `[num_rays]` distances along the rays. Origins inside the sphere
    get `near = 0`. Rays that miss the sphere, graze it, or point away from it
    get the empty interval `near = far = 0`, which renders as transparent.
  """
  origins, directions = rays.origins, rays.directions
  chex.assert_equal_shape([origins, directions])
  a = jnp.sum(directions * directions, axis=-1)
  b = jnp.sum(origins * directions, axis=-1)
  c = jnp.sum(origins * origins, axis=-1) - radius**2
  discriminant = b * b - a * c
  # max(., 0) keeps the discarded branch finite, so gradients stay NaN-free.
  sqrt_disc = jnp.sqrt(jnp.maximum(discriminant, 0.0))
  t_enter = (-b - sqrt_disc) / a
  t_exit = (-b + sqrt_disc) / a
  hit = (discriminant > 0) & (t_exit > 0)
  near = jnp.where(hit, jnp.maximum(t_enter, 0.0), 0.0)
  far = jnp.where(hit, t_exit, 0.0)
  return near, far


def _unit_interval_edges(key: Optional[jax.Array], batch_shape: tuple[int, ...],
                         num_bins: int) -> jax.Array:
  """Bin edges `[*batch_shape, num_bins + 1]` on [0, 1], endpoints fixed.

  With a key, each interior edge i is jittered uniformly within half a bin of
  its regular position i / num_bins, which keeps the edges sorted (stratified
  sampling); without one the edges are regular.
  """
  edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=jnp.float32)
  edges = jnp.broadcast_to(edges, batch_shape + (num_bins + 1,))
  if key is None:
    return edges
  jitter = jax.random.uniform(key, batch_shape + (num_bins - 1,), jnp.float32,
                              -0.5, 0.5) / num_bins
  return edges.at[..., 1:-1].add(jitter)


def stratified_samples(key: Optional[jax.Array], near: jax.Array, far: jax.Array,
                       num_samples: int) -> jax.Array:
  """Bin edges for `num_samples` samples per ray between near and far.

  Args:
    key: PRNG key for stratified jitter, or None for regular bins (evaluation).
    near, far: `[num_rays]`.
    num_samples: number of bins (= field evaluations, one per bin midpoint).

  Returns:
    t_edges: `[num_rays, num_samples + 1]`, sorted, `t_edges[:, 0] = near` and
    `t_edges[:, -1] = far`. Sample points are the bin midpoints (`bin_midpoints`).
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  chex.assert_rank(near, 1)
  chex.assert_equal_shape([near, far])
  unit = _unit_interval_edges(key, near.shape, num_samples)
  return near[:, None] + (far - near)[:, None] * unit


def bin_midpoints(t_edges: jax.Array) -> jax.Array:
  """`[num_rays, num_bins + 1]` edges -> `[num_rays, num_bins]` midpoints."""
  return 0.5 * (t_edges[..., 1:] + t_edges[..., :-1])


def compute_alpha_weights(density: jax.Array, t_edges: jax.Array,
                          directions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-bin compositing weights from densities (NeRF eq. 3).

  Args:
    density: `[num_rays, num_bins]`, non-negative, constant within each bin.
    t_edges: `[num_rays, num_bins + 1]` sorted bin edges.
    directions: `[num_rays, 3]`; bin widths are `diff(t_edges) * |direction|`.

  Returns:
    weights: `[num_rays, num_bins]`, `alpha_i * transmittance_i` where
      `alpha_i = 1 - exp(-density_i * width_i)`.
    transmittance: `[num_rays, num_bins]`, the fraction of light that reaches
      the start of bin i, `exp(-sum_{j<i} density_j * width_j)`.
  """
  chex.assert_rank([density, t_edges, directions], 2)
  chex.assert_shape(t_edges, (density.shape[0], density.shape[1] + 1))
  widths = jnp.diff(t_edges, axis=-1) * jnp.linalg.norm(directions, axis=-1,
                                                         keepdims=True)
  optical_depth = density * widths
  alpha = 1.0 - jnp.exp(-optical_depth)
  # An exclusive cumulative sum in log space: more accurate than a product of
  # (1 - alpha) and it keeps transmittance exactly 1 before the first bin.
  depth_before = jnp.concatenate(
      [jnp.zeros_like(optical_depth[:, :1]),
       jnp.cumsum(optical_depth[:, :-1], axis=-1)], axis=-1)
  transmittance = jnp.exp(-depth_before)
  return alpha * transmittance, transmittance


def composite(weights: jax.Array, rgb: jax.Array, t_mids: jax.Array,
              normals: Optional[jax.Array] = None,
              normalize_depth: bool = False) -> dict[str, jax.Array]:
  """Accumulates per-bin quantities along each ray.

  Args:
    weights: `[num_rays, num_bins]` from `compute_alpha_weights`.
    rgb: `[num_rays, num_bins, 3]` per-bin color.
    t_mids: `[num_rays, num_bins]` bin midpoints.
    normals: optional `[num_rays, num_bins, 3]` per-bin unit normals.
    normalize_depth: False gives the expected depth `sum_i w_i t_i` (the
      background counts as depth 0); True divides by the opacity, i.e. the
      expected depth of the surface given that the ray hits it (0 where the
      opacity is 0).

  Returns:
    dict with rgb `[num_rays, 3]` (foreground only, no background), opacity
    `[num_rays]`, depth `[num_rays]`, and, given normals, normal
    `[num_rays, 3]` = `sum_i w_i n_i` (not renormalized: its length is at most
    the opacity, so it fades out with the object like rgb does).
  """
  chex.assert_rank([weights, rgb, t_mids], [2, 3, 2])
  chex.assert_equal_shape([weights, t_mids])
  chex.assert_equal_shape_prefix([weights, rgb], 2)
  opacity = jnp.sum(weights, axis=-1)
  depth = jnp.sum(weights * t_mids, axis=-1)
  if normalize_depth:
    depth = depth / jnp.maximum(opacity, jnp.finfo(depth.dtype).tiny)
  out = {
      "rgb": jnp.einsum("rs,rsc->rc", weights, rgb),
      "opacity": opacity,
      "depth": depth,
  }
  if normals is not None:
    chex.assert_equal_shape([rgb, normals])
    out["normal"] = jnp.einsum("rs,rsc->rc", weights, normals)
  return out


def resample(key: Optional[jax.Array], t_edges: jax.Array, weights: jax.Array,
             num_samples: int) -> jax.Array:
  """Importance-samples new bin edges from the weights (inverse CDF).

  The weights define a piecewise-constant density over the bins (plus a small
  floor, RESAMPLE_WEIGHT_FLOOR per bin, so empty rays resample uniformly); new
  edges are its quantiles at stratified (key) or regular (None) levels in
  [0, 1]. No gradient flows into the weights.

  Args:
    key: PRNG key or None.
    t_edges: `[num_rays, num_bins + 1]` sorted edges.
    weights: `[num_rays, num_bins]`.
    num_samples: number of new bins.

  Returns:
    new_edges: `[num_rays, num_samples + 1]`, sorted, with the same endpoints as
    `t_edges`; bins are narrow where the weights are high.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  chex.assert_rank([t_edges, weights], 2)
  chex.assert_shape(t_edges, (weights.shape[0], weights.shape[1] + 1))
  mass = jax.lax.stop_gradient(weights) + RESAMPLE_WEIGHT_FLOOR
  cdf = jnp.cumsum(mass, axis=-1) / jnp.sum(mass, axis=-1, keepdims=True)
  # Exact 0 and 1 at the ends so that the new edges keep the old endpoints.
  cdf = jnp.concatenate([jnp.zeros_like(cdf[:, :1]), cdf[:, :-1],
                         jnp.ones_like(cdf[:, :1])], axis=-1)
  levels = _unit_interval_edges(key, (weights.shape[0],), num_samples)
  return jax.vmap(jnp.interp)(levels, cdf, jax.lax.stop_gradient(t_edges))


def _merge_edges(coarse_edges: jax.Array, fine_edges: jax.Array) -> jax.Array:
  """Union of two edge sets with equal endpoints: `[R, S+1]`, `[R, N+1]` ->
  `[R, S+N]` sorted (the fine endpoints are dropped as duplicates)."""
  return jnp.sort(jnp.concatenate([coarse_edges, fine_edges[:, 1:-1]], axis=-1),
                  axis=-1)


def _evaluate_field(field_fn: FieldFn, rays: Rays, t_edges: jax.Array):
  """Field outputs at the bin midpoints, reshaped to `[num_rays, num_bins, ...]`.
  Returns (sample_points, t_mids, outputs)."""
  num_rays, num_bins = t_edges.shape[0], t_edges.shape[1] - 1
  t_mids = bin_midpoints(t_edges)
  points = rays.origins[:, None, :] + t_mids[..., None] * rays.directions[:, None, :]
  outputs = field_fn(points.reshape(-1, 3))
  if "density" not in outputs or "albedo" not in outputs:
    raise ValueError("field_fn must return a dict with 'density' [N] and 'albedo' "
                     f"[N, 3]; got keys {sorted(outputs)}")
  outputs = {name: value.reshape((num_rays, num_bins) + value.shape[1:])
             for name, value in outputs.items()}
  return points, t_mids, outputs


def dilate_weights(weights: jax.Array) -> jax.Array:
  """`[num_rays, num_bins]` -> each bin's maximum over itself and its two
  neighbours: a conservative envelope, so bins next to a surface the coarse
  samples straddled still get fine samples."""
  padded = jnp.pad(weights, ((0, 0), (1, 1)))
  return jnp.maximum(jnp.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])


def proposal_edges(field_fn: FieldFn, rays: Rays, near: jax.Array, far: jax.Array,
                   proposal_key: Optional[jax.Array], placement_key: Optional[jax.Array],
                   *, num_proposal: int, num_samples: int,
                   uniform_share: float) -> jax.Array:
  """Bin edges `[num_rays, num_samples + 1]` on [near, far] concentrated where a
  ray's light is absorbed (empty-space skipping without an occupancy grid).

  The field's density at `num_proposal` stratified samples gives per-bin
  weights (no gradient flows through this pass: it only decides where to
  sample). The new edges are quantiles of the dilated weights
  (`dilate_weights`) mixed with a uniform density of share `uniform_share`, so
  every ray keeps some samples everywhere; edges always span [near, far], so
  the quadrature of `compute_alpha_weights` stays exact for constant density.
  """
  if not 0.0 < uniform_share <= 1.0:
    raise ValueError(f"proposal uniform_share must be in (0, 1], got {uniform_share}")
  coarse_edges = stratified_samples(proposal_key, near, far, num_proposal)
  _, _, coarse = _evaluate_field(field_fn, rays, coarse_edges)
  coarse_weights, _ = compute_alpha_weights(jax.lax.stop_gradient(coarse["density"]),
                                            coarse_edges, rays.directions)
  envelope = dilate_weights(coarse_weights)
  envelope = envelope / jnp.maximum(jnp.sum(envelope, axis=-1, keepdims=True),
                                    jnp.finfo(envelope.dtype).tiny)
  mass = (1.0 - uniform_share) * envelope + uniform_share / num_proposal
  return resample(placement_key, coarse_edges, mass, num_samples)


def render_rays(field_fn: FieldFn, rays: Rays, key: Optional[jax.Array], *,
                num_samples: int, scene_radius: float, background_fn: BackgroundFn,
                num_importance: int = 0, num_proposal: int = 0,
                proposal_uniform_share: float = 0.1,
                normalize_depth: bool = False) -> dict[str, jax.Array]:
  """Renders rays through a field inside the scene sphere over a background.

  Args:
    field_fn: points `[N, 3]` -> dict(density `[N]`, albedo `[N, 3]`, and
      optionally normal `[N, 3]`, composited into out["normal"]).
    rays: origins and directions `[num_rays, 3]`.
    key: PRNG key for stratified and importance sampling; None renders
      deterministically (regular bins), e.g. for evaluation.
    num_samples: stratified samples (bins) per ray.
    scene_radius: radius of the bounding sphere at the origin; nothing is
      rendered outside it.
    background_fn: directions `[num_rays, 3]` -> rgb `[num_rays, 3]`, seen
      through the transparent part of each ray (see background.py).
    num_importance: if > 0, a second pass evaluates the same field at the
      union of the stratified bins and `num_importance` bins resampled from
      the first pass's weights (hierarchical sampling, NeRF sec. 5.2).
    num_proposal: if > 0, empty-space skipping: a gradient-free pass of
      `num_proposal` stratified samples locates the visible surface
      (`proposal_edges`), and the `num_samples` bins that are rendered (and
      differentiated) are placed there instead of evenly along the ray.
      Exclusive with num_importance.
    proposal_uniform_share: share of the proposal-placed bins spread evenly
      over the ray, so that density can still grow in empty space.
    normalize_depth: see `composite`.

  Returns:
    dict with rgb `[num_rays, 3]` (over the background), opacity `[num_rays]`,
    depth `[num_rays]`, weights `[num_rays, num_bins]`, t_edges
    `[num_rays, num_bins + 1]` (num_bins = num_samples + num_importance - 1
    with importance sampling, else num_samples), and normal `[num_rays, 3]`
    when the field returns normals (see `composite`).
  """
  chex.assert_rank([rays.origins, rays.directions], 2)
  stratified_key = importance_key = None
  if key is not None:
    stratified_key, importance_key = jax.random.split(key)

  if num_importance > 0 and num_proposal > 0:
    raise ValueError(f"num_importance={num_importance} and num_proposal={num_proposal}: "
                     "choose one way of placing samples")
  near, far = intersect_sphere(rays, scene_radius)
  if num_proposal > 0:
    proposal_key, placement_key = jax.random.split(stratified_key) if key is not None else (
        None, None)
    t_edges = proposal_edges(field_fn, rays, near, far, proposal_key, placement_key,
                             num_proposal=num_proposal, num_samples=num_samples,
                             uniform_share=proposal_uniform_share)
  else:
    t_edges = stratified_samples(stratified_key, near, far, num_samples)
  if num_importance > 0:
    _, _, coarse = _evaluate_field(field_fn, rays, t_edges)
    coarse_weights, _ = compute_alpha_weights(coarse["density"], t_edges,
                                              rays.directions)
    fine_edges = resample(importance_key, t_edges, coarse_weights, num_importance)
    t_edges = _merge_edges(t_edges, fine_edges)

  _, t_mids, samples = _evaluate_field(field_fn, rays, t_edges)
  weights, _ = compute_alpha_weights(samples["density"], t_edges, rays.directions)
  out = composite(weights, samples["albedo"], t_mids, samples.get("normal"), normalize_depth)
  background = background_fn(rays.directions)
  chex.assert_equal_shape([background, rays.directions])
  out["rgb"] = out["rgb"] + (1.0 - out["opacity"])[:, None] * background
  out["weights"] = weights
  out["t_edges"] = t_edges
  return out


def render_in_chunks(render_fn: Callable[[Rays], dict], rays: Rays,
                     chunk_size: int) -> dict[str, jax.Array]:
  """Renders many rays (e.g. a full image) `chunk_size` rays at a time.

  Bounds peak memory for high-resolution evaluation; `jax.lax.map` traces
  `render_fn` once for all chunks.

  Args:
    render_fn: Rays `[chunk_size, 3]` -> dict of per-ray arrays
      `[chunk_size, ...]`, e.g. `functools.partial(render_rays, field_fn,
      key=None, num_samples=..., ...)`.
    rays: origins and directions `[..., 3]` with any batch shape, e.g.
      `[height, width, 3]`.
    chunk_size: rays per chunk.

  Returns:
    dict of arrays `[..., *per_ray_shape]` with the batch shape of `rays`.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  batch_shape = rays.origins.shape[:-1]
  num_rays = math.prod(batch_shape)
  num_chunks = -(-num_rays // chunk_size)
  padding = num_chunks * chunk_size - num_rays

  def to_chunks(x):
    # Padding repeats the last ray, so padded rays stay valid (unit directions).
    x = jnp.pad(x.reshape(num_rays, 3), ((0, padding), (0, 0)), mode="edge")
    return x.reshape(num_chunks, chunk_size, 3)

  chunks = Rays(to_chunks(rays.origins), to_chunks(rays.directions))
  out = jax.lax.map(render_fn, chunks)

  def from_chunks(x):
    per_ray_shape = x.shape[2:]
    return x.reshape((num_chunks * chunk_size,) + per_ray_shape)[:num_rays].reshape(
        batch_shape + per_ray_shape)

  return jax.tree.map(from_chunks, out)


def render_images(render_fn: Callable[[Rays], dict], cameras: Cameras, height: int,
                  width: int, chunk_size: int = 4096) -> dict[str, jax.Array]:
  """Full images from cameras of batch shape `[...]`: every per-ray output of
  `render_fn` gets shape `[..., height, width, ...]` (see `render_in_chunks`)."""
  return render_in_chunks(render_fn, generate_rays(cameras, height, width), chunk_size)
