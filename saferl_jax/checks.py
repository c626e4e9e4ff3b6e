"""Input checks shared by every public function (floor 1: no Flax, no I/O).

Shape checks run while tracing (shapes are static). Value checks need concrete
arrays, so they run only when an input is not a tracer: inside `jax.jit` the
caller is responsible for its data, outside it bad data raises a `ValueError`
that names the argument and the problem.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

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


def _check_distributions(name: str, x: jax.Array, axis: int):
  """(sums over `axis`, where they miss 1) when some miss, else None; raises on a negative or NaN entry."""
  if not is_concrete(x):
    return None
  values = np.asarray(x, dtype=np.float64)
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise ValueError(f"{name}: probabilities must be finite and >= 0")
  tolerance = 1e-6 if x.dtype == jnp.float64 else 1e-4
  sums = values.sum(axis=axis)
  bad = np.abs(sums - 1.0) > tolerance
  return (sums, bad) if np.any(bad) else None


def check_distribution_rows(name: str, x: jax.Array) -> None:
  """Each row must be a probability distribution over the last axis."""
  failed = _check_distributions(name, x, -1)
  if failed is not None:
    row_sums, bad = failed
    row = int(np.argmax(bad))
    raise ValueError(
        f"{name}: rows must sum to 1, row {row} sums to {row_sums.ravel()[row]:.6g} "
        f"({int(bad.sum())} bad rows)")


def check_distribution_slots(name: str, x: jax.Array) -> None:
  """A [n, A, L] array of one distribution over A per round and slot: x[i, :, l] sums to 1."""
  failed = _check_distributions(name, x, 1)
  if failed is not None:
    sums, bad = failed  # [n, L]
    i, slot = np.unravel_index(int(np.argmax(bad)), bad.shape)
    raise ValueError(
        f"{name}: every slot must be a distribution over actions, {name}[{i}, :, {slot}] sums "
        f"to {sums[i, slot]:.6g} ({int(bad.sum())} bad (round, slot) pairs)")


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


# Fused value checks: every value check of one call in one jitted pass and one host transfer.
#
# An eager call used to run each check above on the host (np.asarray per array, one device-to-host
# round trip per check). A public function that takes several arrays lists its checks as
# `ValueCheck`s instead; `value_flags` computes one "bad" flag per check inside the compiled kernel
# (or `check_values` in a jitted pass of its own), `raise_on_flags` brings the flags to the host in
# one transfer and, only when one is set, reruns the host check of that argument, which builds the
# same message as before. The host checks stay the authority on the message (and, for row sums, on
# the rounding at the tolerance): a flag that the host check does not confirm raises nothing.


class ValueCheck(NamedTuple):
  """One value check of one argument.

  Attributes:
    name: the user's argument, as the message names it.
    kind: "finite", "probability" (in (0, 1]), "index" (in [0, size)), "nonnegative" (finite and
      >= 0), "distribution_rows" (finite, >= 0, each row summing to 1) or "distribution_slots"
      (a [n, A, L] array, finite, >= 0, each x[i, :, l] summing to 1).
    size: the bound of an "index" check.
    what: what an index counts ("action", "item"), for the message.
  """
  name: str
  kind: str
  size: int | None = None
  what: str = "index"


def _bad(check: ValueCheck, x: jax.Array) -> jax.Array:
  """A traced scalar bool: True when some value of x fails `check`.

  Built from plain min, max and sum reductions, which XLA's CPU backend vectorises (an
  elementwise `isfinite` mask before a reduction is several times slower). Min and max propagate
  NaN and every comparison with NaN is False, so a NaN anywhere fails every check; an infinite
  value is caught by min or max, and in a distribution by its row sum.
  """
  if x.size == 0:
    return jnp.asarray(False)
  if check.kind in ("distribution_rows", "distribution_slots"):
    # min >= 0 and |sum - 1| <= tol over the actions' axis: also no NaN or inf. Each row's sum
    # and min come from one variadic reduction, one pass over x (a row sum and a separate min
    # read x twice: 4.8 against 3.2 ms for [1e6, 20] float32 on 2 CPU cores).
    tolerance = 1e-6 if x.dtype == jnp.float64 else 1e-4
    axis = x.ndim - 1 if check.kind == "distribution_rows" else 1
    row_sums, row_mins = jax.lax.reduce(
        (x, x), (jnp.zeros((), x.dtype), jnp.full((), jnp.inf, x.dtype)),
        lambda a, b: (a[0] + b[0], jnp.minimum(a[1], b[1])), (axis,))
    worst_row = jnp.max(jnp.abs(row_sums - 1.0))
    return ~((jnp.min(row_mins) >= 0) & (worst_row <= tolerance))
  if check.kind == "index" and check.size <= 2**24:
    # One float max instead of an integer min and max (XLA's CPU integer reductions are several
    # times slower). As unsigned, negative indices are >= 2^31 (2^63); the conversion to float32 is
    # monotone and exact below 2^24, so max < size holds exactly when every index is in range.
    return ~(jnp.max(x.astype(jnp.uint64 if x.dtype.itemsize == 8 else jnp.uint32)
                     .astype(jnp.float32)) < check.size)
  low, high = jnp.min(x), jnp.max(x)
  if check.kind == "finite":
    return ~(jnp.isfinite(low) & jnp.isfinite(high))
  if check.kind == "probability":
    return ~((low > 0) & (high <= 1))
  if check.kind == "index":
    return ~((low >= 0) & (high < check.size))
  if check.kind == "nonnegative":
    return ~((low >= 0) & jnp.isfinite(high))
  raise ValueError(f"kind: must be one of {tuple(_HOST_CHECKS)}, got {check.kind!r}")


def value_flags(specs: tuple[ValueCheck, ...], arrays: tuple) -> jax.Array:
  """[len(specs)] bool, True where a check fails; traceable, so it fuses into a compiled kernel.

  An array that is None (an optional argument left out) passes its check.
  """
  flags = [jnp.asarray(False) if x is None else _bad(spec, x) for spec, x in zip(specs, arrays)]
  return jnp.stack(flags) if flags else jnp.zeros((0,), bool)


def fetch_flags(flags: jax.Array) -> np.ndarray:
  """The one device-to-host transfer of a validated eager call."""
  return np.asarray(flags)


def _host_check(check: ValueCheck, x: jax.Array) -> None:
  """Today's host check of one argument: raises its ValueError with the message users know."""
  if check.kind == "index":
    check_indices(check.name, x, check.size, what=check.what)
  else:
    _HOST_CHECKS[check.kind](check.name, x)


