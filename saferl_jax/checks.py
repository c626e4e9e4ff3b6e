"""Input checks shared by every public function (floor 1: no Flax, no I/O).

Shape checks run while tracing (shapes are static). Value checks need concrete
arrays, so they run only when an input is not a tracer: inside `jax.jit` the
caller is responsible for its data, outside it bad data raises a `ValueError`
that names the argument and the problem.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def is_concrete(*arrays) -> bool:
  """True when no argument is a JAX tracer, so its values can be inspected."""
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def as_float(name: str, x: ArrayLike) -> jax.Array:
  """Converts to JAX's default float (float32, or float64 in x64 mode)."""
  try:
    return jnp.asarray(x, dtype=jnp.result_type(float))
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name}: cannot be read as a float array ({err})") from err


def as_int(name: str, x: ArrayLike) -> jax.Array:
  """Converts an integer array to JAX's default int; floats are refused.

  Concrete host values (numpy arrays, Python ints) are range-checked before the conversion: an
  int64 value above 2^31 - 1 would otherwise wrap silently to a small (valid-looking) int32.
  """
  target = jnp.result_type(int)
  if not isinstance(x, jax.Array):
    try:
      host = np.asarray(x)
    except (TypeError, ValueError, OverflowError) as err:
      raise ValueError(f"{name}: cannot be read as an integer array ({err})") from err
    if host.dtype == object:
      raise ValueError(f"{name}: cannot be read as an integer array (got Python objects)")
    if np.issubdtype(host.dtype, np.integer) and host.size:
      info = np.iinfo(target)
      low, high = host.min(), host.max()
      if low < info.min or high > info.max:
        raise ValueError(f"{name}: values must fit in {np.dtype(target).name} "
                         f"[{info.min}, {info.max}], found {low if low < info.min else high} "
                         "(it would wrap around)")
    x = host
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name}: must be an integer array, got dtype {x.dtype}")
  return x.astype(target)


def as_index(name: str, x: ArrayLike, size: int, *, what: str = "index") -> jax.Array:
  """An integer index array checked to lie in [0, size) on concrete input.

  JAX's gather clamps out-of-range indices and wraps negative ones, so an index that is not
  checked silently reads the wrong entry; inside `jax.jit` the caller answers for its indices.
  """
  x = as_int(name, x)
  check_indices(name, x, size, what=what)
  return x


def check_key(name: str, key) -> None:
  """Refuses legacy uint32 keys: every public function takes typed keys from `jax.random.key`.

  A raw uint32 [2] array would be split and folded like a typed key but its batch shape would be
  off by one axis, and a typed key carries its implementation (threefry, rbg) with it.
  """
  dtype = getattr(key, "dtype", None)
  if dtype is None or not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    got = dtype if dtype is not None else type(key).__name__
    raise ValueError(f"{name}: expected a typed PRNG key from jax.random.key, got an array of "
                     f"dtype {got}; wrap legacy keys with jax.random.wrap_key_data")


def check_ndim(name: str, x: jax.Array, ndim: int) -> None:
  if x.ndim != ndim:
    shape = "[n]" if ndim == 1 else "[n, A]"
    raise ValueError(
        f"{name}: expected a {ndim}-d array {shape} for one dataset (batch "
        f"datasets with jax.vmap), got shape {tuple(x.shape)}")


def check_same_length(**arrays: jax.Array) -> int:
  """Checks that every array has the same leading length and returns it."""
  lengths = {name: x.shape[0] for name, x in arrays.items()}
  first_name, n = next(iter(lengths.items()))
  for name, length in lengths.items():
    if length != n:
      raise ValueError(
          f"{name}: has {length} rounds but {first_name} has {n}; every "
          "per-round array must have the same length")
  if n == 0:
    raise ValueError(f"{first_name}: is empty; at least one round is needed")
  return n


def _valid(values: np.ndarray, where) -> np.ndarray:
  """The values where the mask is True (all of them without a mask)."""
  if where is None:
    return values
  return values[np.broadcast_to(np.asarray(where, bool), values.shape)]


def check_finite(name: str, x: jax.Array, *, where=None) -> None:
  """No NaN or infinite value (only where `where` is True, when a mask is given)."""
  if is_concrete(x, where):
    values = _valid(np.asarray(x), where)
    if not np.all(np.isfinite(values)):
      bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
      raise ValueError(f"{name}: contains {bad} NaN or infinite value(s)")


