"""Click models for counterfactual learning to rank, and click simulation (floor 1).

The models here are affine (the estimators' assumption); `click_chains` holds the cascade, DCM
and DBN users who scan down the list and stop, which `simulate_sessions` also accepts.

An affine click model is affine in the relevance probability R_d = y_d / 4 of the
document shown at (0-based) rank k of the displayed top K:

  P(click | d at rank k) = alpha_k R_d + beta_k,

the position-based model (PBM) being beta = 0 and trust bias beta > 0. An
adversarial user flips the click probability p to 1 - p with probability eps:
P(click) = (1 - eps) p + eps (1 - p). A `ClickModel` holds alpha [K], beta [K]
and eps; the simulator clicks with that probability, and an estimator is told
alpha and beta (possibly wrong ones, `misspecified`, to test robustness).

`click_probabilities` and `simulate_clicks` take the relevance of one displayed
list, [K], or any leading batch, [..., K]; they are jittable and vmappable.
`simulate_sessions` turns N logged sessions (a query id and a displayed ranking
each) into clicks [N, K] in one jitted call whose session axis is sharded over
all devices; the clicks of a session depend only on the key and the session's
index, not on how many devices there are.

References:
  [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with
  Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
  [PRPO] Gupta, Oosterhuis, de Rijke. Practical and Robust Safety Guarantees for Advanced
  Counterfactual Learning to Rank. CIKM 2024. https://arxiv.org/abs/2407.19943
  [DR-LTR] Oosterhuis. Doubly-Robust Estimation for Correcting Position-Bias in Click Feedback
  for Unbiased Learning to Rank. TOIS 2023. https://arxiv.org/abs/2203.17118
  Agarwal, Zaitsev, Wang, Li, Najork, Joachims. Estimating Position Bias without Intrusive
  Interventions. WSDM 2019 (trust bias). https://arxiv.org/abs/1812.05161
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.cltr.click_chains import (ChainClickModel, _check_k, check_chain_click_model,
                                          relevance_of_ranks, simulate_chain_clicks)
from saferl_jax.parallel import seed_sharding


class ClickModel(NamedTuple):
  """An affine click model with an optional adversarial flip.

  Attributes:
    alpha: [K] slope of P(click) in the relevance probability, per rank.
    beta: [K] click probability of a non-relevant document, per rank.
    flip_probability: scalar eps in [0, 1]; with probability eps the click
      probability p becomes 1 - p (0: an honest user, 1: maximally adversarial).
  """
  alpha: jax.Array
  beta: jax.Array
  flip_probability: jax.Array | float = 0.0


def _check_unit_interval(name: str, value) -> None:
  if value is None or not checks.is_concrete(value):
    return
  v = np.asarray(value, dtype=np.float64)
  if v.ndim != 0 or not 0 <= float(v) <= 1:
    raise ValueError(f"{name}: must be a scalar in [0, 1], got {value!r}")


def check_click_model(model: ClickModel, *, name: str = "model") -> None:
  """Raises a ValueError unless alpha and beta are [K] and every click probability lies in [0, 1].

  Shapes are always checked; values only when the model is concrete (not traced). Messages name
  `name` (the caller's argument, e.g. "click_model").
  """
  if not isinstance(model, ClickModel):
    raise ValueError(f"{name}: must be a ClickModel, got {type(model).__name__}")
  try:
    _check_click_model(model)
  except ValueError as err:
    message = str(err)
    if name != "model" and message.startswith("model"):
      message = name + message[len("model"):]
    raise ValueError(message) from None


def _check_click_model(model: ClickModel) -> None:
  alpha, beta = jnp.asarray(model.alpha), jnp.asarray(model.beta)
  if alpha.ndim != 1 or alpha.shape[0] == 0:
    raise ValueError(f"model.alpha: expected a non-empty [K] array, got shape {tuple(alpha.shape)}")
  if beta.shape != alpha.shape:
    raise ValueError(f"model.beta: expected shape {tuple(alpha.shape)} like model.alpha, "
                     f"got {tuple(beta.shape)}")
  if jnp.ndim(model.flip_probability) != 0:
    raise ValueError(f"model.flip_probability: must be a scalar, got shape "
                     f"{tuple(jnp.shape(model.flip_probability))}")
  _check_unit_interval("model.flip_probability", model.flip_probability)
  if checks.is_concrete(alpha, beta):
    a, b = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
    for field, values in (("alpha", a), ("beta", b)):
      if not np.all(np.isfinite(values)):
        raise ValueError(f"model.{field}: contains NaN or infinite values")
    # P(click) is affine in R in [0, 1]: it stays in [0, 1] iff it does at R = 0 and R = 1.
    tolerance = 1e-6
    bad = ~((b >= -tolerance) & (b <= 1 + tolerance) & (a + b >= -tolerance) & (a + b <= 1 + tolerance))
    if np.any(bad):
      k = int(np.argmax(bad))
      raise ValueError(f"model: click probabilities must lie in [0, 1], but at rank {k} "
                       f"beta = {b[k]:.6g} and alpha + beta = {a[k] + b[k]:.6g}")


def click_model(alpha: ArrayLike, beta: ArrayLike, *, flip_probability: float = 0.0) -> ClickModel:
  """A checked `ClickModel` from alpha [K] and beta [K].

  Example:
    >>> model = click_model([0.5, 0.25], [0.1, 0.1])
    >>> model.alpha.shape
    (2,)
  """
  model = ClickModel(checks.as_float("alpha", alpha), checks.as_float("beta", beta), flip_probability)
  check_click_model(model)
  return model


def position_based(k: int = 5, *, eta: float = 1.0) -> ClickModel:
  """The position-based model: alpha_k = (1 / (k + 1))^eta, beta_k = 0.

  Args:
    k: number of displayed ranks K.
    eta: severity of the position bias (0: no bias).

  Returns:
    A `ClickModel` with alpha, beta of shape [K].

  Example:
    >>> model = position_based(3)
    >>> [round(float(a), 4) for a in model.alpha]
    [1.0, 0.5, 0.3333]
  """
  _check_k(k)
  if not np.isfinite(eta) or eta < 0:
    raise ValueError(f"eta: must be finite and >= 0, got {eta!r}")
  ranks = jnp.arange(k, dtype=jnp.result_type(float))
  alpha = (1.0 / (ranks + 1.0)) ** eta
  return ClickModel(alpha, jnp.zeros_like(alpha), 0.0)


def trust_bias(k: int = 5) -> ClickModel:
  """The affine trust-bias model of [SAFE] and [DR-LTR].

  pos_k = 0.35 / (k + 1) + 0.65 / (1 + 0.05 k), eps+_k = 1 / (1 + 0.005 k),
  eps-_k = 0.65 / (k + 1); alpha_k = pos_k (eps+_k - eps-_k), beta_k = pos_k eps-_k.

  Args:
    k: number of displayed ranks K.

  Returns:
    A `ClickModel` with alpha, beta of shape [K].

  Example:
    >>> model = trust_bias(2)
    >>> [round(float(a), 3) for a in model.alpha], [round(float(b), 3) for b in model.beta]
    ([0.35, 0.532], [0.65, 0.258])
  """
  _check_k(k)
  ranks = jnp.arange(k, dtype=jnp.result_type(float))
  examination = 0.35 / (ranks + 1.0) + 0.65 / (1.0 + 0.05 * ranks)
  eps_plus = 1.0 / (1.0 + 0.005 * ranks)
  eps_minus = 0.65 / (ranks + 1.0)
  return ClickModel(examination * (eps_plus - eps_minus), examination * eps_minus, 0.0)


def adversarial(model: ClickModel, flip_probability: float = 1.0) -> ClickModel:
  """The same model with an adversarial user: p becomes 1 - p with probability `flip_probability`.

  P(click) = (1 - eps) p + eps (1 - p). An estimator should still be given the
  honest alpha and beta (it does not know about the flip).

  Example:
    >>> model = adversarial(position_based(2), 1.0)
    >>> [float(p) for p in click_probabilities(model, [1.0, 0.0])]
    [0.0, 1.0]
  """
  _check_unit_interval("flip_probability", flip_probability)
  return model._replace(flip_probability=flip_probability)


def misspecified(model: ClickModel, amount: float) -> ClickModel:
  """alpha and beta moved towards their means: (1 - amount) alpha + amount mean(alpha), likewise beta.

  amount = 0 leaves the model unchanged, amount = 1 makes alpha and beta
  constant over ranks (no position bias at all). Give the result to an
  estimator while clicks come from `model`, to measure its robustness.

  Example:
    >>> [float(a) for a in misspecified(position_based(2), 1.0).alpha]
    [0.75, 0.75]
  """
  _check_unit_interval("amount", amount)
  check_click_model(model)
  alpha, beta = jnp.asarray(model.alpha), jnp.asarray(model.beta)
  return model._replace(alpha=(1 - amount) * alpha + amount * jnp.mean(alpha),
                        beta=(1 - amount) * beta + amount * jnp.mean(beta))


def click_probabilities(model: ClickModel, relevance_at_ranks: ArrayLike, *,
                        where: ArrayLike | None = None) -> jax.Array:
  """P(click) at each displayed rank: (1 - eps) p + eps (1 - p), p = alpha_k R + beta_k.

  Args:
    model: a `ClickModel` with K ranks.
    relevance_at_ranks: [..., K] relevance probabilities R (label / 4) in [0, 1]
      of the documents shown at ranks 0..K-1.
    where: optional [..., K] bool, False where no document is shown (clicked with
      probability 0).

  Returns:
    [..., K] click probabilities.

  Example:
    >>> model = trust_bias(2)
    >>> [round(float(p), 3) for p in click_probabilities(model, [1.0, 0.0])]
    [1.0, 0.258]
  """
  check_click_model(model)
  relevance = relevance_of_ranks(relevance_at_ranks, jnp.shape(model.alpha)[0])
  alpha = jnp.asarray(model.alpha, relevance.dtype)
  beta = jnp.asarray(model.beta, relevance.dtype)
  eps = jnp.asarray(model.flip_probability, relevance.dtype)
  p = alpha * relevance + beta
  p = (1 - eps) * p + eps * (1 - p)
  p = jnp.clip(p, 0.0, 1.0)  # rounding only; the model check keeps p in [0, 1]
  if where is not None:
    where = jnp.asarray(where, bool)
    if jnp.broadcast_shapes(where.shape, p.shape) != p.shape:
      raise ValueError(f"where: shape {tuple(where.shape)} does not broadcast to {tuple(p.shape)}")
    p = jnp.where(where, p, 0.0)
  return p


def simulate_clicks(model: ClickModel, relevance_at_ranks: ArrayLike, *, key: jax.Array,
                    where: ArrayLike | None = None) -> jax.Array:
  """Bernoulli clicks with `click_probabilities(model, relevance_at_ranks)`.

  Args:
    model: a `ClickModel` with K ranks.
    relevance_at_ranks: [..., K] relevance probabilities in [0, 1].
    key: PRNG key.
    where: optional [..., K] bool, False where no document is shown (never clicked).

  Returns:
    [..., K] clicks as floats, 0 or 1.

  Example:
    >>> import jax
    >>> clicks = simulate_clicks(position_based(3), [1.0, 1.0, 0.0], key=jax.random.key(0))
    >>> clicks.shape, float(clicks[2])
    ((3,), 0.0)
  """
  checks.check_key("key", key)
  p = click_probabilities(model, relevance_at_ranks, where=where)
  return jax.random.bernoulli(key, p).astype(p.dtype)


def relevance_at_ranks(query_ids: ArrayLike, rankings: ArrayLike, labels: ArrayLike, *,
                       max_label: int = 4) -> jax.Array:
  """R = labels[q, ranking] / max_label, shape [N, K], for sessions (query id, displayed ranking).

  Query ids and rankings are checked against labels [Q, D] on concrete input: a gather would
  clamp an out-of-range index (and wrap a negative one) to some other document's label.
  """
  if isinstance(max_label, bool) or not isinstance(max_label, (int, np.integer)) or max_label < 1:
    raise ValueError(f"max_label: must be a positive int, got {max_label!r}")
  labels = jnp.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f"labels: expected [Q, D], got shape {tuple(labels.shape)}")
  if checks.is_concrete(labels) and labels.size:
    values = np.asarray(labels)
    if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > max_label:
      raise ValueError(f"labels: must be finite and in [0, {max_label}]")
  query_ids = checks.as_index("query_ids", query_ids, labels.shape[0], what="query id")
  rankings = checks.as_index("rankings", rankings, labels.shape[1], what="document index")
  if query_ids.ndim != 1 or rankings.ndim != 2 or rankings.shape[0] != query_ids.shape[0]:
    raise ValueError(f"rankings: expected [N, K] for query_ids [N], got shapes "
                     f"{tuple(rankings.shape)} and {tuple(query_ids.shape)}")
  return labels[query_ids[:, None], rankings].astype(jnp.result_type(float)) / max_label


def simulate_sessions(model: ClickModel | ChainClickModel, query_ids: ArrayLike,
                      rankings: ArrayLike, labels: ArrayLike, *, key: jax.Array, k: int | None = None,
                      where: ArrayLike | None = None, max_label: int = 4) -> jax.Array:
  """Clicks on the top K of N logged sessions, in one jitted call sharded over devices.

  Session i shows query q_i's documents rankings[i, 0..K-1]; the document at rank
  k is clicked with `click_probabilities` of its relevance labels[q_i, d] / max_label
  (an affine `ClickModel`), or by a user who scans the list as a
  `saferl_jax.cltr.click_chains.ChainClickModel` says (cascade, DCM, DBN).
  The session axis is split over all devices when they divide N (replicated
  otherwise); the clicks equal `simulate_clicks(model, R, key=key)` (or
  `simulate_chain_clicks(model, R, key=key)`) on the gathered relevance R [N, K],
  whatever the number of devices.

  Args:
    model: a `ClickModel` or a `ChainClickModel` with at least K ranks (its first K
      are used).
    query_ids: [N] int query of each session, in [0, Q).
    rankings: [N, L] int displayed rankings (document indices of the query, in
      [0, D)), L >= K; only the first K are shown.
    labels: [Q, D] int graded labels in 0..max_label.
    key: PRNG key.
    k: number of displayed ranks K; defaults to the model's.
    where: optional [Q, D] bool document mask (True = real document, e.g.
      `LTRData.where`); padded documents are never clicked (a chain model's user
      passes over them).
    max_label: the label with relevance probability 1.

  Returns:
    [N, K] clicks (floats, 0 or 1), sharded over devices along the session axis.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> labels = jnp.array([[4, 0, 0], [0, 0, 4]])
    >>> clicks = simulate_sessions(position_based(2), jnp.array([0, 1]),
    ...                            jnp.array([[0, 1, 2], [1, 2, 0]]), labels, key=jax.random.key(0))
    >>> clicks.tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    >>> cascade = ChainClickModel(jnp.zeros(2), jnp.ones(2))  # click once, then leave
    >>> simulate_sessions(cascade, jnp.array([0, 0]), jnp.array([[0, 1, 2], [1, 0, 2]]), labels,
    ...                   key=jax.random.key(0)).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
  """
  checks.check_key("key", key)
  if isinstance(model, ChainClickModel):
    check_chain_click_model(model)
    num_model_ranks = jnp.shape(model.continue_after_click)[0]
  elif isinstance(model, ClickModel):
    check_click_model(model)
    num_model_ranks = jnp.shape(model.alpha)[0]
  else:
    raise ValueError(f"model: must be a ClickModel or a ChainClickModel, "
                     f"got {type(model).__name__}")
  k = num_model_ranks if k is None else k
  _check_k(k)
  if k > num_model_ranks:
    raise ValueError(f"k: {k} ranks asked for but the click model has only {num_model_ranks}")
  if not isinstance(max_label, (int, np.integer)) or max_label < 1:
    raise ValueError(f"max_label: must be a positive int, got {max_label!r}")
  arrays = {}
  for name, x, ndim in (("query_ids", query_ids, 1), ("rankings", rankings, 2), ("labels", labels, 2)):
    if jnp.ndim(x) != ndim:
      raise ValueError(f"{name}: expected a {ndim}-d array, got shape {tuple(jnp.shape(x))}")
    # as_int refuses floats and int64 values that would wrap in int32 (a wrapped id passes the
    # range check below as some other, valid-looking id).
    arrays[name] = checks.as_int(name, x)
  query_ids, rankings, labels = arrays["query_ids"], arrays["rankings"], arrays["labels"]
  n = query_ids.shape[0]
  if rankings.shape[0] != n:
    raise ValueError(f"rankings: has {rankings.shape[0]} sessions but query_ids has {n}")
  if rankings.shape[1] < k:
    raise ValueError(f"k: {k} displayed ranks but rankings has only {rankings.shape[1]} per session")
  num_queries, num_docs = labels.shape
  if where is not None:
    where = jnp.asarray(where, bool)
    if where.shape != labels.shape:
      raise ValueError(f"where: expected shape {tuple(labels.shape)} like labels, got {tuple(where.shape)}")
  rankings = rankings[:, :k]
  if n > 0 and labels.size == 0:
    raise ValueError(f"labels: is empty (shape {tuple(labels.shape)}) but there are {n} sessions")
  traced = not checks.is_concrete(key, query_ids, rankings, labels, where, *model)
  if not traced and n > 0:
    # Reduced on the device: one small transfer back, not the whole log.
    lows, highs = jax.device_get(_extremes(labels, query_ids, rankings))
    for name, low, high, lowest, highest in zip(
        ("labels", "query_ids", "rankings"), (0, 0, 0), (max_label, num_queries - 1, num_docs - 1),
        lows, highs):
      if lowest < low or highest > high:
        raise ValueError(f"{name}: values must be in [{low}, {high}], found "
                         f"{lowest if lowest < low else highest}")
  if n == 0:
    return jnp.zeros((0, k), jnp.result_type(float))
  model = _first_ranks(model, k)
  if traced:  # inside the caller's jit, which decides the sharding
    return _session_clicks(key, model, query_ids, rankings, labels, where, max_label)
  sharding = seed_sharding(n)
  replicated = NamedSharding(sharding.mesh, PartitionSpec())
  return _sharded_session_clicks(sharding, max_label)(
      key, model, jax.device_put(query_ids, sharding), jax.device_put(rankings, sharding),
      jax.device_put(labels, replicated), None if where is None else jax.device_put(where, replicated))


@jax.jit
def _extremes(*arrays):
  """The minimum and maximum of each array, in one call (a single transfer back to the host)."""
  return (jnp.stack([jnp.min(x).astype(jnp.int32) for x in arrays]),
          jnp.stack([jnp.max(x).astype(jnp.int32) for x in arrays]))


def _first_ranks(model: ClickModel | ChainClickModel, k: int) -> ClickModel | ChainClickModel:
  """The model restricted to its first k ranks, with a float array for its scalar field."""
  if isinstance(model, ChainClickModel):
    return ChainClickModel(jnp.asarray(model.continue_after_click)[:k],
                           jnp.asarray(model.continue_after_skip)[:k],
                           jnp.asarray(model.satisfaction, jnp.result_type(float)))
  return ClickModel(jnp.asarray(model.alpha)[:k], jnp.asarray(model.beta)[:k],
                    jnp.asarray(model.flip_probability, jnp.result_type(float)))


def _session_clicks(key, model, query_ids, rankings, labels, where, max_label):
  relevance = relevance_at_ranks(query_ids, rankings, labels, max_label=max_label)
  shown = None if where is None else where[query_ids[:, None], rankings]
  simulate = simulate_chain_clicks if isinstance(model, ChainClickModel) else simulate_clicks
  return simulate(model, relevance, key=key, where=shown)


@functools.lru_cache(maxsize=32)
def _sharded_session_clicks(sharding: NamedSharding, max_label: int):
  """One jitted simulator per sharding and label scale, so repeated calls do not recompile."""

  def fn(key, model, query_ids, rankings, labels, where):
    clicks = _session_clicks(key, model, query_ids, rankings, labels, where, max_label)
    return jax.lax.with_sharding_constraint(clicks, sharding)

  return jax.jit(fn, out_shardings=sharding)
