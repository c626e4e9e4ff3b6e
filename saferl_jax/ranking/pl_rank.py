"""PL-Rank: unbiased gradients of ranking metrics under a Plackett-Luce policy (floor 1).

Pure functions of arrays (no Flax, no I/O). Written for one list (query): logits [D],
relevance [D], rank_weights [K] and an optional mask `where` [D]. Leading batch axes
[..., D] on logits, relevance and where run every list in one call (vmapped inside,
rank_weights shared); the sampling estimators then give list i of the flattened batch the
key `jax.random.split(key, num_lists)[i]`, so a batch equals a loop over lists with those
keys. Randomness arrives as an explicit `key` and `num_samples` is static.

A PL policy with logits m ranks D items by drawing, for k = 0, 1, ..., the item at
rank k with probability

  pi(d | y_{0:k}) = exp(m_d) / sum_{d' not in y_{0:k}} exp(m_d').

The objective is the expected weighted relevance of the top K ranks,

  R(pi) = E_{y~pi}[sum_{k<K} theta_k rho_{y_k}] = sum_d omega(d|pi) rho_d,
  omega(d|pi) = E_{y~pi}[theta_{rank(d|y)}]   (theta_k = 0 for k >= K),

with theta = rank_weights (e.g. the DCG discounts 1/log2(k + 2)) and rho = relevance.
Writing G_k = sum_{j=k}^{K-1} theta_j rho_{y_j} for the reward from rank k on, the
policy gradient splits by rank (rewards above rank k do not depend on the choice at
rank k):

  dR/dm = E_y[sum_{k<K} (e_{y_k} - pi(.|y_{0:k})) G_k].

Three estimators of it, each from N rankings sampled by Gumbel top-K:

- `reinforce_gradient`: the score-function estimator with the whole-list reward
  R(y) and a leave-one-out baseline, (1/N) sum_i (R(y_i) - b_i) grad log pi(y_i).
- `pl_rank_1_gradient` [PLR-1]: the rank-wise form above, written as the paper does
  with the [N, K, D] table of placement probabilities, O(N K D).
- `pl_rank_gradient` (PL-Rank-3) [PLR-3]: PL-Rank-2's estimator, in which the
  reward an item would collect at rank k is replaced by its expectation
  pi(d|y_{0:k}) theta_k rho_d, computed in O(N (D + K log D)): the placement
  probabilities at every rank share the item's exp(m_d) and differ only in
  the normaliser, so the sum over ranks is a cumulative sum over K.

Masked items (where False) get logit -inf: they are never ranked above a valid item
and their gradient is 0. Lists with fewer than K valid items use only the first
ranks, and an all-masked list gives a zero gradient without NaN.

`exact_objective` and `exact_gradient` enumerate every top-K prefix (D <= 8) for
tests and benchmarks.

References:
  [PLR-1] Oosterhuis. Computationally Efficient Optimization of Plackett-Luce Ranking
  Models for Relevance and Fairness. SIGIR 2021. https://arxiv.org/abs/2105.00855
  [PLR-3] Oosterhuis. Learning-to-Rank at the Speed of Sampling: Plackett-Luce
  Gradient Estimation With Minimal Computational Complexity. SIGIR 2022.
  https://arxiv.org/abs/2204.10872
  Williams. Simple Statistical Gradient-Following Algorithms for Connectionist
  Reinforcement Learning. Machine Learning 1992.
  Kool, van Hoof, Welling. Buy 4 REINFORCE Samples, Get a Baseline for Free! 2019.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.fast_random import gumbel
from saferl_jax.policy_gradient import leave_one_out_baseline

MAX_EXACT_ITEMS = 8


# Input checks.


def _check_list(logits, relevance, rank_weights, where):
  """Converts and checks lists [..., D]; returns (logits, relevance, rank_weights, valid)."""
  logits = checks.as_float("logits", logits)
  relevance = checks.as_float("relevance", relevance)
  rank_weights = checks.as_float("rank_weights", rank_weights)
  if logits.ndim < 1:
    raise ValueError(
        f"logits: expected an array [..., D], one list per row, got shape {tuple(logits.shape)}")
  num_items = logits.shape[-1]
  if num_items == 0:
    raise ValueError("logits: the list is empty; at least one item is needed")
  if relevance.shape != logits.shape:
    raise ValueError(
        f"relevance: expected shape {tuple(logits.shape)} like logits, "
        f"got {tuple(relevance.shape)}")
  if rank_weights.ndim != 1 or rank_weights.shape[0] == 0:
    raise ValueError(
        f"rank_weights: expected a non-empty 1-d array [K], got shape {tuple(rank_weights.shape)}")
  if rank_weights.shape[0] > num_items:
    raise ValueError(
        f"rank_weights: has K = {rank_weights.shape[0]} ranks but the list has only "
        f"D = {num_items} items; need K <= D (pad the list and mask the padding)")
  if where is None:
    valid = jnp.ones(logits.shape, bool)
  else:
    valid = jnp.asarray(where)
    if valid.shape[-1:] == logits.shape[-1:] and valid.ndim < logits.ndim:
      valid = jnp.broadcast_to(valid, logits.shape)  # one mask shared by every list
    if valid.shape != logits.shape:
      raise ValueError(f"where: expected shape {tuple(logits.shape)} like logits, "
                       f"got {tuple(valid.shape)}")
    if valid.dtype != jnp.bool_:
      raise ValueError(f"where: must be a bool mask (True = valid item), got dtype {valid.dtype}")
  checks.check_finite("relevance", relevance)
  checks.check_finite("rank_weights", rank_weights)
  if checks.is_concrete(logits, valid):
    checks.check_finite("logits", jnp.where(valid, logits, 0.0))
  return logits, relevance, rank_weights, valid


def _check_num_samples(num_samples, minimum: int) -> int:
  is_int = isinstance(num_samples, (int, np.integer)) and not isinstance(num_samples, bool)
  if is_int and num_samples < minimum:
    why = " for the leave-one-out baseline" if minimum > 1 else ""
    raise ValueError(f"num_samples: must be >= {minimum}{why}, got {num_samples}")
  return checks.check_count("num_samples", num_samples, low=minimum)  # an int (it sets a shape)


def _over_lists(kernel, key, logits, relevance, rank_weights, valid, num_samples):
  """Runs a one-list kernel on lists [..., D]: list i of the flattened batch gets split(key, B)[i]."""
  if logits.ndim == 1:
    return kernel(key, logits, relevance, rank_weights, valid, num_samples)
  return _batched(kernel, key, logits, relevance, rank_weights, valid, num_samples)


@functools.partial(jax.jit, static_argnames=("kernel", "num_samples"))
def _batched(kernel, key, logits, relevance, rank_weights, valid, num_samples):
  num_items = logits.shape[-1]
  num_lists = int(np.prod(logits.shape[:-1], dtype=int))
  flat = lambda x: x.reshape(num_lists, num_items)
  one_list = lambda k, m, rho, w: kernel(k, m, rho, rank_weights, w, num_samples)
  out = jax.vmap(one_list)(jax.random.split(key, num_lists), flat(logits), flat(relevance),
                           flat(valid))
  return out.reshape(logits.shape)


# Sampling and the per-rank quantities every estimator shares.


def _sample_top_k(key, logits, valid, num_samples: int, cutoff: int) -> jax.Array:
  """[N, K] top-K prefixes of PL rankings, by Gumbel top-K; masked items come last."""
  noise = gumbel(key, (num_samples, logits.shape[0]), logits.dtype)  # the fast shared generator
  return jax.lax.top_k(jnp.where(valid, logits, -jnp.inf) + noise, cutoff)[1]


class _Ranks(NamedTuple):
  """Per-sample quantities of the sampled prefixes (N samples, K ranks, D items)."""
  placed: jax.Array       # [N, K] bool: rank k holds a valid item (False past the valid count)
  future: jax.Array       # [N, K] G_k = sum_{j >= k} theta_j rho_{y_j}
  log_norm: jax.Array     # [N, K] log sum of exp(m) over the items not yet placed (0 if not placed)
  rank_of: jax.Array      # [N, D] rank of d if in the prefix, else K - 1
  in_prefix: jax.Array    # [N, D] bool: d holds a valid rank of the prefix
  scale: jax.Array        # [N, D] exp(m_d - log_norm[rank_of[d]]): pi(d | y_{0:rank_of[d]})


def _ranks(logits, relevance, rank_weights, valid, rankings) -> _Ranks:
  num_samples, cutoff = rankings.shape
  rows = jnp.arange(num_samples)[:, None]
  placed = valid[rankings]
  gains = jnp.where(placed, rank_weights[None, :] * relevance[rankings], 0.0)
  future = jnp.cumsum(gains[:, ::-1], axis=1)[:, ::-1]
  in_prefix = jnp.zeros((num_samples, logits.shape[0]), bool).at[rows, rankings].set(placed)
  # The normaliser at rank k sums exp(m) over the valid items outside the prefix and the
  # prefix items at ranks >= k: all terms positive, no cancellation, O(D + K) per sample.
  log_rest = jax.nn.logsumexp(jnp.where(valid[None, :] & ~in_prefix, logits[None, :], -jnp.inf),
                              axis=1)
  log_tail = jax.lax.cumlogsumexp(jnp.where(placed, logits[rankings], -jnp.inf), axis=1,
                                  reverse=True)
  log_norm = jnp.where(placed, jnp.logaddexp(log_rest[:, None], log_tail), 0.0)
  rank_of = jnp.full((num_samples, logits.shape[0]), cutoff - 1).at[rows, rankings].set(
      jnp.broadcast_to(jnp.arange(cutoff), rankings.shape))
  # pi(d | y_{0:r}) at d's last unplaced rank r: exp(m_d - log_norm_r) <= 1 for valid d.
  last_norm = jnp.take_along_axis(log_norm, rank_of, axis=1)
  scale = jnp.where(valid[None, :], jnp.exp(jnp.where(valid, logits, 0.0)[None, :] - last_norm),
                    0.0)
  return _Ranks(placed, future, log_norm, rank_of, in_prefix, scale)


def _discounted_cumsum(ranks: _Ranks, values: jax.Array) -> jax.Array:
  """S_r = sum_{k <= r} values_k exp(log_norm_r - log_norm_k), [N, K] (or [N, K, C]).

  So that pi(d | y_{0:k}) summed against values over k <= r is exp(m_d - log_norm_r) S_r.
  Computed by the recurrence S_r = exp(log_norm_r - log_norm_{r-1}) S_{r-1} + values_r,
  whose factors lie in (0, 1]: no overflow however large the logits.
  """
  step = ranks.log_norm[:, 1:] - ranks.log_norm[:, :-1]
  both = ranks.placed[:, 1:] & ranks.placed[:, :-1]
  decay = jnp.concatenate(
      [jnp.ones_like(ranks.log_norm[:, :1]), jnp.exp(jnp.where(both, step, 0.0))], axis=1)
  placed = ranks.placed
  if values.ndim == 3:  # several value columns [N, K, C] share the decay
    decay, placed = decay[..., None], placed[..., None]
  decay = jnp.broadcast_to(decay, values.shape)
  values = jnp.where(placed, values, 0.0)

  def combine(earlier, later):
    decay_a, sum_a = earlier
    decay_b, sum_b = later
    return decay_a * decay_b, sum_a * decay_b + sum_b

  return jax.lax.associative_scan(combine, (decay, values), axis=1)[1]


def _at_rank(ranks: _Ranks, per_rank: jax.Array) -> jax.Array:
  """[N, K] -> [N, D]: each item's entry at rank_of[d]."""
  return jnp.take_along_axis(per_rank, ranks.rank_of, axis=1)


