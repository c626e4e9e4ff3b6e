"""Every notebook in notebooks/ runs from top to bottom (in its quick mode)."""

import runpy
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.slow
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("SAFERL_JAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("SAFERL_JAX_QUIET", "1")
  runpy.run_path(str(path), run_name="__main__")
