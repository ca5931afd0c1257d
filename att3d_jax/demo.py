r"""Browser demo: type a prompt, get a turning 3D object in one forward pass.

  python -m att3d_jax.demo                          # the shipped shapes model
  python -m att3d_jax.demo --workdir=runs/shapes    # a training workdir or exported model
  python -m att3d_jax.demo --host=0.0.0.0 --port=7860

A Gradio app over `att3d_jax.generate` (its model loading and Generator; each
request runs `generate.generate_prompt`): a prompt becomes a turntable video
(MP4) and an interactive 3D view of the mesh (.glb), with the latency of each
stage. A second tab blends two prompts with a slider (the object of
(1 - a) c_A + a c_B); a model trained amortized over the guidance weight
(config.guidance.amortize_scale) gets a guidance-weight slider. The training
prompts are clickable examples.

Prompts outside the model's world still generate, with a visible warning (as
the CLI prints); empty, overlong (> MAX_PROMPT_CHARS) and control-character
prompts get a message instead of a result. Requests go through Gradio's queue
one at a time (the CPU is the bottleneck; others wait their turn) and each
writes into its own fresh folder, so no user ever reads another's
half-written file.
"""

import os
import pathlib
import shutil
import tempfile
import time
from typing import Optional
import unicodedata

from absl import app
from absl import flags

from att3d_jax import compilation_cache
from att3d_jax import generate
from att3d_jax import names

MAX_PROMPT_CHARS = 500  # longer text is refused (MiniLM reads 24 tokens of it anyway)
OUTPUT_MAX_AGE_S = 3600  # request folders older than this are deleted
NO_OUTPUTS = (None, None)  # (video, model) when a request is refused


class PromptError(ValueError):
  """A prompt the demo refuses, with the message shown to the user."""


def check_prompt(prompt: Optional[str], field: str = "prompt") -> str:
  """The prompt stripped of outer whitespace; PromptError says what is wrong."""
  text = (prompt or "").strip()
  if not text:
    raise PromptError(f"The {field} is empty: type a description such as \"a red cube\".")
  if len(text) > MAX_PROMPT_CHARS:
    raise PromptError(f"The {field} has {len(text)} characters; at most {MAX_PROMPT_CHARS} "
                      "are accepted. Shorten it.")
  control = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in ("Cc", "Cf")})
  if control:
    raise PromptError(f"The {field} contains control characters ({', '.join(control)}); "
                      "remove them (line breaks and tabs included).")
  return text


def prune_outputs(root: pathlib.Path, max_age_s: float = OUTPUT_MAX_AGE_S) -> None:
  """Deletes request folders under root older than max_age_s (Gradio keeps its copies)."""
  cutoff = time.time() - max_age_s
  for folder in root.glob("request-*"):
    if folder.is_dir() and folder.stat().st_mtime < cutoff:
      shutil.rmtree(folder, ignore_errors=True)


def latency_markdown(timings: dict, total_ms: float) -> str:
  """The per-stage latency table shown under the outputs."""
  rows = [("text embedding", timings["embed_ms"]), ("mapping network", timings["mapping_ms"]),
          ("one 64x64 render", timings["render_ms"]), ("mesh (.glb, .obj)", timings["mesh_ms"]),
          ("request total (with turntable video)", total_ms)]
  lines = ["| stage | ms |", "|---|---|"] + [f"| {stage} | {ms:.1f} |" for stage, ms in rows]
  return "**Latency**\n\n" + "\n".join(lines)


