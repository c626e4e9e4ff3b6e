"""Plackett-Luce rankings: Gumbel sampling and log-probabilities (floor 1).

A Plackett-Luce (PL) policy over D items with logits m ranks them one position
at a time, each time choosing among the items not yet placed with probability
proportional to exp(m):

    pi(y) = prod_k exp(m(y_k)) / sum_{d not in y_0..y_{k-1}} exp(m(d)).

Functions take one list, logits [D] (leading batch axes [..., D] broadcast too),
and an optional bool mask `where` [..., D] (True = valid): padded items are
never sampled before a valid one and contribute nothing to a log-probability.
One example per call, vmap to batch.

Sampling is Gumbel-max: adding independent Gumbel noise to the logits and
sorting in descending order draws a full ranking from pi; `jax.lax.top_k` of the
same noisy scores draws its top-K prefix without a full sort. Random-number
generation dominates the cost on CPU, so the default generator is the shared
counter-based integer hash of `saferl_jax.fast_random` (as in the bootstrap):
faster than threefry on CPU (timings in docs/benchmarks.md), with the same 23-bit
uniform resolution as `jax.random.uniform`. `generator="threefry"` uses
`jax.random.gumbel`.

Log-probabilities need the log of every tail sum sum_{j >= k} exp(m(y_j)), a
reverse log-cumsum-exp. `jax.lax.cumlogsumexp` computes it exactly but is slow on
CPU (docs/benchmarks.md), so the tail sums are taken in
linear space after subtracting the list's largest valid logit, as one small
matrix product with a triangular matrix of ones. When some tail sum could have
lost terms to float32 underflow (a ranked list whose last valid item is more than
60 nats below its best), the whole call switches, with `jax.lax.cond`, to an
exact log-space `lax.scan` of `logaddexp` over positions. Under `jax.vmap` that
cond becomes a select that runs both branches; pass batches as leading axes when
speed matters.

References:
  Plackett. The Analysis of Permutations. Applied Statistics 1975.
  Gumbel-top-k: Kool, van Hoof, Welling. Stochastic Beams and Where to Find Them. ICML 2019. https://arxiv.org/abs/1903.06059
  [PLR] Oosterhuis. Computationally Efficient Optimization of Plackett-Luce Ranking Models for Relevance and Fairness. SIGIR 2021. https://arxiv.org/abs/2105.00855
  [PLR] Oosterhuis. Learning-to-Rank at the Speed of Sampling: Plackett-Luce Gradient Estimation With Minimal Computational Complexity. SIGIR 2022. https://arxiv.org/abs/2204.10872
"""

from __future__ import annotations

import functools
from typing import Sequence

import distrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


from saferl_jax import checks
from saferl_jax.fast_random import Generator, check_generator, gumbel


# A tail sum below this (after subtracting the largest valid logit) may have lost
# terms to float32 underflow (exp(-87) is about the smallest normal float32), so
# the exact path takes over. With exp(-60) the terms lost to underflow are below
# 1e-12 of the tail for lists of up to 1e4 items.
_LOG_TINY_TAIL = -60.0


# Input checks.


def _check_logits(logits: ArrayLike, where: ArrayLike | None) -> tuple[jax.Array, jax.Array | None]:
  logits = checks.as_float("logits", logits)
  if logits.ndim < 1:
    raise ValueError(f"logits: expected an array [..., D] with D >= 1, got shape {tuple(logits.shape)}")
  if logits.shape[-1] < 1:
    raise ValueError("logits: the item axis is empty; a list needs at least one item")
  if where is not None:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
      raise ValueError(f"where: must be a bool mask (True = valid), got dtype {where.dtype}")
    try:
      jnp.broadcast_shapes(where.shape, logits.shape)
    except ValueError:
      raise ValueError(
          f"where: shape {tuple(where.shape)} does not broadcast against logits shape "
          f"{tuple(logits.shape)}") from None
    if where.ndim > logits.ndim or where.shape[-1] != logits.shape[-1]:
      raise ValueError(
          f"where: shape {tuple(where.shape)} must match the item axis of logits "
          f"{tuple(logits.shape)}")
  if checks.is_concrete(logits, where):
    values = np.asarray(logits)
    if where is not None:
      values = np.where(np.broadcast_to(np.asarray(where), values.shape), values, 0.0)
    if not np.all(np.isfinite(values)):
      raise ValueError(
          "logits: valid items must have finite logits (mask padded items with `where`, "
          f"do not set them to -inf); found {int(np.sum(~np.isfinite(values)))} non-finite")
  return logits, where