_HOST_CHECKS = {"finite": check_finite, "probability": check_probabilities, "index": check_indices,
                "nonnegative": check_nonnegative, "distribution_rows": check_distribution_rows,
                "distribution_slots": check_distribution_slots}


def raise_on_flags(specs: tuple[ValueCheck, ...], flags: jax.Array, arrays: tuple) -> None:
  """Raises the ValueError of the first failed check, in the order of `specs`.

  One host transfer (`fetch_flags`) when every check passes; the message of a failure is built
  by that argument's host check, so it names the argument and reads as it always has.
  """
  host = fetch_flags(flags)
  if not host.any():
    return
  for spec, bad, x in zip(specs, host, arrays):
    if bad and x is not None:
      _host_check(spec, x)


def host_checks(specs: tuple[ValueCheck, ...], arrays: tuple) -> None:
  """The checks one by one on the host, each skipped where its array is a tracer (under jit,
  vmap or grad only the concrete arrays can be inspected)."""
  for spec, x in zip(specs, arrays):
    if x is not None:
      _host_check(spec, x)


class ArrayMemo:
  """Values derived from concrete jax.Arrays, kept for as long as those arrays live.

  A jax.Array is immutable, so what was derived from it once (a check it passed, the importance
  weights of a log) holds until it is collected. Entries are keyed by the arrays' identity and a
  tag, and dropped by a weakref callback when one of the arrays is collected, so an id is never
  reused stale. Only concrete jax.Arrays are kept: a numpy input is converted afresh by every call
  and a tracer has no lasting identity.
  """

  def __init__(self):
    self._entries: dict[tuple, tuple[tuple[weakref.ref, ...], object]] = {}

  def __len__(self) -> int:
    return len(self._entries)

  def get(self, arrays: tuple, tag=None):
    """The value kept for these very arrays (and tag), or None."""
    entry = self._entries.get((tuple(map(id, arrays)), tag))
    if entry is None or not all(ref() is x for ref, x in zip(entry[0], arrays)):
      return None
    return entry[1]

  def put(self, arrays: tuple, value, tag=None) -> None:
    """Keeps value for these arrays (and tag); nothing unless every one is a concrete jax.Array."""
    if not all(isinstance(x, jax.Array) and is_concrete(x) for x in arrays):
      return
    key = (tuple(map(id, arrays)), tag)
    def forget(ref, key=key):
      entry = self._entries.get(key)
      if entry is not None and any(r is ref for r in entry[0]):
        del self._entries[key]
    self._entries[key] = (tuple(weakref.ref(x, forget) for x in arrays), value)