class Demo:
  """One loaded model and the request handlers the UI calls."""

  def __init__(self, trained: generate.TrainedModel, out_root: str | os.PathLike,
               num_frames: int = 24, mesh_resolution: int = 64, image_size: int = 64):
    self.trained = trained
    self.generator = generate.Generator(trained, image_size)
    self.out_root = pathlib.Path(out_root)
    self.out_root.mkdir(parents=True, exist_ok=True)
    self.num_frames, self.mesh_resolution = num_frames, mesh_resolution
    guidance = trained.config.guidance
    self.scale_range = tuple(guidance.scale_range) if guidance.amortize_scale else None
    self.default_scale = float(guidance.scale)

  def _run(self, prompt: str, scale: Optional[float], mix: Optional[tuple[str, float]]):
    """(video path, glb path or None, latency markdown, status markdown)."""
    prune_outputs(self.out_root)
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="request-", dir=self.out_root))
    start = time.perf_counter()
    name = None if mix is None else names.for_prompt(
        f"{prompt} to {mix[0]} at {round(100 * mix[1])} percent")
    timings = generate.generate_prompt(
        self.generator, prompt, out_dir, self.num_frames, self.mesh_resolution, name=name,
        scale=None if self.scale_range is None else float(scale), mix=mix)
    total_ms = 1000.0 * (time.perf_counter() - start)
    glb = out_dir / f"{timings['name']}.glb"
    notes = []
    kinds = [(prompt, timings["kind"])]
    if mix:
      kinds.append((mix[0], generate.describe_prompt(self.trained, mix[0])))
    for text, kind in kinds:
      if kind == "out of distribution":
        notes.append(f"⚠️ **Warning:** \"{text}\" is outside the training world's grammar "
                     "(out of distribution); the object below is generated anyway and may "
                     "not match it.")
      else:
        notes.append(f"\"{text}\": {kind} prompt.")
    if not glb.is_file():
      notes.append("⚠️ The field is empty at the surface level: no mesh for this prompt.")
    return (str(out_dir / f"{timings['name']}.mp4"), str(glb) if glb.is_file() else None,
            latency_markdown(timings, total_ms), "\n\n".join(notes))

  def generate(self, prompt: str, scale: Optional[float] = None):
    """The prompt's object: (video, glb, latency, status)."""
    try:
      prompt = check_prompt(prompt)
    except PromptError as error:
      return (*NO_OUTPUTS, "", f"❌ **Error:** {error}")
    return self._run(prompt, scale, None)

  def blend(self, prompt_a: str, prompt_b: str, weight: float, scale: Optional[float] = None):
    """The object of (1 - weight) c_A + weight c_B: (video, glb, latency, status)."""
    try:
      prompt_a, prompt_b = check_prompt(prompt_a, "first prompt"), check_prompt(
          prompt_b, "second prompt")
    except PromptError as error:
      return (*NO_OUTPUTS, "", f"❌ **Error:** {error}")
    return self._run(prompt_a, scale, (prompt_b, float(weight)))


