# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Safe deployment of a ranker learned from clicks
#
# A search engine ranks documents with a stochastic Plackett-Luce policy and logs what users
# click. Clicks are biased: users look at the top more than the bottom (position bias) and
# click the top even when it is not relevant (trust bias). We correct the clicks with IPS and
# DR estimators, learn a new ranker from them, and ask the question that matters before
# shipping it: could it be worse than what we have? [SAFE]'s risk-penalised objective and
# [PRPO]'s clipping answer it in two ways. `SAFERL_JAX_NOTEBOOK_QUICK=1` shrinks the run.

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax import cltr
from saferl_jax.cltr.learning import RankingData, relevance_data
from saferl_jax.data.click_logs import estimated_rewards, simulate_click_log
from saferl_jax.training.ranker import train_ranker
from saferl_jax.data import ltr
from saferl_jax.models.functional import as_functional
from saferl_jax.ranking import (LinearRanker, dcg_rank_weights, expected_metric_from_samples,
                                exposure_from_samples, sample_rankings)

QUICK = bool(os.environ.get("SAFERL_JAX_NOTEBOOK_QUICK"))

# %% [markdown]
# ## 1. Queries, a ranker, and the logging policy
#
# Synthetic queries with 10 to 20 candidate documents, 16 features each and graded labels
# 0..4 from a hidden nonlinear function. The logging policy is a linear Plackett-Luce ranker
# fitted by PL-Rank on the labels of only 3% of the training queries: decent, not great.

# %%
data = ltr.make_ltr_dataset(jax.random.key(0), num_queries=200 if QUICK else 500, max_docs=20,
                            min_docs=10, num_features=16)
train, _, test = ltr.split(data, key=jax.random.key(1))
test = ltr.take_queries(test, np.flatnonzero(np.asarray(test.labels.max(axis=1)) > 0))
rank_weights = dcg_rank_weights(5)  # exposure = expected DCG@5 weight of a document's rank
apply_fn, init_params = as_functional(LinearRanker(16, rngs=nnx.Rngs(0)))
optimizer = optax.adam(0.05)
steps = 40 if QUICK else 100


def ndcg(params):
  logits = apply_fn(params, test.features)
  return jnp.mean(expected_metric_from_samples(logits, test.labels, key=jax.random.key(9), k=5,
                                               num_samples=64, where=test.where).value)


few = max(1, round(0.03 * train.num_queries))
supervised, n_labelled = relevance_data(train.features[:few], train.labels[:few], train.where[:few])
logger = train_ranker(apply_fn, init_params, supervised, key=jax.random.key(2), objective="value",
                      num_sessions=n_labelled, rank_weights=rank_weights, steps=steps,
                      optimizer=optimizer, eval_every=steps).params
print(f"logging policy fitted on {few} queries: NDCG@5 {float(ndcg(logger)):.3f}")

# %% [markdown]
# ## 2. Logged clicks
#
# Users follow the trust-bias model of [SAFE]: P(click | d at rank k) = alpha_k R(d) + beta_k with
# R = label / 4. The log keeps, per query, the number of sessions and the clicks per document,
# plus the logger's policy-aware propensities rho(d) = E[alpha at d's rank] (what IPS divides by).

# %%
model = cltr.trust_bias(5)
logging_logits = apply_fn(logger, train.features)
num_sessions = 2_000
log = simulate_click_log(logging_logits, train.labels, model, key=jax.random.key(3),
                         num_sessions=num_sessions, where=train.where)
relevance = np.asarray(train.labels / 4)
shown = np.asarray(log.rho > 0) & (np.asarray(log.session_counts)[:, None] > 0)
ctr = np.asarray(log.click_counts) / np.maximum(np.asarray(log.session_counts), 1)[:, None]
print(f"{log.num_sessions} sessions; alpha = {np.round(np.asarray(model.alpha), 2)}, "
      f"beta = {np.round(np.asarray(model.beta), 2)}")
print(f"correlation of the raw click rate with relevance: {np.corrcoef(ctr[shown], relevance[shown])[0, 1]:.3f}")

