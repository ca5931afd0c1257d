"""The embedded shapes world: procedural scenes and their ground-truth renders.

Prompt sets: `att3d_jax.shapes.prompt_sets.load_prompt_set`.
"""

from att3d_jax.shapes.gt_render import render_gt
from att3d_jax.shapes.gt_render import render_prompt_views
from att3d_jax.shapes.gt_render import render_views
from att3d_jax.shapes.scenes import all_prompts
from att3d_jax.shapes.scenes import all_scenes
from att3d_jax.shapes.scenes import encode_scene
from att3d_jax.shapes.scenes import encode_scenes
from att3d_jax.shapes.scenes import parse_prompt
from att3d_jax.shapes.scenes import prompt_of
from att3d_jax.shapes.scenes import Scene
from att3d_jax.shapes.scenes import SceneArrays
from att3d_jax.shapes.scenes import strip_view_suffix
