"""The floors hold: imports only go down, and floor 1 loads no Flax, optax, plotting or progress bars.

Floor of a module, by its path (the README's layout section says why):
  1: ope, stats, ranking, cltr, diffusion, opl, policy_gradient, parallel, distributed, checks, fast_random
  2: models, data
  3: training, experiments, cli
Package `__init__`s are facades: they import their own floor eagerly and re-export the floors
above only through `_lazy.lazy_exports` (a table of names, not an import), which is checked too.
"""

import ast
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import saferl_jax

PACKAGE = Path(saferl_jax.__file__).parent
FLOORS = {"models": 2, "data": 2, "training": 3, "experiments": 3, "cli": 3}
HEAVY = ("flax", "optax", "matplotlib", "tqdm", "orbax")


def floor(module: str) -> int:
  """The floor of saferl_jax.<top>...; private helpers (_lazy) and the package root count as 1."""
  parts = module.split(".")
  return FLOORS.get(parts[1], 1) if len(parts) > 1 else 1


def all_modules() -> list[str]:
  return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "saferl_jax."))


def imported_modules(path: Path) -> list[tuple[int, str]]:
  """(line, module) for every saferl_jax import statement in a file, at any depth."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.append((node.lineno, node.module))
      # `from saferl_jax import opl` imports the subpackage opl.
      if node.module == "saferl_jax":
        found += [(node.lineno, f"saferl_jax.{alias.name}") for alias in node.names]
  return [(line, name) for line, name in found if name.startswith("saferl_jax")]


def source_of(module: str) -> Path:
  spec = importlib.util.find_spec(module)
  return Path(spec.origin)


FLOOR_ONE = [m for m in all_modules() if floor(m) == 1]


def test_the_layout_has_three_floors():
  floors = {floor(m) for m in all_modules()}
  assert floors == {1, 2, 3}
  for name in ("saferl_jax.ope.estimators", "saferl_jax.diffusion.sampler", "saferl_jax.cltr.learning"):
    assert floor(name) == 1
  assert floor("saferl_jax.models.denoisers") == 2 and floor("saferl_jax.training.driver") == 3


@pytest.mark.parametrize("module", all_modules())
def test_imports_only_go_down(module):
  upward = [f"line {line}: {name} (floor {floor(name)})"
            for line, name in imported_modules(source_of(module)) if floor(name) > floor(module)]
  assert not upward, f"{module} (floor {floor(module)}) imports upward: {upward}"


@pytest.mark.parametrize("module", [m for m in all_modules() if m.count(".") == 1 or
                                    source_of(m).name == "__init__.py"])
def test_lazy_tables_point_to_modules_that_exist_and_name_real_attributes(module):
  package = importlib.import_module(module)
  for name in getattr(package, "_LAZY", {}):
    assert getattr(package, name) is not None
  for name in getattr(package, "__all__", []):
    assert hasattr(package, name), f"{module}.__all__ names {name!r}, which it does not have"


@pytest.mark.slow
def test_floor_one_loads_no_flax_optax_plotting_or_progress():
  """Every floor-1 module, imported together in a fresh interpreter, loads none of HEAVY."""
  script = (f"import importlib, json, sys\nfor m in {FLOOR_ONE!r}: importlib.import_module(m)\n"
            f"print(json.dumps([h for h in {HEAVY!r} if h in sys.modules]))")
  loaded = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                     text=True).stdout.strip().splitlines()[-1])
  assert loaded == [], f"floor 1 loaded {loaded}"


@pytest.mark.slow
def test_import_saferl_jax_loads_nothing_heavy():
  script = ("import json, sys, saferl_jax as sj\nsj.ope; sj.ranking; sj.diffusion; sj.cltr; sj.opl\n"
            f"print(json.dumps([h for h in {HEAVY + ('jax',)!r} if h in sys.modules]))")
  out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
  # jax itself is floor 1's one dependency; nothing above it is loaded by the facades.
  assert json.loads(out.stdout.strip().splitlines()[-1]) == ["jax"]


def test_the_facades_reach_every_floor():
  import saferl_jax as sj
  assert sj.diffusion.finetune is sj.training.finetune
  assert sj.opl.train is sj.training.train_policy
  assert sj.cltr.train_ranker is sj.training.train_ranker
  assert sj.ranking.LinearRanker is sj.models.LinearRanker
  assert sj.cltr.simulate_click_log is sj.data.simulate_click_log