# Arrays that already passed a check (tagged by the check): a second estimator on the same arrays
# skips their pass.
_PASSED = ArrayMemo()


def pending(specs: tuple[ValueCheck, ...], arrays: tuple) -> tuple[bool, ...]:
  """Which checks still need a pass: not those of an absent (None) array, nor those a concrete
  jax.Array has already passed (numpy inputs are converted afresh by each call, so never skip)."""
  return tuple(x is not None and _PASSED.get((x,), spec) is None for spec, x in zip(specs, arrays))


def remember_passed(specs: tuple[ValueCheck, ...], arrays: tuple, mask: tuple[bool, ...]) -> None:
  """Records that the arrays selected by `mask` passed their checks (see `pending`)."""
  for spec, x, selected in zip(specs, arrays, mask):
    if selected:
      _PASSED.put((x,), True, spec)


def only_pending(arrays: tuple, mask: tuple[bool, ...]) -> tuple:
  """The arrays whose checks are pending, None in place of the others (their flags stay False)."""
  return tuple(x if selected else None for x, selected in zip(arrays, mask))


_value_flags_jit = jax.jit(value_flags, static_argnums=0)


def check_values(specs: tuple[ValueCheck, ...], *arrays) -> None:
  """Runs every check of `specs` on the matching array of `arrays` in one jitted pass.

  Concrete arrays: one compiled reduction, one host transfer, a ValueError naming the first bad
  argument (none at all for jax.Arrays that already passed the same check). If some array is a
  tracer, the concrete ones are checked on the host, as before.

  Example:
    >>> check_values((ValueCheck("weights", "nonnegative"),), jnp.array([0.5, 2.0]))
    >>> check_values((ValueCheck("weights", "nonnegative"),), jnp.array([-1.0]))
    Traceback (most recent call last):
    ...
    ValueError: weights: every value must be >= 0, found 1 outside (e.g. -1.0)
  """
  if not is_concrete(*arrays):
    host_checks(specs, arrays)
    return
  mask = pending(specs, arrays)
  if not any(mask):
    return
  flags = _value_flags_jit(specs, only_pending(arrays, mask))
  if not is_concrete(flags):  # concrete data captured by an outer jax.jit
    host_checks(specs, arrays)
    return
  raise_on_flags(specs, flags, arrays)
  remember_passed(specs, arrays, mask)


def check_count(name: str, value, *, low: int = 1) -> int:
  """A count option (it sets a shape or a loop length): an int >= low, never a bool or a float."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    if isinstance(value, (float, np.floating)):
      raise ValueError(f"{name}: must be a whole number >= {low}, got {value!r}")
    raise TypeError(f"{name}: must be an int, got {type(value).__name__} {value!r}")
  if value < low:
    raise ValueError(f"{name}: must be >= {low}, got {value}")
  return int(value)


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
                open_low: bool = False, open_high: bool = False, finite: bool = True):
  """A real scalar option: TypeError for a bool or a non-number, ValueError for NaN (and inf when
  `finite`) or a value outside [low, high] (open ends with open_low / open_high). A traced value
  is the caller's to check."""
  if isinstance(value, jax.core.Tracer):
    return value
  if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
    raise TypeError(f"{name}: must be a real number, got {type(value).__name__} {value!r}")
  try:
    array = np.asarray(value)
  except Exception as err:  # noqa: BLE001 (any object numpy cannot read)
    raise TypeError(f"{name}: must be a real number, got {type(value).__name__}") from err
  if array.dtype.kind not in "iuf":
    raise TypeError(f"{name}: must be a real number, got {type(value).__name__} {value!r}")
  if array.ndim != 0:
    raise ValueError(f"{name}: must be a scalar, got shape {array.shape}")
  v = float(array)
  if np.isnan(v) or (finite and not np.isfinite(v)):
    raise ValueError(f"{name}: must be {'finite' if finite else 'a number, not NaN'}, got {value}")
  if low is not None and (v < low or (open_low and v == low)):
    raise ValueError(f"{name}: must be {'>' if open_low else '>='} {low:g}, got {value}")
  if high is not None and (v > high or (open_high and v == high)):
    raise ValueError(f"{name}: must be {'<' if open_high else '<='} {high:g}, got {value}")
  return value
