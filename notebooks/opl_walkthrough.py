# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Learning a policy from logged bandit feedback, and deciding whether to deploy it
#
# A logging policy chose actions; we logged the contexts, actions, rewards and propensities. We
# learn a new softmax policy from that log with baseline-corrected policy gradients [OB], look
# at why the baseline matters (gradient variance), and only deploy the result if a
# high-confidence lower bound on its value, from held-out logs, beats the logging policy.
# `SAFERL_JAX_NOTEBOOK_QUICK=1` shrinks the run (the tests run it that way).

# %%
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from saferl_jax import data, ope, opl

QUICK = bool(os.environ.get("SAFERL_JAX_NOTEBOOK_QUICK"))

# %% [markdown]
# ## 1. Logged data
#
# A synthetic problem in the [OB] setup: 5-dimensional contexts, binary rewards, 50 actions
# and a logger that prefers bad actions (negative inverse temperature). The simulator knows
# the exact value of any policy, so we can check what learning achieves.

# %%
problem = data.make_problem(jax.random.key(0), num_actions=50, logger_inverse_temperature=-1.0)
n = 2_000 if QUICK else 10_000
train_log, holdout_log = (data.simulate_log(problem, key=k, num_rounds=n)
                          for k in jax.random.split(jax.random.key(1)))


def as_batch(log):
  return opl.logged_batch(problem.contexts[log.context_ids], log.actions, log.rewards,
                          log.logging_probs)


train, holdout = as_batch(train_log), as_batch(holdout_log)
logging_value = data.policy_value(problem.logging_dist, problem.expected_rewards)
print(f"logging policy value {float(logging_value):.3f}, "
      f"best possible {float(problem.expected_rewards.max(1).mean()):.3f}")

# %% [markdown]
# ## 2. A policy and the gradient of its value
#
# `LinearPolicy` is a Flax NNX module; `as_functional` turns it into a pure
# `apply_fn(params, contexts)` that the objectives and the training loop take. The
# baseline-corrected gradient mean_i (r_i - beta) grad w_i is unbiased for any fixed beta; the
# baseline changes only its variance. Here is that variance on the whole log, at the initial
# parameters, for beta = 0 (IPS), the value-optimal beta* and the gradient-optimal beta*_grad.

# %%
apply_fn, params = opl.as_functional(opl.LinearPolicy(5, 50, rngs=nnx.Rngs(0)))
per_example = opl.per_example_weight_gradients(apply_fn, params, train)
log_probs = opl.logged_log_probs(apply_fn, params, train.contexts, train.actions)
baselines = {
    "IPS (beta = 0)": 0.0,
    "value-optimal beta*": opl.value_optimal_baseline(log_probs, train.rewards, train.logging_probs),
    "gradient-optimal beta*_grad": opl.gradient_optimal_baseline(train.rewards, per_example),
}
for name, beta in baselines.items():
  variance = opl.gradient_variance(train.rewards, per_example, beta)
  print(f"{name:28s} beta = {float(beta):.3f}  gradient variance = {float(variance):.3g}")

# %% [markdown]
# ## 3. Training, several seeds at once
#
# `opl.train` runs jit-compiled optax epochs for a stack of seeds in one vmapped call (sharded
# over devices when there are several) and records the true value after every epoch through
# `evaluate`. With `checkpoint_path` it saves after each epoch and resumes where it stopped.

# %%
seeds = 3
init = jax.vmap(lambda k: opl.as_functional(opl.LinearPolicy(5, 50, rngs=nnx.Rngs(params=k)))[1])(
    jax.random.split(jax.random.key(2), seeds))
stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (seeds,) + x.shape), train)


def evaluate(params):
  dist = jax.nn.softmax(apply_fn(params, problem.contexts))
  return {"value": data.policy_value(dist, problem.expected_rewards)}


optimizer = optax.adam(0.05)
results = {}
for method in ("ips", "beta_grad"):
  results[method] = opl.train(apply_fn, init, stacked, key=jax.random.split(jax.random.key(3), seeds),
                              method=method, epochs=5 if QUICK else 20, batch_size=250,
                              optimizer=optimizer, evaluate=evaluate)
  curve = results[method].history["value"].mean(axis=1)
  print(f"{method:10s} value by epoch: " + " ".join(f"{v:.3f}" for v in curve))

# %% [markdown]
# ## 4. Deploy or not?
#
# The decision uses held-out logs the learner never saw: estimate the learned policy's value
# with beta*-IPS, take a 97.5% lower bound, and deploy only if it beats a 97.5% upper bound on
# the logging policy's value (so an equally good policy is deployed at most 5% of the time).

# %%
learned = jax.tree_util.tree_map(lambda x: x[0], results["beta_grad"].params)
target_dist = jax.nn.softmax(apply_fn(learned, holdout.contexts))
estimate = ope.beta_ips(holdout.rewards, holdout.actions, holdout.logging_probs, target_dist)
decision = ope.improves_on_logging(estimate, holdout.rewards)
print(f"estimated value {float(estimate.value):.3f} +- {float(estimate.stderr):.3f}; "
      f"lower bound {float(decision.lower_bound):.3f} vs logging upper bound "
      f"{float(decision.baseline_value):.3f}: deploy = {bool(decision.deploy)}")
print(f"true value of the learned policy: {float(evaluate(learned)['value']):.3f}")
