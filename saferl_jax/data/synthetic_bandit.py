"""A synthetic contextual bandit with an exact policy value (floor 2).

In the spirit of Open Bandit Pipeline's SyntheticBanditDataset and the [OB]
paper's setup: Gaussian contexts, binary rewards with expected reward
q(x, a) = sigmoid(x . theta_a + b_a), and a softmax logging policy
pi0(a|x) = softmax(inverse_temperature * q(x, .)) (a negative inverse
temperature gives an adversarial logger that prefers bad actions).

Contexts are drawn uniformly from a fixed pool of `num_contexts` vectors, so the
value of any policy, V(pi) = mean_x sum_a pi(a|x) q(x, a), is exact rather than a
Monte Carlo estimate. A problem is fixed by its key; logs are drawn from it with
other keys, one seed per log, and `simulate_logs` runs thousands of seeds in one
vmapped call sharded over all devices.

References:
  Saito et al. Open Bandit Dataset and Pipeline. NeurIPS 2021 Datasets and Benchmarks. https://arxiv.org/abs/2008.07146
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. Optimal Baseline Corrections for Off-Policy Contextual Bandits. RecSys 2024. https://arxiv.org/abs/2405.05736
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks, ope
from saferl_jax.parallel import map_over_seeds


class BanditProblem(NamedTuple):
  """One synthetic problem; every array is indexed by context id in [0, num_contexts).

  Attributes:
    contexts: [m, d] the context pool, drawn uniformly per round.
    expected_rewards: [m, A] q(x, a), the probability of reward 1.
    logging_dist: [m, A] the logging policy.
    target_dist: [m, A] the target policy to evaluate.
    reward_hat: [m, A] an imperfect reward model (q plus Gaussian error, clipped to [0, 1]).
  """
  contexts: jax.Array
  expected_rewards: jax.Array
  logging_dist: jax.Array
  target_dist: jax.Array
  reward_hat: jax.Array


class BanditLog(NamedTuple):
  """A log of `num_rounds` rounds (a leading seed axis when simulated for many seeds)."""
  context_ids: jax.Array
  actions: jax.Array
  rewards: jax.Array
  logging_probs: jax.Array


def softmax_policy(expected_rewards: ArrayLike, inverse_temperature: float) -> jax.Array:
  """pi(a|x) = softmax(inverse_temperature * q(x, .)), shape [m, A]."""
  checks.check_real("inverse_temperature", inverse_temperature)
  return jax.nn.softmax(inverse_temperature * jnp.asarray(expected_rewards), axis=-1)


def policy_value(policy_dist: ArrayLike, expected_rewards: ArrayLike) -> jax.Array:
  """The exact value V(pi) = mean_x sum_a pi(a|x) q(x, a) over the context pool."""
  return jnp.mean(jnp.sum(jnp.asarray(policy_dist) * jnp.asarray(expected_rewards), axis=-1))


def make_problem(
    key: jax.Array,
    *,
    num_actions: int = 20,
    dim_context: int = 5,
    num_contexts: int = 1000,
    logger_inverse_temperature: float = 1.0,
    target_inverse_temperature: float = 10.0,
    reward_model_noise: float = 0.1,
) -> BanditProblem:
  """Draws a problem: context pool, reward function, logging and target policies, reward model.

  Args:
    key: PRNG key fixing the problem.
    num_actions: A.
    dim_context: d.
    num_contexts: size m of the context pool.
    logger_inverse_temperature: beta0 of the softmax logger (negative = adversarial).
    target_inverse_temperature: beta of the softmax target policy.
    reward_model_noise: standard deviation of the reward model's error.

  Example:
    >>> import jax
    >>> problem = make_problem(jax.random.key(0), num_actions=4, num_contexts=10)
    >>> problem.logging_dist.shape
    (10, 4)
  """
  checks.check_key("key", key)
  for name, value in (("num_actions", num_actions), ("dim_context", dim_context),
                      ("num_contexts", num_contexts)):
    checks.check_count(name, value)
  checks.check_real("logger_inverse_temperature", logger_inverse_temperature)
  checks.check_real("target_inverse_temperature", target_inverse_temperature)
  checks.check_real("reward_model_noise", reward_model_noise, low=0.0)
  context_key, theta_key, bias_key, model_key = jax.random.split(key, 4)
  contexts = jax.random.normal(context_key, (num_contexts, dim_context))
  theta = jax.random.normal(theta_key, (dim_context, num_actions)) / jnp.sqrt(dim_context)
  bias = jax.random.normal(bias_key, (num_actions,))
  expected_rewards = jax.nn.sigmoid(contexts @ theta + bias)
  model_error = reward_model_noise * jax.random.normal(model_key, expected_rewards.shape)
  return BanditProblem(
      contexts=contexts,
      expected_rewards=expected_rewards,
      logging_dist=softmax_policy(expected_rewards, logger_inverse_temperature),
      target_dist=softmax_policy(expected_rewards, target_inverse_temperature),
      reward_hat=jnp.clip(expected_rewards + model_error, 0.0, 1.0),
  )


def simulate_log(problem: BanditProblem, *, key: jax.Array, num_rounds: int) -> BanditLog:
  """Logs `num_rounds` rounds of the logging policy: context, action, Bernoulli reward, propensity.

  Actions are drawn by inverting the logging policy's CDF (one uniform per round).

  Args:
    problem: a `BanditProblem`.
    key: PRNG key; same key, same log.
    num_rounds: n, the rounds to log (static).

  Returns:
    A `BanditLog` of n rounds.

  Example:
    >>> import jax
    >>> problem = make_problem(jax.random.key(0), num_actions=4, num_contexts=10)
    >>> simulate_log(problem, key=jax.random.key(1), num_rounds=8).actions.shape
    (8,)
  """
  checks.check_key("key", key)
  checks.check_count("num_rounds", num_rounds)
  return _simulate_log(key, problem, num_rounds)


def _simulate_log(key: jax.Array, problem: BanditProblem, n: int) -> BanditLog:
  context_key, action_key, reward_key = jax.random.split(key, 3)
  num_contexts, num_actions = problem.logging_dist.shape
  context_ids = jax.random.randint(context_key, (n,), 0, num_contexts)
  cdf = jnp.cumsum(problem.logging_dist, axis=1)  # [m, A], once per problem
  u = jax.random.uniform(action_key, (n,)) * cdf[context_ids, -1]
  actions = jnp.minimum(_count_at_most(cdf, context_ids, u), num_actions - 1)
  logging_probs = problem.logging_dist[context_ids, actions]
  reward_probs = problem.expected_rewards[context_ids, actions]
  rewards = jax.random.bernoulli(reward_key, reward_probs).astype(reward_probs.dtype)
  return BanditLog(context_ids, actions, rewards, logging_probs)


def _count_at_most(cdf: jax.Array, rows: jax.Array, u: jax.Array) -> jax.Array:
  """sum_a [cdf[rows[i], a] <= u[i]] for every i, by a branchless binary search of each row.

  cdf [m, A] is nondecreasing along each row (a float cumsum of nonnegative terms is), so the
  count is the largest k in [0, A] with cdf[row, k - 1] <= u (k = 0 if none): it is built from
  the highest power of two down, one gather of [n] per bit, O(n log A) instead of the O(n A)
  comparison of gathered rows, and it gives the same integer.
  """
  num_actions = cdf.shape[1]
  flat = cdf.reshape(-1)
  base = rows * num_actions - 1  # flat index of cdf[row, k - 1] is base + k
  count = jnp.zeros_like(rows)
  step = 1 << (num_actions.bit_length() - 1)  # the highest power of two <= A
  while step:
    candidate = count + step
    fits = candidate <= num_actions
    value = flat[jnp.where(fits, base + candidate, 0)]
    count = jnp.where(fits & (value <= u), candidate, count)
    step >>= 1
  return count


def simulate_logs(problem: BanditProblem, *, keys: jax.Array, num_rounds: int) -> BanditLog:
  """One log of `num_rounds` rounds per key of keys [S], vmapped and sharded over devices.

  Log s equals `simulate_log(problem, key=keys[s], num_rounds=num_rounds)`.
  """
  checks.check_key("keys", keys)
  checks.check_count("num_rounds", num_rounds)
  return map_over_seeds(_simulate_log, keys, problem, n=num_rounds)


class EstimatorInputs(NamedTuple):
  """The arrays an `saferl_jax.ope` estimator takes, in its argument order (`sj.ope.dr(*inputs)`)."""
  rewards: jax.Array
  actions: jax.Array
  logging_probs: jax.Array
  target_dist: jax.Array
  reward_hat: jax.Array


def estimator_inputs(problem: BanditProblem, log: BanditLog) -> EstimatorInputs:
  """The log's rewards, actions and propensities with the target policy and reward model per round."""
  return EstimatorInputs(log.rewards, log.actions, log.logging_probs,
                         problem.target_dist[log.context_ids], problem.reward_hat[log.context_ids])


