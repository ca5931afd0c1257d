"""The Gradio demo: prompt checks, a real browser session and concurrent users.

One demo server (`python -m att3d_jax.demo`, the shipped model) serves the
whole module on 127.0.0.1 at a free port. The browser test drives Debian's
chromium through the system chromedriver (/usr/bin/chromedriver; selenium's
own driver download, selenium-manager, is made to fail if anything calls it).
Without chromium the browser test skips, unless ATT3D_REQUIRE_BROWSER=1 (set
by .ci/run), which turns the skip into a failure.
"""

import concurrent.futures
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import flax.serialization
import imageio.v3 as iio
import numpy as np
import pytest
import trimesh

from att3d_jax import build as build_lib
from att3d_jax import checkpoints
from att3d_jax import demo
from att3d_jax import generate
from att3d_jax import names
from configs import shapes as shapes_config

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TURNTABLE_FRAMES = 12  # small: the tests check the pipeline, not the looks
SERVER_START_S = 300  # loading the model and compiling on a busy 2-core CPU
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _missing(reason: str):
  """Skip, or fail when the environment demands the browser test."""
  if os.environ.get("ATT3D_REQUIRE_BROWSER") == "1":
    pytest.fail(f"ATT3D_REQUIRE_BROWSER=1 but {reason}")
  pytest.skip(reason)


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """(url, out_root) of a running demo; stopped after the module."""
  out_root = tmp_path_factory.mktemp("demo_outputs")
  port = _free_port()
  log_path = out_root.parent / "demo_server.log"
  env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
  with open(log_path, "w") as log:
    process = subprocess.Popen(
        [sys.executable, "-m", "att3d_jax.demo", "--host=127.0.0.1", f"--port={port}",
         f"--out_root={out_root}", f"--turntable_frames={TURNTABLE_FRAMES}",
         "--mesh_resolution=32"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
  url = f"http://127.0.0.1:{port}/"
  deadline = time.time() + SERVER_START_S
  try:
    while True:
      if process.poll() is not None:
        raise RuntimeError(f"the demo exited ({process.returncode}):\n{log_path.read_text()}")
      try:
        urllib.request.urlopen(url, timeout=5).read()
        break
      except OSError:
        if time.time() > deadline:
          raise RuntimeError(f"no demo at {url} after {SERVER_START_S} s:\n"
                             f"{log_path.read_text()}") from None
        time.sleep(1.0)
    yield url, out_root
  finally:
    process.terminate()
    try:
      process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()


def _check_outputs(video: str, glb: str, prompt: str):
  """A playable MP4 of the turntable and a loadable GLB named after the prompt."""
  assert pathlib.Path(glb).stem == names.for_prompt(prompt), (glb, prompt)
  frames = iio.imread(video)
  assert frames.shape[0] == TURNTABLE_FRAMES and frames.shape[-1] == 3, frames.shape
  assert frames.std() > 1.0  # an object in front of the background, not a blank video
  with open(video, "rb") as f:
    assert f.read(12)[4:8] == b"ftyp"  # the MP4 container header
  mesh = trimesh.load(glb, force="mesh")
  assert len(mesh.vertices) > 100 and len(mesh.faces) > 100
  assert mesh.visual.vertex_colors.shape[0] == len(mesh.vertices)


@pytest.mark.parametrize("prompt,message", [
    ("", "empty"), ("   ", "empty"), ("x" * 501, "501 characters"),
    ("a red\ncube", "U+000A"), ("a red \x1b[31mcube", "U+001B"), ("a\u200bb", "U+200B")])
def test_bad_prompts_are_refused_with_a_message(prompt, message):
  with pytest.raises(demo.PromptError, match=re.escape(message)):
    demo.check_prompt(prompt)


def test_good_prompts_pass_stripped():
  assert demo.check_prompt("  a red cube ") == "a red cube"
  assert demo.check_prompt("x" * 500) == "x" * 500
  assert demo.check_prompt("un cube rouge foncé") == "un cube rouge foncé"


def test_old_request_folders_are_pruned(tmp_path):
  old, new = tmp_path / "request-old", tmp_path / "request-new"
  old.mkdir()
  new.mkdir()
  os.utime(old, (time.time() - 2 * demo.OUTPUT_MAX_AGE_S,) * 2)
  demo.prune_outputs(tmp_path)
  assert not old.exists() and new.exists()


def test_guidance_weight_slider_for_a_model_amortized_over_it(tiny_shapes_model, tmp_path):
  import gradio as gr  # pylint: disable=g-import-not-at-top

  config = shapes_config.get_config("quick")
  config.guidance.path = tiny_shapes_model
  config.guidance.amortize_scale = True
  # An untrained model saved as an exported one: the demo only needs its shapes.
  state = build_lib.build(config, for_training=False).state
  exported = tmp_path / "model"
  exported.mkdir()
  (exported / "config.json").write_text(config.to_json_best_effort())
  (exported / checkpoints.PARAMS_FILE).write_bytes(flax.serialization.to_bytes(
      {"params": state["params"], "stats": state["stats"]}))
  app = demo.Demo(generate.load_trained(str(exported)), tmp_path / "out", num_frames=4,
                  mesh_resolution=16)
  low, high = config.guidance.scale_range
  assert app.scale_range == (low, high)
  sliders = [block for block in demo.build_ui(app).blocks.values()
             if isinstance(block, gr.Slider) and "guidance weight" in str(block.label)]
  assert len(sliders) == 2 and (sliders[0].minimum, sliders[0].maximum) == (low, high)
  # The weight reaches the mapping network's extra input, 0 at low and 1 at high.
  assert app.generator.mapping_input(["a red cube"], scale=low)[0, -1] == 0.0
  assert app.generator.mapping_input(["a red cube"], scale=high)[0, -1] == 1.0
  video, _, latency, status = app.generate("a red cube", high)
  assert pathlib.Path(video).is_file() and "text embedding" in latency, status


def _colored_fraction(png: bytes) -> float:
  """Share of strongly colored pixels: the red object drawn on the gray/white page."""
  image = iio.imread(png)[..., :3].astype(int)
  return float(np.mean(image.max(-1) - image.min(-1) > 80))


def _browser(tmp_path):
  """Headless chromium through the system chromedriver; never selenium-manager."""
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    _missing(f"{CHROMIUM} / {CHROMEDRIVER} absent (apt-get install chromium chromium-driver)")
  try:
    from selenium import webdriver  # pylint: disable=g-import-not-at-top
    from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
    from selenium.webdriver.common import selenium_manager  # pylint: disable=g-import-not-at-top
  except ImportError:
    _missing("selenium is not installed (pip install -r requirements.txt)")

  def no_download(*args, **kwargs):
    raise AssertionError("selenium-manager was called: the system chromedriver must be used")

  selenium_manager.SeleniumManager.binary_paths = no_download
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                   "--window-size=1280,1500", "--use-angle=swiftshader",
                   "--enable-unsafe-swiftshader", f"--user-data-dir={tmp_path / 'chrome'}"):
    options.add_argument(argument)
  return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def test_browser_generates_video_and_3d_view(server, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support import expected_conditions  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top

  url, _ = server
  driver = _browser(tmp_path)
  try:
    driver.get(url)
    wait = WebDriverWait(driver, 120)
    box = wait.until(expected_conditions.element_to_be_clickable(
        (By.CSS_SELECTOR, "#prompt textarea, #prompt input")))
    box.send_keys("a red cube")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    video = wait.until(expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, "#video video[src]")))
    assert ".mp4" in video.get_attribute("src")
    viewer = wait.until(expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, "#model3d canvas")))
    wait.until(lambda _: _colored_fraction(viewer.screenshot_as_png) > 0.02)  # drawn
    latency = wait.until(expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, "#latency table"))).text
    stages = dict(re.findall(r"^(.+?) ([0-9.]+)$", latency, re.MULTILINE))
    for stage in ("text embedding", "mapping network", "one 64x64 render"):
      assert float(stages[stage]) > 0.0, latency
    assert "seen prompt" in driver.find_element(By.CSS_SELECTOR, "#status").text
    screenshot = tmp_path / "demo.png"
    assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    if os.environ.get("ATT3D_DEMO_SCREENSHOT"):  # how docs/demo.png is made
      shutil.copy(screenshot, os.environ["ATT3D_DEMO_SCREENSHOT"])
  finally:
    driver.quit()