def _check_rankings(rankings: ArrayLike, num_items: int) -> jax.Array:
  rankings = checks.as_int("rankings", rankings)
  if rankings.ndim < 1 or rankings.shape[-1] < 1:
    raise ValueError(f"rankings: expected an array [..., K] with K >= 1, got shape {tuple(rankings.shape)}")
  if rankings.shape[-1] > num_items:
    raise ValueError(
        f"rankings: a ranking of {num_items} items has at most {num_items} positions, "
        f"got {rankings.shape[-1]}")
  checks.check_indices("rankings", rankings, num_items, what="item")
  if checks.is_concrete(rankings):
    values = np.asarray(rankings)
    ordered = np.sort(values.reshape(-1, values.shape[-1]), axis=-1)
    if np.any(ordered[:, 1:] == ordered[:, :-1]):
      raise ValueError("rankings: an item appears twice in one ranking")
  return rankings.astype(jnp.int32)


def _check_sample_shape(sample_shape) -> tuple[int, ...]:
  """An int or a sequence of ints >= 1 (no empty draws, no bools or fractions)."""
  if isinstance(sample_shape, (str, bytes)):
    raise TypeError(f"sample_shape: must be an int or a sequence of ints, got {sample_shape!r}")
  if isinstance(sample_shape, (int, np.integer, float, np.floating, bool, np.bool_)):
    sample_shape = (sample_shape,)
  try:
    sizes = tuple(sample_shape)
  except TypeError:
    raise TypeError(f"sample_shape: must be an int or a sequence of ints, got "
                    f"{type(sample_shape).__name__}") from None
  return tuple(checks.check_count("sample_shape", size) for size in sizes)


# Random numbers.


def sample_rankings(
    logits: ArrayLike,
    *,
    key: jax.Array,
    where: ArrayLike | None = None,
    sample_shape: int | Sequence[int] = (),
    k: int | None = None,
    generator: Generator = "hash",
) -> jax.Array:
  """Samples rankings from a Plackett-Luce policy by Gumbel-max.

  y = argsort_desc(m + g), g ~ Gumbel(0, 1) i.i.d.; with `k`, the top-k of the
  same noisy scores (`jax.lax.top_k`), i.e. the first k positions of a full
  ranking drawn from pi. Masked items get score -inf: they come after every
  valid item, in index order.

  Args:
    logits: [..., D] item logits m.
    key: a PRNG key.
    where: optional bool [..., D], True for valid items.
    sample_shape: leading shape of independent samples.
    k: None for full rankings; otherwise the prefix length, 1 <= k <= D.
    generator: "hash" (default, fast on CPU, see the module docstring) or
      "threefry" (`jax.random.gumbel`).

  Returns:
    int32 [*sample_shape, ..., D] (or [..., k]): item indices in ranked order.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> y = sample_rankings(jnp.array([3., 0., -3., 9.]), key=jax.random.key(0),
    ...                     where=jnp.array([True, True, True, False]), sample_shape=5, k=2)
    >>> y.shape, bool((y != 3).all())
    ((5, 2), True)

  References:
    Kool, van Hoof, Welling. Stochastic Beams and Where to Find Them. ICML 2019. https://arxiv.org/abs/1903.06059
  """
  checks.check_key("key", key)
  logits, where = _check_logits(logits, where)
  sample_shape = _check_sample_shape(sample_shape)
  num_items = logits.shape[-1]
  if k is not None and not 1 <= checks.check_count("k", k) <= num_items:
    raise ValueError(f"k: must be in [1, {num_items}] for lists of {num_items} items, got {k}")
  check_generator(generator)
  return _sample_rankings(key, logits, where, sample_shape, k, generator)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _sample_rankings(key, logits, where, sample_shape, k, generator):
  num_items = logits.shape[-1]
  shape = sample_shape + logits.shape
  scores = logits + gumbel(key, shape, logits.dtype, generator)
  if where is not None:
    scores = jnp.where(where, scores, -jnp.inf)
  if k is None or k == num_items:
    # Stable sort of -scores: masked items (+inf) keep their index order at the end.
    return jnp.argsort(-scores, axis=-1, stable=True).astype(jnp.int32)
  return jax.lax.top_k(scores, k)[1].astype(jnp.int32)


