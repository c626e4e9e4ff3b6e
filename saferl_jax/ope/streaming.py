"""Bandit estimators over a log delivered in chunks, or sharded over devices (floor 1).

Every estimator of `estimators.py` except the cross-fitted beta* is a function of a few running
moments of per-round terms: the linear ones (IPS, DM, DR, Switch-DR, DRos, the SubGaussian
ones, beta-IPS with a fixed beta) of the mean and variance of their per-round contribution; the
self-normalised ones (SNIPS, SNDR) and the plug-in beta*-IPS of the means and co-moments of
w r, w (r - qhat), dm and w. `stream_estimators(...)` returns an optax-style triple: `init()` gives a
`StreamState` (counts, means [k], centred co-moments [k, k], per-column min and max), `update`
folds one chunk into it by Chan, Golub and LeVeque's pairwise update, `finalize` turns it into
`Estimate`s (per_sample None: no per-round array is kept), intervals and weight diagnostics.
Memory is that of one chunk, whatever the length of the log.

The same update takes a `where` mask (True = a real round), so a log padded to a multiple of
the device count and sharded along its rounds (`saferl_jax.parallel.shard_rounds`) is folded in
one call: under jit the sums over its rounds become reductions across devices, and across
processes on a multi-process mesh.

Agreement with the in-memory estimators is to float rounding (the tests check 1e-5 relative in
float32): the chunk moments are two-pass (centred in the chunk), the merge is the pairwise
update. The co-moments hold squares of the per-round terms: a propensity below about 1e-19 gives
weights whose squares overflow float32, and `finalize` then reports the estimate's stderr as
inf (`estimate_streaming` raises); use jax.enable_x64 for such logs.

References:
  Chan, Golub, LeVeque. Updating Formulae and a Pairwise Algorithm for Computing Sample
  Variances. COMPSTAT 1982.
  Swaminathan, Joachims. The Self-Normalized Estimator for Counterfactual Learning. NeurIPS 2015.
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. Optimal Baseline Corrections for Off-Policy
  Contextual Bandits. RecSys 2024. https://arxiv.org/abs/2405.05736
"""

import functools
from typing import Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saferl_jax import checks
from saferl_jax.parallel import pad_rows
from saferl_jax.ope import estimators as estimators_lib
from saferl_jax.ope import rounds as rounds_lib
from saferl_jax.ope.estimators import Estimate
from saferl_jax.ope.rounds import LoggedRounds, WeightDiagnostics
from saferl_jax.stats import bounds as bounds_lib
from saferl_jax.stats.bounds import Interval

CHUNK_KEYS = ("rewards", "actions", "logging_probs", "target_dist", "reward_hat", "positions")
_REQUIRED_KEYS = CHUNK_KEYS[:4]
# Estimators whose value is not a mean of per-round contributions: their columns are the
# terms of a ratio or a regression, finalised from means and co-moments.
_RATIO_COLUMNS = {"snips": ("rw", "w"), "sndr": ("dm", "wres", "w"), "beta_ips": ("rw", "w")}
DEFAULT_ESTIMATORS = ("ips", "snips", "beta_ips")


class StreamState(NamedTuple):
  """Running moments of the per-round columns of a streamed log (k columns).

  Attributes:
    num_rounds: int scalar, the rounds folded in so far.
    means: [k] the columns' means.
    comoments: [k, k] sum_i (c_i - mean)(c_i - mean)^T, the centred co-moments.
    minimum: [k] each column's smallest value (+inf before any round).
    maximum: [k] each column's largest value (-inf before any round).
  """
  num_rounds: jax.Array
  means: jax.Array
  comoments: jax.Array
  minimum: jax.Array
  maximum: jax.Array


class StreamedEstimates(NamedTuple):
  """What `finalize` reports about a streamed log.

  Attributes:
    estimates: estimator name -> `Estimate` (value, per_sample None, stderr).
    intervals: estimator name -> {method: two-sided `Interval`} for the requested bounds.
    weight_diagnostics: the importance weights' `WeightDiagnostics` (ESS, max, mean).
    num_rounds: int scalar, the rounds in the log.
  """
  estimates: dict
  intervals: dict
  weight_diagnostics: WeightDiagnostics
  num_rounds: jax.Array


class StreamingEstimator(NamedTuple):
  """An optax-style triple: state = init(); state = update(state, chunk, where=None); finalize(state)."""
  init: Callable
  update: Callable
  finalize: Callable


