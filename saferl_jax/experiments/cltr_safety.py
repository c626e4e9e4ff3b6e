"""Safe counterfactual learning to rank from clicks, after [SAFE] and [PRPO] (floor 3).

A logging policy (a linear Plackett-Luce ranker fitted on the labels of a few percent of the
training queries) shows top-5 lists to simulated users whose clicks follow the trust-bias model,
or an adversarial one that flips every click probability (the estimators are told the
trust-bias parameters, so the flip is what they cannot explain). From N logged sessions, five
methods learn a ranker of the same form, each starting from the logging policy:

  ips, dr     the plain IPS or DR value estimate (clipped propensities, 10 / sqrt(N))
  safe_ips,   [SAFE]'s objective: the estimate minus lam sqrt(d2 / N), d2 the exposure divergence
  safe_dr     from the logging policy (delta = 0.05)
  prpo        [PRPO]'s clipped surrogate of exposure ratios, on DR rewards

and is scored by its expected NDCG@5 on held-out test queries (true labels), for several seeds
(a fresh click log each) and N from 1e2 upward.

Claims checked: with few sessions safe DR and PRPO stay at or above the logging policy while
IPS/DR can fall below it; with many sessions safe DR clearly beats the logging policy and
approaches DR; under adversarial clicks PRPO stays safe.

References:
  [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with
  Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
  [PRPO] Gupta, Oosterhuis, de Rijke. Practical and Robust Safety Guarantees for Advanced
  Counterfactual Learning to Rank. CIKM 2024. https://arxiv.org/abs/2407.19943
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax import stats
from saferl_jax.cltr import adversarial, trust_bias
from saferl_jax.cltr.learning import RankingData, relevance_data
from saferl_jax.data.click_logs import estimated_rewards, simulate_click_log
from saferl_jax.training.ranker import train_ranker
from saferl_jax.data import ltr
from saferl_jax.experiments.common import (Checkpoint, finish, markdown_table, plot_curve,
                                           progress, pyplot)
from saferl_jax.models.functional import as_functional
from saferl_jax.ranking import (LinearRanker, dcg_rank_weights, expected_metric_from_samples,
                                exposure_from_samples, sample_rankings)

# method -> (reward estimator, objective)
METHODS = {"ips": ("ips", "value"), "dr": ("dr", "value"), "safe_ips": ("ips", "safe"),
           "safe_dr": ("dr", "safe"), "prpo": ("dr", "prpo")}
LABELS = {"ips": "IPS", "dr": "DR", "safe_ips": "safe IPS", "safe_dr": "safe DR", "prpo": "PRPO"}
CLICK_MODELS = ("trust_bias", "adversarial")


@dataclasses.dataclass(frozen=True)
class Config:
  num_queries: int = 500          # synthetic queries, split 60/20/20 into train/validation/test
  max_docs: int = 20
  min_docs: int = 10
  num_features: int = 16
  displayed: int = 5              # K: the top-K shown to users, and NDCG@K
  logger_fraction: float = 0.03   # share of training queries whose labels fit the logging policy
  logger_steps: int = 100
  sessions: tuple[int, ...] = (100, 1_000, 10_000, 100_000)
  num_seeds: int = 3
  steps: int = 100
  learning_rate: float = 0.05
  num_samples: int = 16           # rankings per query and step for PL-Rank
  delta: float = 0.05
  clip_range: tuple[float, float] = (0.8, 1.2)
  eval_samples: int = 64
  seed: int = 0


QUICK = Config()
FULL = Config(num_queries=5_000, sessions=(100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000),
              num_seeds=10, steps=300, num_samples=32, logger_steps=300)


def _click_model(name: str, displayed: int):
  honest = trust_bias(displayed)
  return honest if name == "trust_bias" else adversarial(honest)


def _load(config: Config, data_path: Path | None):
  """(train, test) queries: synthetic by default, else a LETOR file split 60/20/20 by query."""
  key = jax.random.key(config.seed)
  if data_path is None:
    data = ltr.make_ltr_dataset(key, num_queries=config.num_queries, max_docs=config.max_docs,
                                min_docs=config.min_docs, num_features=config.num_features)
  else:
    data = ltr.load_letor(data_path, max_docs=config.max_docs)
  train, _, test = ltr.split(data, key=jax.random.fold_in(key, 1))
  # Queries without a relevant document have no NDCG; they are left out of the test set.
  test = ltr.take_queries(test, np.flatnonzero(np.asarray(test.labels.max(axis=1)) > 0))
  if test.num_queries == 0:
    raise ValueError("data: no test query has a relevant document")
  return train, test


def run(out: Path, config: Config = QUICK, *, data_path: Path | None = None) -> dict:
  """Runs every (click model, N) cell, writes DIR/results.json, cltr.png and summary.md."""
  out = Path(out)
  train, test = _load(config, data_path)
  num_features = train.features.shape[-1]
  rank_weights = dcg_rank_weights(config.displayed)
  apply_fn, init_params = as_functional(LinearRanker(num_features, rngs=nnx.Rngs(config.seed)))
  optimizer = optax.adam(config.learning_rate)
  eval_key = jax.random.key(config.seed + 1)  # common random numbers for every policy

  def evaluate(params):
    logits = apply_fn(params, test.features)
    ndcg = expected_metric_from_samples(logits, test.labels, key=eval_key, k=config.displayed,
                                        num_samples=config.eval_samples, where=test.where)
    return {"ndcg": jnp.mean(ndcg.value)}

  # The logging policy: supervised PL-Rank on the labels of a few training queries.
  n_logger = max(1, int(round(config.logger_fraction * train.num_queries)))
  supervised, n_sup = relevance_data(train.features[:n_logger], train.labels[:n_logger],
                                     train.where[:n_logger])
  logger = train_ranker(apply_fn, init_params, supervised, key=jax.random.key(config.seed + 2),
                        objective="value", num_sessions=n_sup, rank_weights=rank_weights,
                        steps=config.logger_steps, optimizer=optimizer, evaluate=evaluate,
                        eval_every=config.logger_steps).params
  logging_ndcg = float(evaluate(logger)["ndcg"])
  logging_logits = apply_fn(logger, train.features)
  logging_exposure = exposure_from_samples(
      sample_rankings(logging_logits, key=jax.random.key(config.seed + 3), where=train.where,
                      sample_shape=10_000, k=config.displayed),
      rank_weights, train.features.shape[1], where=train.where)

  seeds = config.num_seeds
  seed_params = jax.tree_util.tree_map(lambda x: jnp.stack([x] * seeds), logger)
  checkpoint = Checkpoint(out, {**dataclasses.asdict(config), "data": str(data_path)})
  cells = [(m, n) for m in CLICK_MODELS for n in config.sessions]
  for model_name, num_sessions in progress(cells, "cltr cells"):
    cell = f"{model_name}/{num_sessions}"
    if cell in checkpoint:
      continue
    click_model = _click_model(model_name, config.displayed)
    log_key = jax.random.fold_in(jax.random.key(config.seed + 4), num_sessions)
    logs = [simulate_click_log(logging_logits, train.labels, click_model,
                               key=jax.random.fold_in(log_key, seed), num_sessions=num_sessions,
                               where=train.where)
            for seed in range(seeds)]
    rewards = {estimator: jnp.stack([estimated_rewards(
        log, estimator=estimator, features=train.features, where=train.where) for log in logs])
        for estimator in ("ips", "dr")}
    counts = jnp.stack([log.session_counts for log in logs])
    keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed + 5), num_sessions), seeds)
    finals = {}
    for method, (estimator, objective) in METHODS.items():
      data = RankingData(*(jnp.stack([x] * seeds) for x in (train.features, train.where)),
                         rewards[estimator], counts, jnp.stack([logging_exposure] * seeds))
      result = train_ranker(apply_fn, seed_params, data, key=keys, objective=objective,
                            num_sessions=num_sessions, rank_weights=rank_weights,
                            steps=config.steps, optimizer=optimizer,
                            num_samples=config.num_samples, delta=config.delta,
                            clip_low=config.clip_range[0], clip_high=config.clip_range[1],
                            evaluate=evaluate, eval_every=config.steps)
      finals[method] = np.asarray(result.history["ndcg"][-1]).tolist()
    checkpoint.save(cell, finals)

  click_models = {}
  for model_name in CLICK_MODELS:
    methods = {}
    for method in METHODS:
      per_n = [np.asarray(checkpoint[f"{model_name}/{n}"][method]) for n in config.sessions]
      intervals = [stats.confidence_interval(v, method="t") if len(v) > 1 else None for v in per_n]
      methods[method] = {
          "ndcg_mean": [float(v.mean()) for v in per_n],
          "ndcg_ci": [[float(i.lower), float(i.upper)] if i is not None else [float(v.mean())] * 2
                      for i, v in zip(intervals, per_n)],
          "ndcg_per_seed": [v.tolist() for v in per_n],
      }
    click_models[model_name] = {"num_sessions": list(config.sessions), "methods": methods}
  results = {
      "config": dataclasses.asdict(config),
      "data": "synthetic" if data_path is None else str(data_path),
      "logging_ndcg": logging_ndcg,
      "logger_queries": n_logger,
      "click_models": click_models,
  }
  results["claims"] = _claims(results)
  return finish(out, results, _plot, summary)


def _claims(results: dict) -> dict:
  """The papers' claims, judged per seed (the worst one: safety is about every deployment) and
  on the means and CIs."""
  logging = results["logging_ndcg"]
  trust = results["click_models"]["trust_bias"]["methods"]
  adv = results["click_models"]["adversarial"]["methods"]

  def worst(methods, method, index):
    return min(methods[method]["ndcg_per_seed"][index])

  few, many = 0, -1
  return {
      "few_sessions_worst_seed": {m: worst(trust, m, few) for m in trust},
      "few_sessions_safe_dr_and_prpo_not_below_logging":
          min(worst(trust, "safe_dr", few), worst(trust, "prpo", few)) >= logging,
      "few_sessions_ips_or_dr_below_logging":
          min(worst(trust, "ips", few), worst(trust, "dr", few)) < logging,
      "many_sessions_safe_dr_ci_above_logging": trust["safe_dr"]["ndcg_ci"][many][0] > logging,
      "many_sessions_safe_dr_minus_dr":
          trust["safe_dr"]["ndcg_mean"][many] - trust["dr"]["ndcg_mean"][many],
      "adversarial_worst_drop": {m: logging - min(min(seeds) for seeds in adv[m]["ndcg_per_seed"])
                                 for m in adv},
  }


def _plot(results: dict, out: Path) -> None:
  plt = pyplot()
  fig, axes = plt.subplots(1, len(CLICK_MODELS), figsize=(11, 3.8), sharey=True)
  for axis, model_name in zip(axes, CLICK_MODELS):
    cell = results["click_models"][model_name]
    sessions = cell["num_sessions"]
    for method, curve in cell["methods"].items():
      plot_curve(axis, sessions, curve["ndcg_mean"], curve["ndcg_ci"], LABELS[method], marker="o",
                 markersize=3)
    axis.axhline(results["logging_ndcg"], color="gray", linestyle="--", label="logging policy")
    axis.set_xscale("log")
    axis.set_xlabel("logged sessions N")
    axis.set_title(model_name.replace("_", " ") + " clicks")
  axes[0].set_ylabel("NDCG@5 on test queries")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "cltr.png", dpi=120)
  plt.close(fig)


def summary(results: dict) -> str:
  config = results["config"]
  parts = [f"## Safe counterfactual LTR ({config['num_seeds']} seeds, {results['data']} data, "
           f"logging policy fitted on {results['logger_queries']} queries)\n",
           f"Logging policy NDCG@5: {results['logging_ndcg']:.4f}.\n"]
  for model_name, cell in results["click_models"].items():
    headers = ["method"] + [f"N = {n:,}" for n in cell["num_sessions"]]
    rows = [[LABELS[m]] + [f"{v:.4f}" for v in curve["ndcg_mean"]]
            for m, curve in cell["methods"].items()]
    parts.append(f"NDCG@5 under {model_name.replace('_', ' ')} clicks:\n\n" +
                 markdown_table(headers, rows) + "\n")
  claims = results["claims"]
  few = claims["few_sessions_worst_seed"]
  drops = claims["adversarial_worst_drop"]
  parts.append(
      "Claims. With the fewest sessions, the worst seed of each method scores "
      + ", ".join(f"{LABELS[m]} {v:.4f}" for m, v in few.items())
      + f": safe DR and PRPO stay at or above the logging policy in every seed: "
      f"{claims['few_sessions_safe_dr_and_prpo_not_below_logging']}; IPS or DR falls below it in "
      f"some seed: {claims['few_sessions_ips_or_dr_below_logging']}. With the most sessions safe "
      f"DR's CI lies above the logging policy: {claims['many_sessions_safe_dr_ci_above_logging']} "
      f"(safe DR - DR = {claims['many_sessions_safe_dr_minus_dr']:+.4f}). Under adversarial "
      f"clicks the largest drop below the logging policy (worst seed, any N) is "
      + ", ".join(f"{LABELS[m]} {v:.4f}" for m, v in drops.items()) + ".\n")
  return "\n".join(parts)
