"""A synthetic contextual bandit with two rewards and exact values, for constrained OPL (floor 2).

The primary reward is `synthetic_bandit.make_problem`'s: q_0(x, a) = sigmoid(s_0(x, a)) over its
fixed context pool, with its softmax logger pi_0 = softmax(tau q_0) and reward model. The
secondary reward shares the pool and conflicts with the primary by `conflict` = c in [0, 1]:

  q_1(x, a) = sigmoid(-c s_0(x, a) + sqrt(1 - c^2) s'(x, a)),   s'(x, a) = x . theta'_a + b'_a,

with theta', b' drawn like the primary's from another key (c = 0: an unrelated reward; c = 1:
the primary's mirror image). Both rewards are Bernoulli given (x, a), drawn independently, and
both values V_j(pi) = mean_x sum_a pi(a|x) q_j(x, a) are exact over the pool.

References:
  Saito et al. Open Bandit Dataset and Pipeline. NeurIPS 2021 Datasets and Benchmarks.
  https://arxiv.org/abs/2008.07146
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.data import synthetic_bandit as sb
from saferl_jax.opl.constrained import ConstrainedBatch


class TwoRewardProblem(NamedTuple):
  """A two-reward problem; every array is indexed by context id in [0, num_contexts).

  Attributes:
    contexts: [N, d] the context pool, drawn uniformly per round.
    expected_rewards: [N, A, 2] q_j(x, a), j = 0 (primary), 1 (secondary).
    logging_dist: [N, A] the logging policy pi_0 = softmax(tau q_0).
    reward_hat: [N, A, 2] imperfect reward models (q_j plus Gaussian error, clipped to [0, 1]).
  """
  contexts: jax.Array
  expected_rewards: jax.Array
  logging_dist: jax.Array
  reward_hat: jax.Array


class TwoRewardLog(NamedTuple):
  """A log of n rounds (a leading seed axis when simulated for many seeds).

  Attributes:
    context_ids: [n] ids into the pool.
    actions: [n] logged actions.
    rewards: [n, 2] the primary and secondary rewards.
    logging_probs: [n] pi_0(a_i|x_i).
  """
  context_ids: jax.Array
  actions: jax.Array
  rewards: jax.Array
  logging_probs: jax.Array


def two_reward_problem(key: jax.Array, *, num_actions: int = 10, dim_context: int = 5,
                       num_contexts: int = 1000, conflict: float = 0.7,
                       logger_inverse_temperature: float = 1.0,
                       reward_model_noise: float = 0.1) -> TwoRewardProblem:
  """Draws a two-reward problem: `make_problem`'s primary and a conflicting secondary reward.

  Args:
    key: PRNG key fixing the problem.
    num_actions: A.
    dim_context: d.
    num_contexts: N, the pool's size.
    conflict: c in [0, 1], how much the secondary reward opposes the primary.
    logger_inverse_temperature: tau of the logger softmax(tau q_0).
    reward_model_noise: the reward models' error std.

  Returns:
    A `TwoRewardProblem`.

  Example:
    >>> problem = two_reward_problem(jax.random.key(0), num_actions=4, num_contexts=10)
    >>> problem.expected_rewards.shape, problem.logging_dist.shape
    ((10, 4, 2), (10, 4))
  """
  checks.check_key("key", key)
  checks.check_real("conflict", conflict, low=0.0, high=1.0)
  checks.check_real("reward_model_noise", reward_model_noise, low=0.0)
  primary_key, theta_key, bias_key, model_key = jax.random.split(key, 4)
  base = sb.make_problem(primary_key, num_actions=num_actions, dim_context=dim_context,
                         num_contexts=num_contexts,
                         logger_inverse_temperature=logger_inverse_temperature,
                         reward_model_noise=reward_model_noise)
  primary_logits = jnp.log(base.expected_rewards) - jnp.log1p(-base.expected_rewards)
  theta = jax.random.normal(theta_key, (dim_context, num_actions)) / math.sqrt(dim_context)
  bias = jax.random.normal(bias_key, (num_actions,))
  secondary_logits = (-conflict * primary_logits
                      + math.sqrt(1.0 - conflict ** 2) * (base.contexts @ theta + bias))
  secondary = jax.nn.sigmoid(secondary_logits)
  secondary_hat = jnp.clip(
      secondary + reward_model_noise * jax.random.normal(model_key, secondary.shape), 0.0, 1.0)
  return TwoRewardProblem(
      contexts=base.contexts,
      expected_rewards=jnp.stack([base.expected_rewards, secondary], axis=-1),
      logging_dist=base.logging_dist,
      reward_hat=jnp.stack([base.reward_hat, secondary_hat], axis=-1))


def policy_values(policy_dist: ArrayLike, problem: TwoRewardProblem) -> jax.Array:
  """[2] the exact values V_j(pi) = mean_x sum_a pi(a|x) q_j(x, a) over the pool.

  Args:
    policy_dist: [N, A] pi(.|x) for every context of the pool.
    problem: a `TwoRewardProblem`.

  Example:
    >>> problem = two_reward_problem(jax.random.key(0), num_actions=4, num_contexts=10)
    >>> policy_values(problem.logging_dist, problem).shape
    (2,)
  """
  policy_dist = checks.as_float("policy_dist", policy_dist)
  if policy_dist.shape != problem.logging_dist.shape:
    raise ValueError(f"policy_dist: expected shape {tuple(problem.logging_dist.shape)} ([N, A] "
                     f"over the pool), got {tuple(policy_dist.shape)}")
  return jnp.mean(jnp.sum(policy_dist[..., None] * problem.expected_rewards, axis=1), axis=0)


def simulate_log(problem: TwoRewardProblem, *, key: jax.Array, num_rounds: int) -> TwoRewardLog:
  """Logs n rounds of pi_0: `synthetic_bandit.simulate_log` for the primary reward, and the
  secondary reward drawn independently given (x, a), from two halves of split(key).

  Args:
    problem: a `TwoRewardProblem`.
    key: PRNG key; same key, same log.
    num_rounds: n.

  Returns:
    A `TwoRewardLog`.

  Example:
    >>> problem = two_reward_problem(jax.random.key(0), num_actions=4, num_contexts=10)
    >>> simulate_log(problem, key=jax.random.key(1), num_rounds=8).rewards.shape
    (8, 2)
  """
  checks.check_key("key", key)
  checks.check_count("num_rounds", num_rounds)
  return _simulate_log(problem, key, num_rounds)


def _simulate_log(problem: TwoRewardProblem, key: jax.Array, num_rounds: int) -> TwoRewardLog:
  primary = sb.BanditProblem(problem.contexts, problem.expected_rewards[..., 0],
                             problem.logging_dist, problem.logging_dist,
                             problem.reward_hat[..., 0])
  # Two halves of one split: fold_in(key, 1) would repeat split(key, 3)[0], the contexts' key
  # inside simulate_log (threefry), and bias the secondary rewards.
  primary_key, secondary_key = jax.random.split(key)
  log = sb.simulate_log(primary, key=primary_key, num_rounds=num_rounds)
  secondary_probs = problem.expected_rewards[log.context_ids, log.actions, 1]
  secondary = jax.random.bernoulli(secondary_key, secondary_probs)
  rewards = jnp.stack([log.rewards, secondary.astype(log.rewards.dtype)], axis=-1)
  return TwoRewardLog(log.context_ids, log.actions, rewards, log.logging_probs)


def simulate_logs(problem: TwoRewardProblem, *, keys: jax.Array, num_rounds: int) -> TwoRewardLog:
  """One log per key of keys [S] (a leading seed axis); log s equals simulate_log(keys[s]).

  Example:
    >>> problem = two_reward_problem(jax.random.key(0), num_actions=4, num_contexts=10)
    >>> keys = jax.random.split(jax.random.key(1), 3)
    >>> simulate_logs(problem, keys=keys, num_rounds=8).actions.shape
    (3, 8)
  """
  checks.check_key("keys", keys)
  checks.check_count("num_rounds", num_rounds)
  return jax.vmap(_simulate_log, in_axes=(None, 0, None))(problem, keys, num_rounds)


def constrained_batch(problem: TwoRewardProblem, log: TwoRewardLog) -> ConstrainedBatch:
  """The log as a `ConstrainedBatch` (contexts and reward models per round; any seed axes).

  Example:
    >>> problem = two_reward_problem(jax.random.key(0), num_actions=4, num_contexts=10)
    >>> log = simulate_log(problem, key=jax.random.key(1), num_rounds=8)
    >>> batch = constrained_batch(problem, log)
    >>> batch.contexts.shape, batch.reward_hat.shape
    ((8, 5), (8, 4, 2))
  """
  return ConstrainedBatch(problem.contexts[log.context_ids], log.actions, log.rewards,
                          log.logging_probs, problem.reward_hat[log.context_ids])