def check_probabilities(name: str, x: jax.Array) -> None:
  """Propensities must lie in (0, 1]: a zero propensity breaks importance weighting."""
  if is_concrete(x):
    values = np.asarray(x)
    bad = ~((values > 0) & (values <= 1))
    if np.any(bad):
      first = values[bad].ravel()[0]
      raise ValueError(
          f"{name}: every propensity must be in (0, 1], found {int(bad.sum())} "
          f"outside (e.g. {first})")


def check_distribution_rows(name: str, x: jax.Array) -> None:
  """Each row must be a probability distribution over the last axis."""
  if is_concrete(x):
    values = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
      raise ValueError(f"{name}: probabilities must be finite and >= 0")
    tolerance = 1e-6 if x.dtype == jnp.float64 else 1e-4
    row_sums = values.sum(axis=-1)
    bad = np.abs(row_sums - 1.0) > tolerance
    if np.any(bad):
      row = int(np.argmax(bad))
      raise ValueError(
          f"{name}: rows must sum to 1, row {row} sums to {row_sums.ravel()[row]:.6g} "
          f"({int(bad.sum())} bad rows)")


def check_indices(name: str, indices: jax.Array, size: int, *, what: str = "index") -> None:
  """Indices (actions, items) must lie in [0, size)."""
  if is_concrete(indices):
    values = np.asarray(indices)
    bad = (values < 0) | (values >= size)
    if np.any(bad):
      raise ValueError(
          f"{name}: every {what} must be in [0, {size}), found "
          f"{int(bad.sum())} outside (e.g. {values[bad].ravel()[0]})")


def check_positive_int(name: str, value) -> None:
  """Checks a count that sets a shape or a loop length: a Python (or numpy) int >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}: must be a positive int, got {value!r}")


def check_choice(name: str, value, choices) -> None:
  """Checks a string option against the names it may take."""
  if value not in choices:
    raise ValueError(f"{name}: must be one of {tuple(choices)}, got {value!r}")


def check_level_option(name: str, value) -> None:
  """Checks a miss probability such as delta or alpha: it must lie in (0, 1)."""
  if value is None or not is_concrete(value):
    return
  v = float(np.asarray(value))
  if not 0 < v < 1:
    raise ValueError(f"{name}: must be in (0, 1), got {value}")


def check_nonnegative_option(name: str, value, *, strictly_positive: bool = False) -> None:
  """Checks a scalar hyper-parameter such as a clipping threshold."""
  if value is None or not is_concrete(value):
    return
  v = float(np.asarray(value))
  if np.isnan(v) or v < 0 or (strictly_positive and v == 0):
    need = "> 0" if strictly_positive else ">= 0"
    raise ValueError(f"{name}: must be {need}, got {value}")


def check_nonnegative(name: str, x: jax.Array, *, where=None, upper: float | None = None) -> None:
  """Finite and >= 0 everywhere (where `where` is True): counts, exposures, weights, propensities
  that may be 0. With `upper`, also <= upper."""
  if not is_concrete(x, where):
    return
  check_finite(name, x, where=where)
  values = _valid(np.asarray(x), where)
  bad = values < 0 if upper is None else (values < 0) | (values > upper)
  if np.any(bad):
    span = "in [0, %g]" % upper if upper is not None else ">= 0"
    raise ValueError(f"{name}: every value must be {span}, found {int(bad.sum())} outside "
                     f"(e.g. {values[bad].ravel()[0]})")


def check_log_probs(name: str, x: jax.Array, *, tolerance: float = 1e-4) -> None:
  """Log-probabilities: no NaN, no +inf, none above 0 (beyond rounding); -inf (probability 0) is fine."""
  if not is_concrete(x):
    return
  values = np.asarray(x)
  bad = np.isnan(values) | (values > tolerance)
  if np.any(bad):
    raise ValueError(f"{name}: log-probabilities must be <= 0 and not NaN, found {int(bad.sum())} "
                     f"bad (e.g. {values[bad].ravel()[0]})")


def check_scalar(name: str, value, *, low: float | None = None, high: float | None = None,
                 strict_low: bool = False) -> None:
  """A finite scalar (numbers and 0-d arrays), optionally bounded; checked only when concrete."""
  if value is None or not is_concrete(value):
    return
  if np.ndim(value) != 0:
    raise ValueError(f"{name}: must be a scalar, got shape {np.shape(value)}")
  try:
    v = float(np.asarray(value))
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name}: must be a number, got {value!r}") from err
  if not np.isfinite(v):
    raise ValueError(f"{name}: must be finite, got {value}")
  if low is not None and (v < low or (strict_low and v == low)):
    raise ValueError(f"{name}: must be {'>' if strict_low else '>='} {low:g}, got {value}")
  if high is not None and v > high:
    raise ValueError(f"{name}: must be <= {high:g}, got {value}")