def _scatter_ranks(ranks: _Ranks, rankings: jax.Array, per_rank: jax.Array) -> jax.Array:
  """[N, K] -> [N, D]: each placed item's entry at its rank, 0 for the other items."""
  rows = jnp.arange(rankings.shape[0])[:, None]
  values = jnp.where(ranks.placed, per_rank, 0.0)
  return jnp.zeros(ranks.in_prefix.shape, per_rank.dtype).at[rows, rankings].add(values)


def _mean_over_samples(per_sample: jax.Array, valid: jax.Array) -> jax.Array:
  return jnp.where(valid, jnp.mean(per_sample, axis=0), 0.0)


# The estimators. Each public function checks its inputs eagerly and hands the arrays to a
# jitted kernel, so an eager call compiles once per shape instead of dispatching op by op;
# inside a caller's jit or vmap the kernel is simply inlined.


def pl_rank_gradient(logits: ArrayLike, relevance: ArrayLike, rank_weights: ArrayLike, *,
                     key: jax.Array, num_samples: int,
                     where: ArrayLike | None = None) -> jax.Array:
  """PL-Rank-3: unbiased estimate of dR/dm from N sampled rankings, O(N (D + K log D)).

  With G_k = sum_{j >= k} theta_j rho_{y_j}, r(d) the rank of d in sample y (K - 1
  when d is not in the top K) and pi(d | y_{0:k}) the PL probability of placing d at
  rank k after y_{0:k}, PL-Rank-2/3 estimates

    dR/dm_d ~= (1/N) sum_y [ 1{r(d) < K} G_{r(d)+1}
                             + sum_{k <= r(d)} pi(d | y_{0:k}) (theta_k rho_d - G_k) ],

  (G_K = 0). The first sum is the reward that follows d; the second term replaces
  the reward d itself collects by its expectation at every rank it could take.
  Since pi(d | y_{0:k}) = exp(m_d) / Z_k, the sum over k is exp(m_d) times a
  cumulative sum over ranks shared by all items: only the top K of each sample
  (Gumbel top-K) and O(D) work per sample are needed.

  Args:
    logits: [..., D] PL logits m, one list per row.
    relevance: [..., D] item rewards rho (relevance labels or estimated rewards).
    rank_weights: [K] weights theta of ranks 0..K-1 (K <= D); ranks >= K weigh 0.
    key: a PRNG key (split over the lists of a batch, see the module docstring).
    num_samples: N >= 1 rankings to sample per list (static).
    where: optional [..., D] bool mask (True = valid item). Masked items are ranked
      after every valid one, weigh nothing and get gradient 0.

  Returns:
    [..., D] the gradient estimate; 0 on masked items.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> grad = pl_rank_gradient(jnp.zeros(4), jnp.array([1., 0., 0., 0.]),
    ...                         jnp.array([1., 0.5]), key=jax.random.key(0),
    ...                         num_samples=4000)
    >>> bool(grad[0] > 0.2 and grad[1] < 0)
    True

  References:
    [PLR-3] Oosterhuis. Learning-to-Rank at the Speed of Sampling. SIGIR 2022.
    https://arxiv.org/abs/2204.10872
    [PLR-1] Oosterhuis. Computationally Efficient Optimization of Plackett-Luce
    Ranking Models for Relevance and Fairness. SIGIR 2021. https://arxiv.org/abs/2105.00855
  """
  checks.check_key("key", key)
  logits, relevance, rank_weights, valid = _check_list(logits, relevance, rank_weights, where)
  num_samples = _check_num_samples(num_samples, 1)
  return _over_lists(_pl_rank_3, key, logits, relevance, rank_weights, valid, num_samples)