def build_ui(demo: Demo):
  """The Gradio Blocks app; API names: /generate and /blend (gradio_client)."""
  import gradio as gr  # pylint: disable=g-import-not-at-top

  def scale_slider():
    if demo.scale_range is None:
      return []
    low, high = demo.scale_range
    return [gr.Slider(low, high, value=demo.default_scale, step=0.5,
                      label="guidance weight (the model was trained amortized over it)")]

  def outputs(prefix):
    with gr.Row():
      video = gr.Video(label="turntable (MP4)", autoplay=True, loop=True, height=320,
                       elem_id=f"{prefix}video")
      model = gr.Model3D(label="3D view (.glb; drag to rotate)", height=320,
                         elem_id=f"{prefix}model3d")
    return video, model, gr.Markdown(elem_id=f"{prefix}latency")

  title = "ATT3D (JAX): amortized text-to-3D"
  with gr.Blocks(title=title, analytics_enabled=False) as blocks:
    gr.Markdown(f"# {title}\nOne forward pass per prompt: text embedding -> mapping "
                "network -> hash grid -> renders and a mesh. Model: "
                f"`{demo.trained.config.guidance.kind}` world, "
                f"{len(demo.trained.train_prompts)} training prompts.")
    with gr.Tab("Prompt"):
      with gr.Row():
        prompt = gr.Textbox(label="prompt", placeholder="a red cube", max_lines=1, scale=4,
                            elem_id="prompt")
        button = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
      scale = scale_slider()
      status = gr.Markdown(elem_id="status")
      video, model, latency = outputs("")
      gr.Examples(examples=[[p] for p in demo.trained.train_prompts], inputs=[prompt],
                  label="training prompts (click one)", examples_per_page=16)
      event_outputs = [video, model, latency, status]
      button.click(demo.generate, [prompt] + scale, event_outputs, api_name="generate")
      prompt.submit(demo.generate, [prompt] + scale, event_outputs, api_name=False)
    with gr.Tab("Interpolate"):
      with gr.Row():
        prompt_a = gr.Textbox(label="prompt A", value=demo.trained.train_prompts[0],
                              max_lines=1)
        prompt_b = gr.Textbox(label="prompt B", value=demo.trained.train_prompts[-1],
                              max_lines=1)
      weight = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="A -> B")
      blend_scale = scale_slider()
      blend_button = gr.Button("Blend", variant="primary")
      blend_status = gr.Markdown(elem_id="blend_status")
      blend_video, blend_model, blend_latency = outputs("blend_")
      blend_outputs = [blend_video, blend_model, blend_latency, blend_status]
      blend_button.click(demo.blend, [prompt_a, prompt_b, weight] + blend_scale, blend_outputs,
                         api_name="blend")
      weight.release(demo.blend, [prompt_a, prompt_b, weight] + blend_scale, blend_outputs,
                     api_name=False)
  # One request at a time: the CPU is the bottleneck, the queue orders the rest.
  blocks.queue(default_concurrency_limit=1)
  return blocks


def launch(demo: Demo, host: str, port: int, prevent_thread_lock: bool = False):
  """Serves the app; returns what gr.Blocks.launch returns."""
  blocks = build_ui(demo)
  return blocks.launch(server_name=host, server_port=port, ssr_mode=False,
                       allowed_paths=[str(demo.out_root)], footer_links=["api"],
                       prevent_thread_lock=prevent_thread_lock, quiet=prevent_thread_lock)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls
  compilation_cache.enable(_COMPILATION_CACHE.value)
  trained = generate.load_trained(_WORKDIR.value or str(generate.SHIPPED_MODEL),
                                  _GUIDANCE_PATH.value)
  out_root = _OUT_ROOT.value or os.path.join(tempfile.gettempdir(), "att3d_demo")
  demo = Demo(trained, out_root, _TURNTABLE_FRAMES.value, _MESH_RESOLUTION.value, _SIZE.value)
  demo.generate(trained.train_prompts[0])  # compile before the first user waits
  launch(demo, _HOST.value, _PORT.value)


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "training workdir or exported model folder; "
                                 "default: the shipped pretrained shapes model")
  _GUIDANCE_PATH = flags.DEFINE_string("guidance_path", None, "override the guidance "
                                       "model folder recorded in the model's config")
  _HOST = flags.DEFINE_string("host", "127.0.0.1", "address to serve on (0.0.0.0: all)")
  _PORT = flags.DEFINE_integer("port", 7860, "port to serve on")
  _OUT_ROOT = flags.DEFINE_string("out_root", None, "folder of the per-request output "
                                  "folders; default: <tmp>/att3d_demo")
  _SIZE = flags.DEFINE_integer("size", 64, "rendered image size")
  _TURNTABLE_FRAMES = flags.DEFINE_integer("turntable_frames", 24, "turntable frames")
  _MESH_RESOLUTION = flags.DEFINE_integer("mesh_resolution", 64, "marching-cubes lattice")
  _COMPILATION_CACHE = flags.DEFINE_string(
      "compilation_cache", compilation_cache.DEFAULT_DIR,
      "persistent XLA compilation cache folder ('' = off): later runs skip compiling")
  app.run(main)