def test_concurrent_requests_get_distinct_valid_files(server):
  import gradio_client  # pylint: disable=g-import-not-at-top

  url, out_root = server
  client = gradio_client.Client(url, verbose=False)
  colors, shapes = ("red", "blue", "green", "yellow"), ("cube", "sphere")
  prompts = [f"a {color} {shape}" for color in colors for shape in shapes]
  before = set(out_root.glob("request-*"))
  jobs = [client.submit(prompt, api_name="/generate") for prompt in prompts]
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    results = list(pool.map(lambda job: job.result(timeout=240), jobs))
  videos = [r[0]["video"] if isinstance(r[0], dict) else r[0] for r in results]
  glbs = [r[1] for r in results]
  assert len(set(videos)) == len(set(glbs)) == len(prompts)
  for prompt, video, glb, result in zip(prompts, videos, glbs, results):
    _check_outputs(video, glb, prompt)
    assert "text embedding" in result[2] and "Error" not in result[3]
  # Each request wrote into its own folder on the server.
  assert len(set(out_root.glob("request-*")) - before) == len(prompts)


def test_refused_and_out_of_world_prompts_over_the_api(server):
  import gradio_client  # pylint: disable=g-import-not-at-top

  client = gradio_client.Client(server[0], verbose=False)
  video, glb, latency, status = client.predict("x" * 600, api_name="/generate")
  assert video is None and glb is None and latency == "" and "600 characters" in status
  _, glb, _, status = client.predict("a spaceship made of cheese", api_name="/generate")
  assert "out of distribution" in status and "Warning" in status
  _, glb, _, status = client.predict("a red cube", "a blue sphere", 0.5, api_name="/blend")
  assert glb is not None and "Error" not in status