@functools.partial(jax.jit, static_argnames="num_samples")
def _pl_rank_3(key, logits, relevance, rank_weights, valid, num_samples):
  rankings = _sample_top_k(key, logits, valid, num_samples, rank_weights.shape[0])
  ranks = _ranks(logits, relevance, rank_weights, valid, rankings)
  next_future = jnp.concatenate(
      [ranks.future[:, 1:], jnp.zeros_like(ranks.future[:, :1])], axis=1)
  following = _scatter_ranks(ranks, rankings, next_future)
  # One pass for both sums: sum_{k <= r} pi(d | y_{0:k}) theta_k and ... G_k.
  both = _discounted_cumsum(ranks, jnp.stack(
      [jnp.broadcast_to(rank_weights, rankings.shape), ranks.future], axis=-1))
  weight_sum, future_sum = _at_rank(ranks, both[..., 0]), _at_rank(ranks, both[..., 1])
  per_sample = following + ranks.scale * (relevance[None, :] * weight_sum - future_sum)
  return _mean_over_samples(per_sample, valid)


def pl_rank_1_gradient(logits: ArrayLike, relevance: ArrayLike, rank_weights: ArrayLike, *,
                       key: jax.Array, num_samples: int,
                       where: ArrayLike | None = None) -> jax.Array:
  """PL-Rank-1: the rank-wise policy gradient, written out, O(N K D).

    dR/dm_d ~= (1/N) sum_y [ 1{r(d) < K} G_{r(d)} - sum_{k<K} pi(d | y_{0:k}) G_k ],

  with the placement probabilities pi(d | y_{0:k}) (0 once d is placed) held as an
  [N, K, D] table, as in the paper. Unbiased, with more variance than PL-Rank-3
  (the reward an item collects at its own rank is sampled, not expected) and
  K times its cost; kept as the simple reference. Arguments as `pl_rank_gradient`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> grad = pl_rank_1_gradient(jnp.zeros(4), jnp.array([1., 0., 0., 0.]),
    ...                           jnp.array([1., 0.5]), key=jax.random.key(0),
    ...                           num_samples=4000)
    >>> bool(grad[0] > 0.2 and grad[1] < 0)
    True

  References:
    [PLR-1] Oosterhuis. SIGIR 2021. https://arxiv.org/abs/2105.00855
  """
  checks.check_key("key", key)
  logits, relevance, rank_weights, valid = _check_list(logits, relevance, rank_weights, where)
  num_samples = _check_num_samples(num_samples, 1)
  return _over_lists(_pl_rank_1, key, logits, relevance, rank_weights, valid, num_samples)