class _Spec(NamedTuple):
  """The static description of a streaming computation (hashable: a jit static argument)."""
  columns: tuple  # column names, in order
  requests: tuple  # (estimator name, static options) for every linear estimator's column
  estimators: tuple
  bounds: tuple
  truncate: bool


def _linear(name: str, options: dict) -> bool:
  if name == "beta_ips":
    return options.get("baseline") is not None and not isinstance(options.get("baseline"), str)
  return name not in _RATIO_COLUMNS


def _spec(estimators, options, bounds, max_value, truncate) -> tuple[_Spec, dict]:
  estimators = tuple(estimators)
  if not estimators:
    raise ValueError(f"estimators: none requested; choose from {sorted(estimators_lib.FROM_ROUNDS)}")
  estimators_lib.check_requests(estimators, options)
  bounds = tuple(bounds)
  for method in bounds:
    checks.check_choice("bounds", method, bounds_lib.METHODS)
  if {"hoeffding", "bernstein"} & set(bounds):
    if max_value is None:
      raise ValueError("max_value: the hoeffding and bernstein bounds need per-round "
                       "contributions in [0, max_value]; pass max_value")
    checks.check_nonnegative_option("max_value", max_value, strictly_positive=True)
  columns, requests, dynamic = ["w"], [], {}
  for name in estimators:
    opts = dict(options.get(name, {}))
    if name == "beta_ips" and isinstance(opts.get("baseline"), str) and opts["baseline"] == "cross_fit":
      raise ValueError("options: beta_ips with baseline='cross_fit' needs the whole log (it fits "
                       "beta* on other folds); stream baseline=None (plug-in) or a number")
    estimators_lib._check_options(name, opts)
    if _linear(name, opts):
      static, dynamic[name] = estimators_lib._split_options(name, opts)
      requests.append((name, static))
      columns.append(name)
      if truncate and {"hoeffding", "bernstein"} & set(bounds):
        columns.append("bounded:" + name)  # the truncated contributions (else their own column)
    else:
      columns += [c for c in _RATIO_COLUMNS[name] if c not in columns]
  return _Spec(tuple(columns), tuple(requests), estimators, bounds, bool(truncate)), dynamic


def _columns(rounds: LoggedRounds, spec: _Spec, dynamic: dict, max_value) -> jax.Array:
  """[n, k]: every column of `spec` per round."""
  residuals = rounds.rewards - rounds.reward_hat_logged
  values = {"w": rounds.weights, "rw": rounds.weights * rounds.rewards, "dm": rounds.dm,
            "wres": rounds.weights * residuals}
  for name, static in spec.requests:
    values[name] = estimators_lib.FROM_ROUNDS[name](rounds, **dict(static), **dynamic[name]).per_sample
    if "bounded:" + name in spec.columns:
      values["bounded:" + name] = jnp.clip(values[name], 0.0, max_value)
  return jnp.stack([values[c] for c in spec.columns], axis=1)


def _moments(columns: jax.Array, where: jax.Array | None) -> StreamState:
  """The moments of one chunk's rows (those where `where`), two-pass: centred in the chunk."""
  if where is None:
    where = jnp.ones(columns.shape[:1], bool)
  count = jnp.sum(where, dtype=jnp.int32)
  weight = where[:, None].astype(columns.dtype)
  safe_count = jnp.maximum(count, 1).astype(columns.dtype)
  means = jnp.sum(columns * weight, axis=0) / safe_count
  centred = (columns - means) * weight
  comoments = centred.T @ centred
  minimum = jnp.min(jnp.where(where[:, None], columns, jnp.inf), axis=0)
  maximum = jnp.max(jnp.where(where[:, None], columns, -jnp.inf), axis=0)
  return StreamState(count, means, comoments, minimum, maximum)


