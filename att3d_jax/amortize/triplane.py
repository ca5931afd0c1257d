r"""Text -> triplane generator (mapping kind "triplane"), beside ATT3D's hypernet.

    c [B, D] -> MLP (D -> hidden_width -> 3 r r C, SiLU)   one low-resolution triplane per prompt
             -> [B, 3, r, r, C]
             -> (log2(R / r) - 1) x (2x nearest upsampling, 3x3 conv C -> C, SiLU)   shared
             -> 2x nearest upsampling, 3x3 conv C -> F              by all prompts and planes
             -> triplane [B, 3, R, R, F]
    point x -> bilinear samples of the xy, xz, yz planes at x, concatenated
            -> [3F] -> the shared field MLP (nerf/field.py) -> density, albedo

The design follows the amortized triplane generators AToM (arXiv 2402.00867)
and LATTE3D (arXiv 2403.15385), with Instant3D's (arXiv 2311.08403)
convolutional upsampling decoder; what was taken and what was simplified is in
docs/design.md ("Triplane generator").

Plane layout: plane 0 is xy, 1 is xz, 2 is yz; texel [i, j] of a plane lies at
(i / (R - 1), j / (R - 1)) in the unit square of its two axes, in that order
(the align-corners convention: the corner texels sit on the faces of the unit
cube [0, 1]^3 the field covers); points outside are clamped to it, as the hash
grid clamps them. The three samples are concatenated, so the MLP knows which
plane a feature came from (EG3D, arXiv 2112.07945, sums them instead:
`combine="sum"`).

Initialization: the output convolution's kernel is small (`OUTPUT_INIT_SCALE`)
and its bias zero, so the untrained field's features are ~1e-2 and the field
is ATT3D's density blob, as with the hypernet's small tables.

Use with configs/shapes.py (fields and defaults there, under config.mapping):

    python -m att3d_jax.main --config=configs/shapes.py --workdir=runs/triplane \
        --config.mapping.kind=triplane --config.mapping.triplane_resolution=64
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from att3d_jax.amortize import mapping

# (first, second) axis of each plane's two texel axes: xy, xz, yz.
PLANE_AXES = ((0, 1), (0, 2), (1, 2))
COMBINE_MODES = ("concat", "sum")
# Output convolution's kernel: lecun_normal times this, i.e. features ~1e-2 at init.
OUTPUT_INIT_SCALE = 1e-2


def sample_plane(plane: jax.Array, coords: jax.Array) -> jax.Array:
  """Bilinear interpolation of one plane, align-corners convention.

  Args:
    plane: [R, R, F] float32, R >= 2; texel [i, j] lies at (i / (R - 1), j / (R - 1)).
    coords: [N, 2] positions in the unit square (first, second texel axis);
      outside [0, 1] they are clamped to its border.

  Returns:
    [N, F]: the weighted sum of the 4 texels around each position.
  """
  resolution = plane.shape[0]
  position = jnp.clip(coords, 0.0, 1.0) * (resolution - 1)
  # The lower corner stays <= R - 2 so that position R - 1 is the upper corner
  # at weight 1 (not a read past the edge).
  lower = jnp.clip(jnp.floor(position), 0, resolution - 2)
  frac = position - lower
  lower = lower.astype(jnp.int32)
  flat = plane.reshape(resolution * resolution, plane.shape[-1])
  index = lower[:, 0] * resolution + lower[:, 1]
  u, v = frac[:, 0:1], frac[:, 1:2]
  return ((1 - u) * (1 - v) * flat[index] + (1 - u) * v * flat[index + 1]
          + u * (1 - v) * flat[index + resolution] + u * v * flat[index + resolution + 1])


def triplane_features(planes: jax.Array, unit_points: jax.Array,
                      combine: str = "concat") -> jax.Array:
  """Point features of one prompt's triplane.

  Args:
    planes: [3, R, R, F] float32, the xy, xz and yz planes (PLANE_AXES).
    unit_points: [N, 3] in [0, 1]^3.
    combine: "concat" ([N, 3F], planes in PLANE_AXES order) or "sum" ([N, F]).

  Returns:
    [N, 3F] or [N, F].
  """
  if combine not in COMBINE_MODES:
    raise ValueError(f"unknown triplane combine {combine!r} (config.mapping.triplane_combine); "
                     f"expected one of {COMBINE_MODES}")
  coords = jnp.stack([unit_points[:, list(axes)] for axes in PLANE_AXES])  # [3, N, 2]
  # One plane after another, the body rematerialized in the backward pass, as
  # hashgrid.encode walks its levels: measured 1.7-3x faster (forward+backward)
  # than vmap over the planes or one gather of all 12 corners (docs/design.md).
  sample = jax.checkpoint(lambda carry, plane_coords: (carry, sample_plane(*plane_coords)))
  _, samples = jax.lax.scan(sample, None, (planes, coords))  # [3, N, F]
  if combine == "sum":
    return jnp.sum(samples, axis=0)
  return jnp.transpose(samples, (1, 0, 2)).reshape(unit_points.shape[0], -1)


def _upsample_nearest(images: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, 2H, 2W, C], each pixel repeated 2 x 2."""
  return jnp.repeat(jnp.repeat(images, 2, axis=1), 2, axis=2)


