"""The API reference builds with pdoc, without a single warning."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_pdoc_builds_the_reference_without_warnings(tmp_path):
  run = subprocess.run([sys.executable, "-m", "pdoc", "-o", str(tmp_path), "saferl_jax"],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
  assert run.returncode == 0, run.stderr
  # pdoc prints each warning on stderr, one line each ("Warn: ...", "DeprecationWarning: ...").
  assert [w for w in run.stderr.splitlines() if w.strip()] == []
  for page in ("index.html", "saferl_jax.html", "saferl_jax/ope.html", "saferl_jax/diffusion.html"):
    assert (tmp_path / page).stat().st_size > 0, page
