"""The API reference builds with pdoc, without a single warning."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

# NamedTuples in saferl_jax/training/ whose modules use `from __future__ import annotations`: pdoc
# evaluates a NamedTuple's field annotations outside its module, so `Any`, `Callable` and
# `np.ndarray` do not resolve. training/ is being rewritten (issue 10); once its NamedTuple
# modules drop the __future__ import (as data/obd.py does), delete this set.
PENDING = {"TrainResult", "TrainState", "PretrainResult", "TrainedClassifier", "FinetuneState", "Saved"}


@pytest.mark.slow
def test_pdoc_builds_the_reference_without_warnings(tmp_path):
  run = subprocess.run([sys.executable, "-m", "pdoc", "-o", str(tmp_path), "saferl_jax"],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
  assert run.returncode == 0, run.stderr
  # pdoc prints each warning on stderr, one line each ("Warn: ...", "DeprecationWarning: ...").
  pending = re.compile(r"for saferl_jax\.[\w.]*\.(%s)\.__init__\." % "|".join(PENDING))
  assert [w for w in run.stderr.splitlines() if w.strip() and not pending.search(w)] == []
  for page in ("index.html", "saferl_jax.html", "saferl_jax/ope.html", "saferl_jax/diffusion.html"):
    assert (tmp_path / page).stat().st_size > 0, page