@mapping.register("triplane")
class TriplaneGenerator(nn.Module):
  """Text embedding [B, D] -> triplanes [B, 3, R, R, F] (see the module docstring).

  `spectral_norm` normalizes the MLP's two kernels as in ATT3D's hypernet
  (mapping.SpectralDense, state in mapping.SPECTRAL_STATS); the convolutions
  are plain (shared by all prompts, like the field MLP).
  """

  resolution: int = 64  # R: output planes' texels per side
  low_resolution: int = 8  # r: the MLP's planes; R / r must be a power of 2
  channels: int = 16  # C: the MLP's planes' and the decoder's channels
  features: int = 8  # F: output features per plane
  hidden_width: int = 128
  combine: str = "concat"
  spectral_norm: bool = True
  num_power_iterations: int = 10

  conditions_field = False
  per_prompt_param = None
  generalizes = True

  @classmethod
  def from_config(cls, spec, num_prompts, config) -> "TriplaneGenerator":
    """From config.mapping's triplane_* fields (spec, num_prompts unused)."""
    del spec, num_prompts  # Not a hash grid; the same network for all prompts.
    resolution, low = config.triplane_resolution, config.triplane_low_resolution
    if low < 2 or resolution < low or resolution % low or (resolution // low) & (
        resolution // low - 1):
      raise ValueError(
          "config.mapping.triplane_resolution must be config.mapping.triplane_low_resolution "
          f"(>= 2) times a power of 2; got {resolution} and {low}.")
    if config.triplane_combine not in COMBINE_MODES:
      raise ValueError(f"config.mapping.triplane_combine={config.triplane_combine!r}; "
                       f"expected one of {COMBINE_MODES}.")
    return cls(resolution=resolution, low_resolution=low,
               channels=config.triplane_channels, features=config.triplane_features,
               hidden_width=config.triplane_hidden_width, combine=config.triplane_combine,
               spectral_norm=config.triplane_spectral_norm,
               num_power_iterations=config.num_power_iterations)

  @property
  def feature_dim(self) -> int:
    """Width of `encode`'s point features: 3F (concat) or F (sum)."""
    return self.features * (3 if self.combine == "concat" else 1)

  @nn.nowrap
  def encode(self, planes: jax.Array, unit_points: jax.Array) -> jax.Array:
    """One prompt's triplane [3, R, R, F], unit_points [N, 3] -> [N, feature_dim]."""
    return triplane_features(planes, unit_points, self.combine)

  def _dense(self, features: int, name: str, x: jax.Array, update_stats: bool) -> jax.Array:
    if self.spectral_norm:
      return mapping.SpectralDense(features, num_power_iterations=self.num_power_iterations,
                                   name=name)(x, update_stats=update_stats)
    return nn.Dense(features, name=name)(x)

  @nn.compact
  def __call__(self, text_embedding: jax.Array, prompt_index: jax.Array, *,
               update_stats: bool = False) -> mapping.MappingOutput:
    """text_embedding: [B, D]; prompt_index: [B] (unused) -> tables [B, 3, R, R, F]."""
    del prompt_index  # Generalizes from c alone.
    if text_embedding.ndim != 2:
      raise ValueError(f"text_embedding must be [B, D], got shape {text_embedding.shape}")
    batch, low, channels = text_embedding.shape[0], self.low_resolution, self.channels
    hidden = nn.silu(self._dense(self.hidden_width, "hidden",
                                 text_embedding.astype(jnp.float32), update_stats))
    planes = self._dense(3 * low * low * channels, "planes", hidden, update_stats)
    planes = planes.reshape(batch * 3, low, low, channels)
    size = low
    while size < self.resolution // 2:
      planes = _upsample_nearest(planes)
      size *= 2
      planes = nn.silu(nn.Conv(channels, (3, 3), padding="SAME", name=f"up_{size}")(planes))
    if size < self.resolution:
      # The last upsampling feeds the output conv directly: a C -> C conv at R
      # would cost (C / F) times the output conv, the decoder's largest layer.
      planes = _upsample_nearest(planes)
    planes = nn.Conv(self.features, (3, 3), padding="SAME", name="output",
                     kernel_init=nn.initializers.variance_scaling(
                         OUTPUT_INIT_SCALE**2, "fan_in", "truncated_normal"))(planes)
    return mapping.MappingOutput(
        planes.reshape(batch, 3, self.resolution, self.resolution, self.features), None)