def logged_rounds(problem: BanditProblem, log: BanditLog) -> ope.LoggedRounds:
  """The log's per-round estimator terms, read from per-context arrays: O(n) work and memory.

  Equals `ope.logged_rounds(*estimator_inputs(problem, log))` to float tolerance without
  building its [n, A] target_dist and reward_hat rows:

      w_i = pi(a_i|x_i) / p_i,  qhat(x_i, a_i),  dm_i = dm(x_i),  dm(x) = sum_a pi(a|x) qhat(x, a),

  with dm(x) computed once per context [m] and every term gathered by the round's context id
  (and logged action). The problem's arrays are trusted (as `make_problem` builds them); only
  the shapes are checked.

  Args:
    problem: a `BanditProblem` with m contexts and A actions.
    log: a `BanditLog` of n rounds of that problem (1-d arrays; vmap over seeds).

  Returns:
    An `ope.LoggedRounds` of four [n] arrays, for the estimators of `ope.FROM_ROUNDS`.

  Example:
    >>> import jax
    >>> problem = make_problem(jax.random.key(0), num_actions=4, num_contexts=10)
    >>> log = simulate_log(problem, key=jax.random.key(1), num_rounds=8)
    >>> rounds = logged_rounds(problem, log)  # then e.g. ope.dr_from_rounds(rounds).value
    >>> rounds.dm.shape
    (8,)
  """
  shapes = {name: tuple(getattr(problem, name).shape) for name in BanditProblem._fields[1:]}
  if len(set(shapes.values())) != 1 or len(shapes["target_dist"]) != 2:
    raise ValueError(f"problem: expected [m, A] arrays of one shape, got {shapes}")
  for name in BanditLog._fields:
    checks.check_ndim(f"log.{name}", getattr(log, name), 1)
  checks.check_same_length(**{f"log.{name}": getattr(log, name) for name in BanditLog._fields})
  context_ids, actions = log.context_ids, log.actions
  dm_per_context = jnp.sum(problem.target_dist * problem.reward_hat, axis=1)  # [m]
  return ope.LoggedRounds(
      rewards=log.rewards,
      weights=problem.target_dist[context_ids, actions] / log.logging_probs,
      reward_hat_logged=problem.reward_hat[context_ids, actions],
      dm=dm_per_context[context_ids],
  )