# Log-probabilities.


def _safe_logsumexp(x: jax.Array, valid: jax.Array) -> jax.Array:
  """logsumexp of x over valid entries of the last axis; -inf when none, with no NaN gradient."""
  any_valid = jnp.any(valid, axis=-1)
  safe = jnp.where(valid, x, jnp.where(any_valid[..., None], -jnp.inf, 0.0))
  return jnp.where(any_valid, jax.nn.logsumexp(safe, axis=-1), -jnp.inf)


def _sum_of_log_terms(x: jax.Array, valid: jax.Array | None, length: int) -> jax.Array:
  """sum_{k < length, valid_k} [x_k - log sum_{j >= k, valid_j} exp(x_j)] over the last axis.

  The tail sums are taken in linear space after subtracting the largest valid x,
  as one product with a triangular matrix of ones. Tails shrink along the axis,
  so the smallest non-empty one is the last valid position's, exp(x_last - shift);
  when it is below exp(-60) some tail may have lost terms to float32 underflow, and
  the whole call takes an exact log-space `lax.scan` of `logaddexp` instead (the
  reverse cumlogsumexp; `jax.lax.cumlogsumexp` is exact too but slower on CPU). The
  cond chooses between summed results: a cond that returns the [..., L] tails stops
  XLA CPU from fusing the product, which costs more.
  `valid=None` means every entry is valid.
  """
  size = x.shape[-1]
  # The largest valid x (the lowest float for an all-masked list, never -inf); no
  # select on the reduced value, so XLA CPU fuses it with the product.
  lowest = jnp.finfo(x.dtype).min
  shift = jnp.max(x if valid is None else jnp.where(valid, x, lowest), axis=-1, keepdims=True)
  shift = jax.lax.stop_gradient(shift)
  if valid is None:
    last = x[..., -1:]
    nonempty = None
    scaled = jnp.exp(x - shift)
  else:
    positions = jnp.arange(size)
    last_valid = jnp.max(jnp.where(valid, positions, -1), axis=-1, keepdims=True)
    last = jnp.where(last_valid >= 0, jnp.take_along_axis(x, jnp.maximum(last_valid, 0), axis=-1),
                     shift)
    nonempty = positions <= last_valid
    # Masked entries are 0 inside the exponent too: no inf reaches a gradient.
    scaled = jnp.where(valid, jnp.exp(jnp.where(valid, x - shift, 0.0)), 0.0)
  imprecise = jnp.any(last - shift < _LOG_TINY_TAIL)

  def total(log_tails):
    terms = (x - log_tails)[..., :length]
    if valid is not None:
      terms = jnp.where(valid[..., :length], terms, 0.0)
    return jnp.sum(terms, axis=-1)

  upper = jnp.tril(jnp.ones((size, size), x.dtype))  # upper[j, k] = 1 for j >= k
  tails = jnp.matmul(scaled, upper, precision=jax.lax.Precision.HIGHEST)
  # Clamped at the smallest normal float: exact whenever this branch is taken, and
  # no inf in its gradient (the cond differentiates it) when it is not.
  tails = jnp.maximum(tails, jnp.finfo(x.dtype).tiny)
  fast = total(shift + jnp.log(tails if nonempty is None else jnp.where(nonempty, tails, 1.0)))

  def exact(x):
    masked = x if valid is None else jnp.where(valid, x, -jnp.inf)

    def step(carry, x_k):
      carry = jnp.logaddexp(carry, x_k)
      return carry, carry

    init = jnp.full(x.shape[:-1], -jnp.inf, x.dtype)
    _, log_tails = jax.lax.scan(step, init, jnp.moveaxis(masked, -1, 0), reverse=True, unroll=4)
    log_tails = jnp.moveaxis(log_tails, 0, -1)
    return total(log_tails if nonempty is None else jnp.where(nonempty, log_tails, 0.0))

  return jax.lax.cond(imprecise, exact, lambda x: fast, x)