@functools.partial(jax.jit, static_argnames="num_samples")
def _pl_rank_1(key, logits, relevance, rank_weights, valid, num_samples):
  cutoff = rank_weights.shape[0]
  rankings = _sample_top_k(key, logits, valid, num_samples, cutoff)
  placed = valid[rankings]
  gains = jnp.where(placed, rank_weights[None, :] * relevance[rankings], 0.0)
  future = jnp.cumsum(gains[:, ::-1], axis=1)[:, ::-1]
  chosen = jax.nn.one_hot(rankings, logits.shape[0], dtype=bool) & placed[..., None]  # [N, K, D]
  placed_before = jnp.cumsum(chosen, axis=1) > chosen
  remaining = valid[None, None, :] & ~placed_before & placed[..., None]
  any_remaining = jnp.any(remaining, axis=-1, keepdims=True)
  masked = jnp.where(remaining, logits[None, None, :], -jnp.inf)
  log_norm = jax.nn.logsumexp(jnp.where(any_remaining, masked, 0.0), axis=-1, keepdims=True)
  probs = jnp.where(remaining, jnp.exp(jnp.where(remaining, logits, 0.0) - log_norm), 0.0)
  collected = jnp.sum(jnp.where(chosen, future[..., None], 0.0), axis=1)
  expected = jnp.sum(probs * future[..., None], axis=1)
  return _mean_over_samples(collected - expected, valid)