def merge(a: StreamState, b: StreamState) -> StreamState:
  """The moments of two disjoint sets of rounds together (Chan, Golub, LeVeque).

  mean = mean_a + (mean_b - mean_a) n_b / n and
  M = M_a + M_b + (mean_b - mean_a)(mean_b - mean_a)^T n_a n_b / n, n = n_a + n_b.

  Example:
    >>> import jax.numpy as jnp
    >>> a = StreamState(jnp.int32(2), jnp.array([1.]), jnp.array([[2.]]), jnp.array([0.]),
    ...                 jnp.array([2.]))  # the rounds 0 and 2
    >>> b = StreamState(jnp.int32(1), jnp.array([4.]), jnp.array([[0.]]), jnp.array([4.]),
    ...                 jnp.array([4.]))  # the round 4
    >>> both = merge(a, b)
    >>> float(both.means[0]), float(both.comoments[0, 0])  # mean 2, sum of squares 4 + 0 + 4
    (2.0, 8.0)
  """
  count = a.num_rounds + b.num_rounds
  dtype = a.means.dtype
  fraction_b = jnp.where(count > 0, b.num_rounds.astype(dtype) / jnp.maximum(count, 1).astype(dtype), 0.0)
  delta = b.means - a.means
  means = a.means + delta * fraction_b
  cross = jnp.outer(delta, delta) * (a.num_rounds.astype(dtype) * fraction_b)
  return StreamState(count, means, a.comoments + b.comoments + cross,
                     jnp.minimum(a.minimum, b.minimum), jnp.maximum(a.maximum, b.maximum))


@functools.partial(jax.jit, static_argnames=("spec", "check"))
def _update_kernel(inputs: tuple, state: StreamState, where, dynamic: dict, max_value, *,
                   spec: _Spec, check: tuple[bool, ...] | None):
  rounds = rounds_lib.reduce_inputs(*inputs)
  new = merge(state, _moments(_columns(rounds, spec, dynamic, max_value), where))
  return (None if check is None else rounds_lib.input_flags(inputs, check, rounds)), new


def _chunk_inputs(chunk: Mapping) -> tuple:
  if not isinstance(chunk, Mapping):
    raise TypeError(f"chunk: must be a dict of per-round arrays with keys {_REQUIRED_KEYS} "
                    f"(and reward_hat, positions where needed), got {type(chunk).__name__}")
  unknown = set(chunk) - set(CHUNK_KEYS)
  missing = set(_REQUIRED_KEYS) - set(chunk)
  if unknown or missing:
    raise ValueError(f"chunk: keys must be {CHUNK_KEYS[:4]} plus optional reward_hat and "
                     f"positions; unknown {sorted(unknown)}, missing {sorted(missing)}")
  return rounds_lib.prepare_inputs(*(chunk.get(key) for key in CHUNK_KEYS))


def _bounded_column(spec: _Spec, name: str) -> str:
  """The column whose moments the hoeffding and bernstein bounds of linear estimator `name` use."""
  return "bounded:" + name if spec.truncate else name


def _finalize(state: StreamState, spec: _Spec, delta: float, max_value) -> StreamedEstimates:
  index = {name: i for i, name in enumerate(spec.columns)}
  count = state.num_rounds
  n = count.astype(state.means.dtype)
  enough = count >= 2
  mean, co = state.means, state.comoments

  def std_from(square_sum):  # the sample std (ddof=1) from a sum of squared deviations
    return jnp.sqrt(jnp.maximum(square_sum, 0.0) / jnp.maximum(n - 1, 1.0))

  w, m_w = index["w"], mean[index["w"]]
  nonzero = m_w != 0
  safe_m_w = jnp.where(nonzero, m_w, 1.0)
  estimates, intervals = {}, {}
  for name in spec.estimators:
    if name in index:  # linear: the mean of its contributions
      c = index[name]
      value, square_sum = mean[c], co[c, c]
    elif name == "snips":
      rw = index["rw"]
      value = jnp.where(nonzero, mean[rw] / safe_m_w, 0.0)
      square_sum = (co[rw, rw] - 2 * value * co[rw, w] + value**2 * co[w, w]) / safe_m_w**2
    elif name == "sndr":
      d, r = index["dm"], index["wres"]
      ratio = jnp.where(nonzero, mean[r] / safe_m_w, 0.0)
      value = mean[d] + ratio
      # influence_i = (dm_i - mean dm) + (wres_i - ratio w_i) / mean w
      residual_square = co[r, r] - 2 * ratio * co[r, w] + ratio**2 * co[w, w]
      square_sum = co[d, d] + 2 * (co[d, r] - ratio * co[d, w]) / safe_m_w + residual_square / safe_m_w**2
    else:  # beta_ips with the plug-in beta* = Cov(r w, w) / Var(w)
      rw = index["rw"]
      varies = co[w, w] > 0
      beta = jnp.where(varies, co[rw, w] / jnp.where(varies, co[w, w], 1.0), 0.0)
      value = mean[rw] - beta * (m_w - 1.0)
      square_sum = co[rw, rw] - 2 * beta * co[rw, w] + beta**2 * co[w, w]
    if name in ("snips", "sndr"):  # the delta method: sqrt(sum influence^2) / n
      stderr = jnp.sqrt(jnp.maximum(square_sum, 0.0)) / n
    else:  # std / sqrt(n)
      stderr = std_from(square_sum) / jnp.sqrt(n)
    stderr = jnp.where(enough, stderr, jnp.inf)
    estimates[name] = Estimate(value, None, stderr)
    intervals[name] = {}
    for method in spec.bounds:
      if method in ("normal", "t"):
        half = bounds_lib.half_width(stderr * jnp.sqrt(n), count, delta / 2, method, max_value)
        intervals[name][method] = Interval(value - half, value + half)
      elif name in index:
        b = index[_bounded_column(spec, name)]
        half = bounds_lib.half_width(std_from(co[b, b]), count, delta / 2, method, max_value)
        intervals[name][method] = Interval(mean[b] - half, mean[b] + half)
  square_sum_w = co[w, w] + n * m_w**2
  ess = jnp.where(square_sum_w > 0, (n * m_w) ** 2 / jnp.where(square_sum_w > 0, square_sum_w, 1.0), 0.0)
  diagnostics = WeightDiagnostics(ess, state.maximum[w], m_w)
  return StreamedEstimates(estimates, intervals, diagnostics, count)


