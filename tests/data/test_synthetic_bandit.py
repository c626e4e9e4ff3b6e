"""The synthetic bandit: exact values, logging frequencies, reproducibility, vmap and sharding."""

import json
import os
import subprocess
import sys
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
def test_seed_axis_is_sharded_over_eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, capture_output=True,
                       text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == {"devices": 8, "shards": 8, "equal": True}