def reinforce_gradient(logits: ArrayLike, relevance: ArrayLike, rank_weights: ArrayLike, *,
                       key: jax.Array, num_samples: int,
                       where: ArrayLike | None = None) -> jax.Array:
  """REINFORCE with a leave-one-out baseline: (1/N) sum_i (R(y_i) - b_i) grad log pi(y_i).

  R(y) = sum_{k<K} theta_k rho_{y_k}, b_i = (sum_j R(y_j) - R(y_i)) / (N - 1), and the
  score of the top-K prefix is grad_{m_d} log pi(y_{0:K}) = 1{r(d) < K} -
  sum_{k <= r(d)} pi(d | y_{0:k}), computed in O(D + K) per sample. Unbiased since
  b_i does not depend on y_i. Arguments as `pl_rank_gradient`, with num_samples >= 2.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> grad = reinforce_gradient(jnp.zeros(4), jnp.array([1., 0., 0., 0.]),
    ...                           jnp.array([1., 0.5]), key=jax.random.key(0),
    ...                           num_samples=4000)
    >>> bool(grad[0] > 0.2 and grad[1] < 0)
    True

  References:
    Williams. Machine Learning 1992. Kool, van Hoof, Welling. Buy 4 REINFORCE Samples,
    Get a Baseline for Free! 2019. https://openreview.net/forum?id=r1lgTGL5DE
  """
  checks.check_key("key", key)
  logits, relevance, rank_weights, valid = _check_list(logits, relevance, rank_weights, where)
  num_samples = _check_num_samples(num_samples, 2)
  return _over_lists(_reinforce, key, logits, relevance, rank_weights, valid, num_samples)


@functools.partial(jax.jit, static_argnames="num_samples")
def _reinforce(key, logits, relevance, rank_weights, valid, num_samples):
  rankings = _sample_top_k(key, logits, valid, num_samples, rank_weights.shape[0])
  ranks = _ranks(logits, relevance, rank_weights, valid, rankings)
  placement_sum = _at_rank(ranks, _discounted_cumsum(ranks, jnp.ones(rankings.shape,
                                                                     logits.dtype)))
  score = ranks.in_prefix.astype(logits.dtype) - ranks.scale * placement_sum
  reward = ranks.future[:, 0]
  advantage = reward - leave_one_out_baseline(reward)
  return _mean_over_samples(advantage[:, None] * score, valid)