def ranking_log_prob(
    logits: ArrayLike, rankings: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  """Log-probability of a ranking, or of its top-K prefix, under Plackett-Luce.

  log pi(y_0..y_{K-1}) = sum_{k<K} [m(y_k) - log sum_{d not in y_0..y_{k-1}} exp(m(d))],
  the sums running over valid items only. With K = D this is the full ranking's
  log-probability; with K < D it is the probability that a sampled ranking starts
  with this prefix. Masked items in `rankings` contribute 0; the ranking of an
  all-masked list has log-probability 0, with a zero (not NaN) gradient.

  Args:
    logits: [..., D] item logits m.
    rankings: int [..., K] item indices in ranked order, 1 <= K <= D, no repeats;
      broadcasts against logits' leading axes.
    where: optional bool [..., D], True for valid items.

  Returns:
    [...] log-probabilities.

  Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([1., 2., 3.]))
    >>> # pi(2, 0, 1) = 3/6 * 1/3 * 2/2.
    >>> round(float(jnp.exp(ranking_log_prob(logits, jnp.array([2, 0, 1])))), 4)
    0.1667
    >>> # The prefix (2, 0): the same first two factors.
    >>> round(float(jnp.exp(ranking_log_prob(logits, jnp.array([2, 0])))), 4)
    0.1667

  References:
    [PLR] Oosterhuis. Computationally Efficient Optimization of Plackett-Luce Ranking Models
    for Relevance and Fairness. SIGIR 2021. https://arxiv.org/abs/2105.00855
  """
  logits, where = _check_logits(logits, where)
  rankings = _check_rankings(rankings, logits.shape[-1])
  return _ranking_log_prob(logits, rankings, where)


@jax.jit
def _ranking_log_prob(logits, rankings, where):
  num_items = logits.shape[-1]
  length = rankings.shape[-1]
  batch = jnp.broadcast_shapes(logits.shape[:-1], rankings.shape[:-1],
                               () if where is None else where.shape[:-1])
  logits = jnp.broadcast_to(logits, batch + (num_items,))
  rankings = jnp.broadcast_to(rankings, batch + (length,))
  valid_items = None if where is None else jnp.broadcast_to(where, logits.shape)
  ranked = jnp.take_along_axis(logits, rankings, axis=-1)
  ranked_valid = (None if valid_items is None
                  else jnp.take_along_axis(valid_items, rankings, axis=-1))
  if length < num_items:
    # The items after the prefix, in any order, join every tail as one pseudo-item.
    in_prefix = jnp.put_along_axis(jnp.zeros(logits.shape, bool), rankings, True, axis=-1,
                                   inplace=False)
    rest_valid = ~in_prefix if valid_items is None else valid_items & ~in_prefix
    rest = _safe_logsumexp(logits, rest_valid)
    has_rest = jnp.any(rest_valid, axis=-1)
    prefix_valid = jnp.ones(ranked.shape, bool) if ranked_valid is None else ranked_valid
    return _sum_of_log_terms(
        jnp.concatenate([ranked, jnp.where(has_rest, rest, 0.0)[..., None]], axis=-1),
        jnp.concatenate([prefix_valid, has_rest[..., None]], axis=-1), length)
  return _sum_of_log_terms(ranked, ranked_valid, length)


def _one_key(seed, key) -> jax.Array:
  """The key passed as `key=` or distrax's `seed=` (exactly one of them), checked."""
  if (seed is None) == (key is None):
    raise ValueError("key: pass the PRNG key once, as key= (or distrax's seed=)")
  key = seed if key is None else key
  checks.check_key("key", key)
  return key


class PlackettLuce(distrax.Distribution):
  """A Plackett-Luce distribution over rankings of D items, with optional padding.

  Events are full rankings, int32 [D] (masked items last, in index order);
  `sample_top_k` and `log_prob_top_k` work on top-k prefixes. The sampling methods take the
  PRNG key as `key=` (the house name) or `seed=` (distrax's). Every method
  delegates to `sample_rankings` and `ranking_log_prob`, and the object is a
  pytree (distrax `Jittable`), so it passes through `jax.jit` and `jax.vmap`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> pl = PlackettLuce(jnp.zeros((2, 3)))
    >>> y, lp = pl.sample_and_log_prob(key=jax.random.key(0), sample_shape=4)
    >>> y.shape, lp.shape, round(float(lp[0, 0]), 4)  # every ranking has prob 1/6
    ((4, 2, 3), (4, 2), -1.7918)

  References:
    Plackett. The Analysis of Permutations. Applied Statistics 1975.
  """

  def __init__(self, logits: ArrayLike, *, where: ArrayLike | None = None):
    """Args: logits [..., D]; where: optional bool [..., D] (True = valid)."""
    super().__init__()
    logits, where = _check_logits(logits, where)
    self._logits = logits
    self._where = None if where is None else jnp.broadcast_to(where, logits.shape)

  @property
  def logits(self) -> jax.Array:
    return self._logits

  @property
  def where(self) -> jax.Array | None:
    return self._where

  @property
  def event_shape(self) -> tuple[int, ...]:
    return self._logits.shape[-1:]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return self._logits.shape[:-1]

  def sample(self, *, seed: jax.Array | None = None, sample_shape: int | Sequence[int] = (),
             key: jax.Array | None = None) -> jax.Array:
    """Full rankings, int32 [*sample_shape, *batch_shape, D]; the key as `key=` or `seed=`."""
    return super().sample(seed=_one_key(seed, key), sample_shape=_check_sample_shape(sample_shape))

  def sample_and_log_prob(self, *, seed: jax.Array | None = None,
                          sample_shape: int | Sequence[int] = (),
                          key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(rankings, their log-probabilities); the key as `key=` or `seed=`."""
    return super().sample_and_log_prob(seed=_one_key(seed, key),
                                       sample_shape=_check_sample_shape(sample_shape))

  def _sample_n(self, key: jax.Array, n: int) -> jax.Array:
    return sample_rankings(self._logits, key=key, where=self._where, sample_shape=(n,))

  def _sample_n_and_log_prob(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    samples = self._sample_n(key, n)
    return samples, ranking_log_prob(self._logits, samples, where=self._where)

  def log_prob(self, value: ArrayLike) -> jax.Array:
    """log pi(value) for full rankings value [..., D]."""
    value = jnp.asarray(value)
    if value.ndim < 1 or value.shape[-1] != self.event_shape[0]:
      raise ValueError(
          f"value: expected full rankings [..., {self.event_shape[0]}], got shape "
          f"{tuple(value.shape)} (use log_prob_top_k for prefixes)")
    return ranking_log_prob(self._logits, value, where=self._where)

  def sample_top_k(self, *, k: int, sample_shape: int | Sequence[int] = (),
                   key: jax.Array | None = None, seed: jax.Array | None = None) -> jax.Array:
    """Top-k prefixes, int32 [*sample_shape, *batch_shape, k]; the key as `key=` or `seed=`."""
    return sample_rankings(self._logits, key=_one_key(seed, key), where=self._where,
                           sample_shape=sample_shape, k=k)

  def log_prob_top_k(self, prefix: ArrayLike) -> jax.Array:
    """log-probability that a sampled ranking starts with prefix [..., k]."""
    return ranking_log_prob(self._logits, prefix, where=self._where)

  def __getitem__(self, index) -> PlackettLuce:
    """Indexes the batch axes (integers and slices; the item axis always stays whole)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis or i is None for i in index) or len(index) > len(self.batch_shape):
      raise ValueError(f"index: expected at most {len(self.batch_shape)} integers or slices over the "
                       f"batch axes, got {index}")
    where = None if self._where is None else self._where[index]
    return PlackettLuce(self._logits[index], where=where)
