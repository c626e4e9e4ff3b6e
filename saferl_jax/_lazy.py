"""Lazy re-exports for package facades (used by every `__init__`; no floor of its own).

A domain package (`opl`, `cltr`, `ranking`, `diffusion`) holds floor-1 maths, but its users also
want the domain's models and training loops under the same name (`sj.diffusion.finetune`). The
package's `__init__` imports its floor-1 modules eagerly and names the rest in a table that
`lazy_exports` resolves on first attribute access, so importing a floor-1 module never loads
Flax or optax, and `import saferl_jax` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, table: dict[str, str],
                 eager: list[str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
  """(__getattr__, __dir__) for a package whose names in `table` live in other modules.

  Args:
    package: the package's `__name__`.
    table: {exported name: module that defines it}; a submodule of the package itself
      (`"opl": "saferl_jax.opl"` in `saferl_jax`) is exported as the module.
    eager: the names the package already defines (for `dir`).
  """
  def __getattr__(name: str):
    module_name = table.get(name)
    if module_name is None:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"{package}.{name}" else getattr(module, name)
    # Cached in the package, so later lookups (and pdoc, which reads `__dict__`) find it.
    setattr(sys.modules[package], name, value)
    return value

  def __dir__() -> list[str]:
    return sorted(set(eager) | set(table))

  return __getattr__, __dir__
