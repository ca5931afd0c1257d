"""The package's import graph: no cycles (deferred imports included), and the
guidance models stay independent of training, rendering and amortization."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "att3d_jax"
# guidance/ is the interface to frozen text-to-image models; it must not reach
# into the trainer, the NeRF or the mapping networks.
FORBIDDEN = {"guidance": ("train", "nerf", "amortize")}


def import_graph(package: pathlib.Path) -> dict[str, set[str]]:
  """module -> the package's modules it imports anywhere in its file (top
  level or inside functions), by dotted name relative to `package`."""
  name = package.name
  modules = {}
  for path in package.rglob("*.py"):
    parts = path.relative_to(package).with_suffix("").parts
    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

  def resolve(dotted: str) -> str | None:
    if dotted != name and not dotted.startswith(name + "."):
      return None
    relative = dotted[len(name) + 1:]
    while relative not in modules and "." in relative:
      relative = relative.rsplit(".", 1)[0]
    return relative if relative in modules else None

  graph = {}
  for module, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets |= {resolve(alias.name) for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:  # `from pkg.sub import module` or `... import name`
          full = f"{node.module}.{alias.name}"
          targets.add(resolve(full) if resolve(full) == full[len(name) + 1:]
                      else resolve(node.module))
    graph[module] = {t for t in targets if t is not None and t != module and t != ""}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        return stack[stack.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    stack.pop()
    state[module] = "done"
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module)
      if cycle:
        return cycle
  return None


def forbidden_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
  """(module, target) pairs breaking FORBIDDEN."""
  bad = []
  for module, targets in graph.items():
    for folder, banned in FORBIDDEN.items():
      if module == folder or module.startswith(folder + "."):
        bad += [(module, t) for t in sorted(targets)
                if any(t == b or t.startswith(b + ".") for b in banned)]
  return bad


def test_package_has_no_import_cycle():
  graph = import_graph(PACKAGE)
  assert "train" in graph and "guidance.base" in graph  # the parse found the package
  assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_guidance_imports_no_trainer_nerf_or_amortize():
  assert forbidden_imports(import_graph(PACKAGE)) == []


def _plant(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  package = root / "att3d_jax"
  for relative, text in {"__init__.py": "", **files}.items():
    (package / relative).parent.mkdir(parents=True, exist_ok=True)
    (package / relative).write_text(text)
  return package


def test_a_planted_deferred_import_cycle_is_found(tmp_path):
  package = _plant(tmp_path, {
      "train.py": "from att3d_jax.guidance import real\n",
      "guidance/__init__.py": "",
      "guidance/real.py": "def load():\n  from att3d_jax import train\n  return train\n",
      "nerf/__init__.py": "",
      "nerf/cameras.py": "import numpy\n"})
  graph = import_graph(package)
  assert graph["train"] == {"guidance.real"} and graph["guidance.real"] == {"train"}
  cycle = find_cycle(graph)
  assert cycle is not None and set(cycle) == {"train", "guidance.real"}
  assert forbidden_imports(graph) == [("guidance.real", "train")]


def test_a_planted_guidance_import_of_nerf_is_found(tmp_path):
  package = _plant(tmp_path, {
      "guidance/__init__.py": "",
      "guidance/text.py": "from att3d_jax.nerf.cameras import Rays\nimport att3d_jax.amortize\n",
      "nerf/__init__.py": "",
      "nerf/cameras.py": "Rays = tuple\n",
      "amortize/__init__.py": ""})
  graph = import_graph(package)
  assert find_cycle(graph) is None
  assert forbidden_imports(graph) == [("guidance.text", "amortize"),
                                      ("guidance.text", "nerf.cameras")]


@pytest.mark.parametrize("text", ["import att3d_jax.b\n", "from att3d_jax import b\n",
                                  "from att3d_jax.b import thing\n"])
def test_every_import_form_is_an_edge(tmp_path, text):
  package = _plant(tmp_path, {"a.py": text, "b.py": "thing = 1\nfrom att3d_jax import a\n"})
  assert find_cycle(import_graph(package)) in (["a", "b", "a"], ["b", "a", "b"])