def stream_estimators(
    estimators: Iterable[str] = DEFAULT_ESTIMATORS, *, options: Mapping[str, dict] | None = None,
    bounds: Iterable[str] = (), delta: float = 0.05, max_value: float | None = None,
    truncate: bool = False,
) -> StreamingEstimator:
  """Estimators folded over a log chunk by chunk: an optax-style (init, update, finalize) triple.

  value and stderr equal the in-memory estimator's on the concatenated log (to float rounding):
  linear estimators from the mean and variance of their contributions; SNIPS = mean(w r) /
  mean(w), SNDR = mean(dm) + mean(w (r - qhat)) / mean(w), with delta-method stderrs; beta*-IPS
  = mean(w r) - beta* (mean(w) - 1), beta* = Cov(w r, w) / Var(w).

  Args:
    estimators: names from `ope.FROM_ROUNDS`; every one but beta_ips with baseline="cross_fit".
    options: keyword options per estimator, as in `estimate_all` ({"switch_dr": {"tau": 50.}}).
    bounds: interval methods ("normal", "t", "hoeffding", "bernstein"); normal and t around every
      estimate, hoeffding and bernstein on the linear estimators' contributions, which must lie
      in [0, max_value] (finalize raises otherwise) unless `truncate`.
    delta: the intervals' total miss probability (two-sided, delta / 2 per side).
    max_value: the contributions' upper end, for hoeffding and bernstein.
    truncate: truncate the contributions to [0, max_value] for hoeffding and bernstein (keeps a
      lower bound valid, as `stats.lower_bound(truncate=True)`).

  Returns:
    A `StreamingEstimator`: `init()` -> `StreamState`; `update(state, chunk, *, where=None)`
    folds in a chunk, a dict of per-round arrays (rewards [m], actions [m], logging_probs [m],
    target_dist [m, A], and reward_hat [m, A], positions [m] where needed; m may vary), checking
    it like the in-memory estimators, with `where` [m] bool marking the real rounds of a padded
    chunk (masked rounds must still hold valid values); `finalize(state)` -> `StreamedEstimates`.

  Example:
    >>> import jax.numpy as jnp
    >>> stream = stream_estimators(("ips", "snips"))
    >>> state = stream.init()
    >>> for rewards in (jnp.array([1., 0.]), jnp.array([1., 1.])):
    ...   state = stream.update(state, dict(rewards=rewards, actions=jnp.array([0, 1]),
    ...                                     logging_probs=jnp.full(2, 0.5),
    ...                                     target_dist=jnp.tile(jnp.array([0.8, 0.2]), (2, 1))))
    >>> round(float(stream.finalize(state).estimates["ips"].value), 4)  # as ips on all 4 rounds
    0.9
  """
  options = dict(options or {})
  spec, dynamic = _spec(estimators, options, bounds, max_value, truncate)
  checks.check_level_option("delta", delta)
  bound = None if max_value is None else float(max_value)

  def init() -> StreamState:
    k = len(spec.columns)
    dtype = jnp.result_type(float)
    return StreamState(jnp.int32(0), jnp.zeros((k,), dtype), jnp.zeros((k, k), dtype),
                       jnp.full((k,), jnp.inf, dtype), jnp.full((k,), -jnp.inf, dtype))

  def update(state: StreamState, chunk: Mapping, *, where=None) -> StreamState:
    inputs = _chunk_inputs(chunk)
    if where is not None:
      where = jnp.asarray(where)
      if where.dtype != bool or where.shape != inputs[0].shape:
        raise ValueError(f"where: must be a bool array of the chunk's shape {inputs[0].shape}, "
                         f"got {where.dtype} {where.shape}")
    return rounds_lib.run_validated(_update_kernel, inputs, state, where, dynamic, bound, spec=spec)

  def finalize(state: StreamState) -> StreamedEstimates:
    if checks.is_concrete(state.maximum) and not spec.truncate and int(state.num_rounds) > 0:
      _check_bounded(state, spec, bound)
    return _finalize(state, spec, delta, bound)

  return StreamingEstimator(init, update, finalize)