# %% [markdown]
# ## 3. Correcting the clicks: IPS and DR
#
# IPS: Rhat(d) = (c(d) - betabar(d)) / rho(d), propensities clipped at 10 / sqrt(N) to bound the
# variance. DR adds a regression model fitted to the clicks (ridge on the features), which
# also covers documents the logger never showed, and shrinks the bias clipping leaves.

# %%
per_session = lambda rewards: np.asarray(rewards) / np.maximum(np.asarray(log.session_counts), 1)[:, None]  # noqa: E731
ips = estimated_rewards(log, estimator="ips")
dr = estimated_rewards(log, estimator="dr", features=train.features, where=train.where)
for name, rewards in (("IPS", ips), ("DR", dr)):
  error = per_session(rewards)[shown] - relevance[shown]
  print(f"{name}: mean error {error.mean():+.3f}, RMSE {np.sqrt((error**2).mean()):.3f} on displayed documents")

# %% [markdown]
# ## 4. Learning, with and without a safety margin
#
# Both learners start from the logging policy. DR maximises the estimated value; safe DR
# maximises the value minus lam sqrt(d2 / N), where d2 is the exposure divergence from the
# logging policy: it moves only as far as N sessions can vouch for. PRPO clips each document's
# exposure ratio to [0.8, 1.2]. Below is the true NDCG@5 on test queries: with 2,000 honest
# sessions DR's estimates are good enough, and the safety margins cost some of its gain.
# Section 5 shows what they buy.

# %%
logging_exposure = exposure_from_samples(
    sample_rankings(logging_logits, key=jax.random.key(4), where=train.where, sample_shape=4_000,
                    k=5),
    rank_weights, train.features.shape[1], where=train.where)
learned = {}
for method, objective in (("DR", "value"), ("safe DR", "safe"), ("PRPO", "prpo")):
  ranking_data = RankingData(train.features, train.where, dr, log.session_counts, logging_exposure)
  learned[method] = train_ranker(apply_fn, logger, ranking_data, key=jax.random.key(5),
                                 objective=objective, num_sessions=num_sessions,
                                 rank_weights=rank_weights, steps=steps, optimizer=optimizer,
                                 eval_every=steps).params
  print(f"{method:8s} NDCG@5 {float(ndcg(learned[method])):.3f}")

# %% [markdown]
# ## 5. When clicks lie
#
# An adversarial user flips every click probability p to 1 - p. The estimators are still told
# the trust-bias parameters, so nothing in the log reveals the flip. DR happily learns the
# reverse of relevance. The [SAFE] bound assumes the click model is right, so its penalty only
# slows the damage. PRPO's clipping limits how far each document's exposure is pushed from the
# logger's, whatever the clicks say, so it loses the least.

# %%
bad_log = simulate_click_log(logging_logits, train.labels, cltr.adversarial(model),
                             key=jax.random.key(6), num_sessions=num_sessions, where=train.where)
bad_dr = estimated_rewards(bad_log, estimator="dr", features=train.features, where=train.where)
print(f"logging policy NDCG@5 {float(ndcg(logger)):.3f}")
for method, objective in (("DR", "value"), ("safe DR", "safe"), ("PRPO", "prpo")):
  ranking_data = RankingData(train.features, train.where, bad_dr, bad_log.session_counts,
                             logging_exposure)
  params = train_ranker(apply_fn, logger, ranking_data, key=jax.random.key(7), objective=objective,
                        num_sessions=num_sessions, rank_weights=rank_weights, steps=steps,
                        optimizer=optimizer, eval_every=steps).params
  print(f"{method:8s} NDCG@5 {float(ndcg(params)):.3f} under adversarial clicks")

# %% [markdown]
# `saferl-jax cltr --quick --out DIR` runs this comparison for IPS, DR, safe IPS, safe DR and
# PRPO over N from 1e2 to 1e5 with several seeds, and plots NDCG@5 against N.
#
# References: [SAFE] Gupta, Oosterhuis, de Rijke, SIGIR 2023, https://arxiv.org/abs/2305.01522;
# [PRPO] Gupta, Oosterhuis, de Rijke, CIKM 2024, https://arxiv.org/abs/2407.19943.
