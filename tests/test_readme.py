"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
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