def _check_bounded(state: StreamState, spec: _Spec, max_value) -> None:
  """The linear estimators' contributions lie in [0, max_value] where hoeffding or bernstein
  bounds them (their running min and max)."""
  if not {"hoeffding", "bernstein"} & set(spec.bounds):
    return
  for name, _ in spec.requests:
    i = spec.columns.index(name)
    low, high = float(state.minimum[i]), float(state.maximum[i])
    if low < 0 or high > max_value:
      raise ValueError(f"max_value: {name}'s per-round contributions span [{low:.6g}, {high:.6g}], "
                       f"outside [0, max_value={max_value}] for the {'/'.join(spec.bounds)} "
                       "bound; pass truncate=True to truncate them")


def estimate_streaming(
    chunks: Iterable[Mapping], *, estimators: Iterable[str] = DEFAULT_ESTIMATORS,
    options: Mapping[str, dict] | None = None,
) -> dict[str, Estimate]:
  """Estimators over a log delivered as an iterable of chunks, in memory independent of its length.

  Each chunk is a dict of per-round arrays (see `stream_estimators`); every chunk is checked like the
  in-memory estimators' inputs. Chunks shorter than the first are padded (masked) to its length,
  so a last, short chunk does not compile the update again.

  Args:
    chunks: an iterable of dicts with rewards, actions, logging_probs, target_dist (and
      reward_hat, positions where needed).
    estimators: names from `ope.FROM_ROUNDS`, as in `stream_estimators`.
    options: keyword options per estimator, as in `estimate_all`.

  Returns:
    estimator name -> `Estimate` with value and stderr (per_sample None).

  Raises:
    ValueError: on no rounds at all, bad chunks (naming the key and problem), or a stderr that
      overflowed (squares of weights beyond float range: use jax.enable_x64).

  Example:
    >>> import jax.numpy as jnp
    >>> chunk = dict(rewards=jnp.array([1., 0.]), actions=jnp.array([0, 1]),
    ...              logging_probs=jnp.full(2, 0.5),
    ...              target_dist=jnp.tile(jnp.array([0.8, 0.2]), (2, 1)))
    >>> out = estimate_streaming([chunk, chunk], estimators=("ips", "snips"))
    >>> round(float(out["ips"].value), 4), round(float(out["snips"].value), 4)
    (0.8, 0.8)
  """
  stream = stream_estimators(estimators, options=options)
  state, size = stream.init(), None
  for chunk in chunks:
    length = _chunk_length(chunk)
    size = length if size is None else size
    if 0 < length < size:
      chunk, where = pad_rows(chunk, size), jnp.arange(size) < length
      state = stream.update(state, chunk, where=where)
    elif length:
      state = stream.update(state, chunk)
  if int(state.num_rounds) == 0:
    raise ValueError("chunks: no rounds were delivered")
  out = stream.finalize(state).estimates
  for name, estimate in out.items():
    if not np.isfinite(float(estimate.value)) or (int(state.num_rounds) >= 2
                                                  and not np.isfinite(float(estimate.stderr))):
      raise ValueError(f"chunks: {name}'s value or stderr overflowed float range (weights "
                       "near 1e19 or more); enable jax_enable_x64 for such logs")
  return out


def _chunk_length(chunk) -> int:
  if isinstance(chunk, Mapping) and "rewards" in chunk:
    return int(np.shape(chunk["rewards"])[0]) if np.ndim(chunk["rewards"]) else 0
  _chunk_inputs(chunk)  # raises the error that names what is wrong
  return 0
