# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Evaluating a policy from logged bandit data with saferl_jax
#
# This walk-through evaluates a new policy on the Open Bandit Dataset sample that ships with
# saferl_jax, reads the confidence intervals, makes a deploy / don't-deploy decision, and then
# reads the variance study that compares the estimators. Open it in Jupyter with
# `jupytext --to notebook notebooks/ope_walkthrough.py`, or run it as a script.
# `SAFERL_JAX_NOTEBOOK_QUICK=1` shrinks the simulations (the tests run it that way).

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np

from saferl_jax import data, ope, stats
from saferl_jax.experiments import ope_report, ope_variance

QUICK = bool(os.environ.get("SAFERL_JAX_NOTEBOOK_QUICK"))

# %% [markdown]
# ## 1. The logged data
#
# The BTS log: 10,000 rounds in which Bernoulli Thompson Sampling chose one of 80 fashion items
# for each of 3 slots. Each round records the item (action), the click (reward) and the
# probability the logger gave that item in that slot (the propensity).

# %%
bts = data.load_obd(behavior_policy="bts")
random_log = data.load_obd(behavior_policy="random")
print(f"{len(bts.rewards)} rounds, {bts.num_actions} items, click rate {bts.rewards.mean():.4f}")
print(f"propensities from {bts.logging_probs.min():.2g} to {bts.logging_probs.max():.2g}")

# %% [markdown]
# ## 2. A target policy and a reward model
#
# We evaluate the uniform random policy, whose true value we can check: it is the mean click of
# the random log. OBD shows 3 slots at once, and a propensity is the logger's probability of the
# item at the round's slot, so a target policy gives a distribution per slot: `target_dist` is
# [n, A, L] and `positions` says which slot round i used (Open Bandit Pipeline's convention).
# DM and DR also need a reward model: `ope.cross_fit_reward_model` fits a logistic regression
# over context x item x slot on one fold and predicts the other, so no round's own click enters
# its prediction.

# %%
n, num_items, num_slots = len(bts.rewards), bts.num_actions, bts.num_positions
target_dist = jnp.full((n, num_items, num_slots), 1.0 / num_items)
fit = ope.cross_fit_reward_model(bts.contexts, bts.actions, bts.rewards, num_actions=num_items,
                                 positions=bts.positions, num_positions=num_slots,
                                 key=jax.random.key(0), l2=100.0)
reward_hat = fit.reward_hat  # [n, A, L], out of fold
truth = random_log.rewards.mean()

# %% [markdown]
# ## 3. Estimates, standard errors and weight diagnostics
#
# `ope.evaluate` reduces the arrays once, applies several estimators and returns a `Report`:
# each estimate with its standard error (delta method for the self-normalised ones), a 95%
# interval and the weights' diagnostics. Switch-DR's tau is chosen from the data by SLOPE
# (`ope.tune`). `saferl_jax.experiments.ope_report` renders a report as a table or a plot.

# %%
tau = ope.tune(bts.rewards, bts.actions, bts.logging_probs, target_dist, reward_hat,
               positions=bts.positions, estimator="switch_dr", method="slope").best
report = ope.evaluate(bts.rewards, bts.actions, bts.logging_probs, target_dist, reward_hat,
                      positions=bts.positions,
                      estimators=("ips", "snips", "dm", "dr", "sndr", "beta_ips", "switch_dr"),
                      options={"switch_dr": {"tau": float(tau)}})
print(ope_report.report_markdown(report, true_value=truth))

# %% [markdown]
# An effective sample size of a few hundred out of 10,000 rounds says most of the data carries
# little information about the uniform policy: intervals will be wide. The mean weight near 1
# says the propensities are consistent.
#
# ## 4. Confidence intervals and the bootstrap
#
# Intervals act on the contributions; the bootstrap recomputes the estimator (here SNIPS, with
# its normalisation) on each of 1000 resamples, all in one compiled call.

# %%
rounds = ope.logged_rounds(bts.rewards, bts.actions, bts.logging_probs, target_dist, reward_hat,
                           positions=bts.positions)
snips = ope.snips_from_rounds(rounds)
print("t interval        ", stats.confidence_interval(snips.per_sample, method="t"))
print("bootstrap interval", ope.estimator_bootstrap_interval(
    ope.snips_from_rounds, rounds, key=jax.random.key(0), num_resamples=1000))

# %% [markdown]
# ## 5. Deploy or not?
#
# A safe policy improvement test deploys the uniform policy only if a 95% lower bound on its
# value beats the logging policy's own click rate. Thompson sampling clicks more than uniform
# play, so the answer is no.

# %%
decision = ope.improves_on_logging(ope.beta_ips_from_rounds(rounds), bts.rewards, delta=0.05)
print(decision)

# %% [markdown]
# ## 6. The estimators inside your own jitted code
#
# All estimators are pure functions of arrays: jit them, vmap them over thousands of simulated
# datasets, or differentiate them. Here 1000 synthetic logs of 1000 rounds with an adversarial
# logger, simulated and evaluated in one call.

# %%
problem = data.make_problem(jax.random.key(0), num_actions=25, logger_inverse_temperature=-5.0)
true_value = data.policy_value(problem.target_dist, problem.expected_rewards)
seeds = 200 if QUICK else 1000
logs = data.simulate_logs(problem, keys=jax.random.split(jax.random.key(1), seeds), num_rounds=1000)


@jax.jit
@jax.vmap
def ips_and_beta_ips(rewards, actions, logging_probs, target_dist, reward_hat):
  return (ope.ips(rewards, actions, logging_probs, target_dist).value,
          ope.beta_ips(rewards, actions, logging_probs, target_dist).value)


ips_values, beta_values = ips_and_beta_ips(*data.estimator_inputs(problem, logs))
for name, values in (("IPS", ips_values), ("beta*-IPS", beta_values)):
  print(f"{name:10s} bias {float(values.mean() - true_value):+.4f}  "
        f"MSE {float(jnp.mean((values - true_value) ** 2)):.5f}")

# %% [markdown]
# ## 7. Reading the variance study
#
# `saferl-jax ope-variance --quick --out DIR` (or `saferl-jax demo`) runs the full comparison:
# for each logger and sample size, hundreds of seeds, every estimator's bias, variance and MSE
# against the exact value. Here a small version of it:

# %%
config = ope_variance.Config(logger_inverse_temperatures=(-5.0, 5.0), sample_sizes=(100, 1000),
                             num_seeds=50 if QUICK else 200)
results = ope_variance.run("notebook_ope_variance", config)
print(ope_variance.summary(results))

# %% [markdown]
# Read each row as: how much smaller each estimator's MSE is than IPS's at the largest n. The
# baseline correction (beta_ips) removes most of IPS's variance without a reward model and,
# unlike SNIPS, with an adversarial logger it does not pay for the normalisation's bias. The
# plot `notebook_ope_variance/mse.png` shows MSE against n on log-log axes: parallel lines with
# slope -1 are unbiased estimators; an estimator whose line flattens has bias that does not
# vanish (DM with an imperfect reward model).
