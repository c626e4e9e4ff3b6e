"""The README's Python examples run as written and import saferl_jax by public paths only."""

import ast
import importlib
import re
import types
from pathlib import Path

import pytest

import saferl_jax

README = Path(__file__).parents[1] / "README.md"


def _python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
  blocks = _python_blocks()
  assert blocks, "the README has no Python example"
  monkeypatch.chdir(tmp_path)
  for block in blocks:
    exec(compile(block, str(README), "exec"), {})


def test_quick_start_has_exactly_two_shell_blocks_and_ci_runs_the_second():
  text = README.read_text()
  quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S)
  assert len(blocks) == 2
  assert "saferl-jax demo" in blocks[0]
  ci = (README.parent / ".ci" / "run").read_text()
  for line in blocks[1].strip().splitlines():
    assert line in ci, f"the test command {line!r} is not in .ci/run verbatim"


def _imports(source: str) -> list[str]:
  """Every saferl_jax import of a code block, written back as a line ("from saferl_jax import x")."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [f"import {a.name}" + (f" as {a.asname}" if a.asname else "") for a in node.names
                if a.name.split(".")[0] == "saferl_jax"]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "saferl_jax":
      found += [f"from {node.module} import {a.name}" for a in node.names]
  return found


def _is_public(line: str) -> bool:
  """`import saferl_jax [as sj]`, or `from saferl_jax import <subpackage>`; nothing deeper."""
  if re.fullmatch(r"import saferl_jax( as \w+)?", line):
    return True
  match = re.fullmatch(r"from saferl_jax import (\w+)", line)
  return bool(match) and match.group(1) in saferl_jax.__all__


def test_public_import_rule_tells_public_from_deep_paths():
  good = "import saferl_jax as sj\nimport saferl_jax\nfrom saferl_jax import ope, data\n"
  bad = ("from saferl_jax.data.click_logs import simulate_click_log\nimport saferl_jax.ranking\n"
         "from saferl_jax import __version__\nfrom saferl_jax.training import ranker\n")
  assert all(_is_public(line) for line in _imports(good)) and len(_imports(good)) == 4
  assert not any(_is_public(line) for line in _imports(bad)) and len(_imports(bad)) == 4


def test_readme_uses_public_paths_only():
  blocks = _python_blocks()
  imports = [line for block in blocks for line in _imports(block)]
  assert imports, "the README's examples import nothing from saferl_jax"
  assert [line for line in imports if not _is_public(line)] == []
  # Attribute paths such as sj.cltr.simulate_click_log name a function or class, never a module
  # (sj.data.click_logs.simulate_click_log would reach past the facade).
  for block in blocks:
    for package, name in set(re.findall(r"\bsj\.(\w+)\.(\w+)", block)):
      value = getattr(importlib.import_module(f"saferl_jax.{package}"), name)
      assert not isinstance(value, types.ModuleType), f"sj.{package}.{name} is a module"
