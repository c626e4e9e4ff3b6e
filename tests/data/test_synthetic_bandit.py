"""The synthetic bandit: exact values, logging frequencies, reproducibility, vmap and sharding."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.data import synthetic_bandit as sb


@pytest.fixture(scope="module")
def problem():
  return sb.make_problem(jax.random.key(3), num_actions=4, num_contexts=5,
                         logger_inverse_temperature=-2.0)


@pytest.mark.slow
def test_policy_value_is_the_exact_mean(problem):
  q = np.asarray(problem.expected_rewards, np.float64)
  pi = np.asarray(problem.target_dist, np.float64)
  expected = np.mean([sum(pi[x, a] * q[x, a] for a in range(4)) for x in range(5)])
  assert float(sb.policy_value(problem.target_dist, problem.expected_rewards)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_adversarial_logger_prefers_bad_actions(problem):
  logging_value = sb.policy_value(problem.logging_dist, problem.expected_rewards)
  uniform_value = jnp.mean(problem.expected_rewards)
  assert logging_value < uniform_value


@pytest.mark.slow
def test_log_frequencies_match_the_logging_policy(problem):
  n = 200_000
  log = sb.simulate_log(problem, key=jax.random.key(0), num_rounds=n)
  counts = np.zeros((5, 4))
  np.add.at(counts, (np.asarray(log.context_ids), np.asarray(log.actions)), 1)
  expected = np.asarray(problem.logging_dist, np.float64) * counts.sum(1, keepdims=True)
  chi2 = np.sum((counts - expected) ** 2 / expected)
  df = 5 * 3
  assert abs(chi2 - df) < 5 * np.sqrt(2 * df)  # chi-square mean df, std sqrt(2 df)
  np.testing.assert_allclose(log.logging_probs, problem.logging_dist[log.context_ids, log.actions])
  # Rewards are Bernoulli(q): the mean reward matches the mean of q within 5 standard errors.
  q = np.asarray(problem.expected_rewards[log.context_ids, log.actions])
  assert abs(np.mean(log.rewards) - q.mean()) < 5 * np.sqrt(np.mean(q * (1 - q)) / n)


@pytest.mark.slow
def test_same_key_same_log_and_vmap_equals_loop(problem):
  keys = jax.random.split(jax.random.key(1), 3)
  batched = sb.simulate_logs(problem, keys=keys, num_rounds=50)
  for i, key in enumerate(keys):
    single = sb.simulate_log(problem, key=key, num_rounds=50)
    for a, b in zip(single, batched):
      np.testing.assert_array_equal(a, b[i])
  again = sb.simulate_logs(problem, keys=keys, num_rounds=50)
  np.testing.assert_array_equal(again.actions, batched.actions)


@pytest.mark.slow
def test_estimator_inputs_feed_the_estimators(problem):
  from saferl_jax import ope
  log = sb.simulate_log(problem, key=jax.random.key(2), num_rounds=100)
  estimate = ope.dr(*sb.estimator_inputs(problem, log))
  assert np.isfinite(estimate.value)


def _old_simulate_log(key, problem, n):
  """The simulation as it was before the O(n log A) search: gathered [n, A] logging rows, their
  cumsum per round and sum(cdf <= u). The new one must give the same log, bit for bit."""
  context_key, action_key, reward_key = jax.random.split(key, 3)
  num_contexts, num_actions = problem.logging_dist.shape
  context_ids = jax.random.randint(context_key, (n,), 0, num_contexts)
  logging_rows = problem.logging_dist[context_ids]
  cdf = jnp.cumsum(logging_rows, axis=1)
  u = jax.random.uniform(action_key, (n, 1)) * cdf[:, -1:]
  actions = jnp.minimum(jnp.sum(cdf <= u, axis=1), num_actions - 1)
  logging_probs = jnp.take_along_axis(logging_rows, actions[:, None], axis=1)[:, 0]
  reward_probs = problem.expected_rewards[context_ids, actions]
  rewards = jax.random.bernoulli(reward_key, reward_probs).astype(reward_probs.dtype)
  return sb.BanditLog(context_ids, actions, rewards, logging_probs)


# A = 1, powers of two and not, a logger so peaked (beta0 = 300) that most actions have
# probability exactly 0 (flat stretches of the CDF, where ties decide the action).
@pytest.mark.parametrize("num_actions, temperature",
                         [(7, 300.0), (1, 1.0), (4, -2.0), (64, 1.0), (100, 5.0)])
@pytest.mark.slow
def test_simulated_log_is_bit_identical_to_the_gathered_cdf_formula(num_actions, temperature):
  problem = sb.make_problem(jax.random.key(num_actions), num_actions=num_actions, num_contexts=20,
                            logger_inverse_temperature=temperature)
  new = jax.jit(sb._simulate_log, static_argnums=2)
  old = jax.jit(_old_simulate_log, static_argnums=2)
  for seed in range(2):
    for a, b in zip(old(jax.random.key(seed), problem, 2_000), new(jax.random.key(seed), problem, 2_000)):
      np.testing.assert_array_equal(a, b)


def test_binary_search_counts_the_cdf_entries_at_most_u():
  # Integer-valued CDFs with repeats (ties) and u on, between, below and above the entries.
  rng = np.random.default_rng(0)
  for num_actions in (1, 2, 3, 8, 13):
    cdf = np.cumsum(rng.integers(0, 3, size=(6, num_actions)), axis=1).astype(np.float32)
    rows = rng.integers(0, 6, size=400)
    u = rng.integers(-1, 2 * num_actions + 2, size=400) / 2
    got = sb._count_at_most(jnp.asarray(cdf), jnp.asarray(rows), jnp.asarray(u, jnp.float32))
    np.testing.assert_array_equal(got, np.sum(cdf[rows] <= u[:, None], axis=1))


@pytest.mark.slow
def test_logged_rounds_equal_the_reduction_of_the_gathered_inputs():
  from saferl_jax import ope
  problem = sb.make_problem(jax.random.key(5), num_actions=6, num_contexts=30,
                            logger_inverse_temperature=-1.0)
  log = sb.simulate_log(problem, key=jax.random.key(0), num_rounds=2_000)
  want = ope.logged_rounds(*sb.estimator_inputs(problem, log))
  got = sb.logged_rounds(problem, log)
  assert isinstance(got, ope.LoggedRounds)
  for name in ope.LoggedRounds._fields:  # float32: the dm sums over A may round differently
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-7,
                               err_msg=name)
  np.testing.assert_array_equal(got.weights, want.weights)  # one gather and one division, as before


@pytest.mark.slow
def test_logged_rounds_vmapped_over_seeds_equal_a_loop(problem):
  # seed-vmapped and jitted, as the variance study uses it
  keys = jax.random.split(jax.random.key(1), 3)
  batched = jax.jit(jax.vmap(lambda k: sb.logged_rounds(problem, sb._simulate_log(k, problem, 50))))(keys)
  for i, key in enumerate(keys):
    single = sb.logged_rounds(problem, sb.simulate_log(problem, key=key, num_rounds=50))
    for name, column in zip(single._fields, single):
      np.testing.assert_allclose(getattr(batched, name)[i], column, rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_logged_rounds_reject_a_seed_batched_log(problem):
  logs = sb.simulate_logs(problem, keys=jax.random.split(jax.random.key(0), 2), num_rounds=4)
  with pytest.raises(ValueError, match="log.context_ids"):
    sb.logged_rounds(problem, logs)
  log = sb.simulate_log(problem, key=jax.random.key(0), num_rounds=4)
  with pytest.raises(ValueError, match="log.rewards"):
    sb.logged_rounds(problem, log._replace(rewards=log.rewards[:3]))
  with pytest.raises(ValueError, match="problem"):
    sb.logged_rounds(problem._replace(reward_hat=problem.reward_hat[:, :2]), log)


def test_bad_problem_arguments_raise():
  with pytest.raises(ValueError, match="num_actions"):
    sb.make_problem(jax.random.key(0), num_actions=0)
  with pytest.raises(ValueError, match="reward_model_noise"):
    sb.make_problem(jax.random.key(0), reward_model_noise=-1.0)


SHARDING_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    from saferl_jax.data import synthetic_bandit as sb
    problem = sb.make_problem(jax.random.key(3), num_actions=4, num_contexts=5)
    keys = jax.random.split(jax.random.key(1), 16)
    logs = sb.simulate_logs(problem, keys=keys, num_rounds=32)
    loop = np.stack([np.asarray(sb.simulate_log(problem, key=k, num_rounds=32).rewards) for k in keys])
    print(json.dumps({
        "devices": jax.device_count(),
        "shards": len(logs.rewards.sharding.device_set),
        "equal": bool(np.array_equal(np.asarray(logs.rewards), loop)),
    }))
""")


@pytest.mark.slow
def test_seed_axis_is_sharded_over_eight_devices(run_on_cpu_devices):
  result = run_on_cpu_devices(SHARDING_SCRIPT)
  assert result == {"devices": 8, "shards": 8, "equal": True}