# Exact values by enumeration (tests and benchmarks).


def exact_objective(logits: ArrayLike, relevance: ArrayLike, rank_weights: ArrayLike, *,
                    where: ArrayLike | None = None) -> jax.Array:
  """R(pi) = sum_y pi(y_{0:K}) sum_{k<K} theta_k rho_{y_k}, over every top-K prefix.

  Exact, differentiable in the logits, and jit-able, but enumerates D! / (D - K)!
  prefixes: D <= 8 only. Masked items follow all valid ones (uniformly ordered among
  themselves, which does not matter: they weigh nothing).

  Args:
    logits: [..., D] PL logits, D <= 8, one list per row.
    relevance: [..., D] item rewards.
    rank_weights: [K] rank weights, K <= D.
    where: optional [..., D] bool mask (True = valid item).

  Returns:
    [...] the expected reward of each list; 0 for an all-masked list.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(exact_objective(jnp.zeros(3), jnp.array([1., 0., 0.]), jnp.ones(1))), 4)
    0.3333
  """
  logits, relevance, rank_weights, valid = _check_list(logits, relevance, rank_weights, where)
  num_items = logits.shape[-1]
  if num_items > MAX_EXACT_ITEMS:
    raise ValueError(f"logits: exact enumeration is for D <= {MAX_EXACT_ITEMS} items, "
                     f"got D = {num_items}")
  if logits.ndim == 1:
    return _exact_objective(logits, relevance, rank_weights, valid)
  flat = lambda x: x.reshape(-1, num_items)
  values = jax.vmap(_exact_objective, in_axes=(0, 0, None, 0))(
      flat(logits), flat(relevance), rank_weights, flat(valid))
  return values.reshape(logits.shape[:-1])


@jax.jit
def _exact_objective(logits, relevance, rank_weights, valid):
  num_items, cutoff = logits.shape[0], rank_weights.shape[0]
  prefixes = jnp.asarray(np.array(list(itertools.permutations(range(num_items), cutoff)),
                                  dtype=np.int32).reshape(-1, cutoff))         # [P, K]
  chosen = jax.nn.one_hot(prefixes, num_items, dtype=bool)                       # [P, K, D]
  before = jnp.cumsum(chosen, axis=1) > chosen
  remaining_valid = valid[None, None, :] & ~before
  any_valid = jnp.any(remaining_valid, axis=-1)                                  # [P, K]
  masked = jnp.where(remaining_valid, logits[None, None, :], -jnp.inf)
  log_norm = jax.nn.logsumexp(jnp.where(any_valid[..., None], masked, 0.0), axis=-1)
  item_valid = valid[prefixes]
  log_pick = jnp.where(any_valid & item_valid, logits[prefixes] - log_norm, -jnp.inf)
  # Once the valid items are used up, the masked ones are placed uniformly at random.
  remaining_masked = jnp.sum(~valid[None, None, :] & ~before, axis=-1)
  log_uniform = jnp.where(~any_valid & ~item_valid,
                          -jnp.log(jnp.maximum(remaining_masked, 1).astype(logits.dtype)),
                          -jnp.inf)
  log_prob = jnp.sum(jnp.where(any_valid, log_pick, log_uniform), axis=1)       # [P]
  reward = jnp.sum(jnp.where(item_valid, rank_weights[None, :] * relevance[prefixes], 0.0),
                   axis=1)
  return jnp.sum(jnp.exp(log_prob) * reward)


def exact_gradient(logits: ArrayLike, relevance: ArrayLike, rank_weights: ArrayLike, *,
                   where: ArrayLike | None = None) -> jax.Array:
  """dR/dm [..., D] by differentiating `exact_objective` (D <= 8); 0 on masked items.

  Example:
    >>> import jax.numpy as jnp
    >>> grad = exact_gradient(jnp.zeros(2), jnp.array([1., 0.]), jnp.ones(1))
    >>> [round(g, 4) for g in grad.tolist()]
    [0.25, -0.25]
  """
  logits = checks.as_float("logits", logits)
  # Lists are independent, so the gradient of their sum is every list's own gradient.
  grad = jax.grad(lambda m: jnp.sum(exact_objective(m, relevance, rank_weights, where=where)))(
      logits)
  if where is None:
    return grad
  return jnp.where(jnp.asarray(where), grad, 0.0)
