"""Evaluate the uniform random policy from the BTS-logged Open Bandit sample (floor 3).

The shipped sample holds two logs of the same campaign: one by Bernoulli
Thompson Sampling (BTS), one by the uniform random policy. The random log's
mean click is the uniform policy's on-policy value, so estimating that value
off-policy from the BTS log has a ground truth to compare with. Propensities in
OBD are per slot, and the uniform policy puts 1/80 on each item at each slot,
so target_dist is 1/80 everywhere. The reward model for DM and DR is the
smoothed click rate of each (item, slot) in the BTS log, cross-fitted over two
folds so no round's own click enters its prediction.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from saferl_jax import ope, stats
from saferl_jax.data import load_obd
from saferl_jax.experiments.common import markdown_table, pyplot, write_json

ESTIMATORS = {"ips": {}, "snips": {}, "dm": {}, "dr": {}, "sndr": {}, "beta_ips": {},
              "beta_ips_cross_fit": {"baseline": "cross_fit"}}
PRIOR_STRENGTH = 20.0  # pseudo-impressions at the slot's mean click rate, to smooth rare items


def click_rate_model(actions, positions, rewards, *, num_actions: int, num_positions: int,
                     where: np.ndarray) -> np.ndarray:
  """Smoothed click rate per (item, slot) from the rounds in `where` (bool [n], True = fit on it).

  Returns [num_positions, num_actions] click rates.
  """
  clicks = np.zeros((num_positions, num_actions))
  shows = np.zeros((num_positions, num_actions))
  np.add.at(clicks, (positions[where], actions[where]), rewards[where])
  np.add.at(shows, (positions[where], actions[where]), 1.0)
  slot_rate = clicks.sum(1, keepdims=True) / np.maximum(shows.sum(1, keepdims=True), 1.0)
  return (clicks + PRIOR_STRENGTH * slot_rate) / (shows + PRIOR_STRENGTH)


def cross_fitted_reward_hat(log, num_folds: int = 2) -> np.ndarray:
  """[n, A] reward predictions; round i's comes from the click rates of the other folds."""
  folds = np.arange(len(log.rewards)) % num_folds
  reward_hat = np.zeros((len(log.rewards), log.num_actions))
  for k in range(num_folds):
    table = click_rate_model(log.actions, log.positions, log.rewards, num_actions=log.num_actions,
                             num_positions=log.num_positions, where=folds != k)
    reward_hat[folds == k] = table[log.positions[folds == k]]
  return reward_hat


def run(out: Path, *, num_resamples: int = 1000, seed: int = 0) -> dict:
  """Writes DIR/results.json, DIR/obd_estimates.png and DIR/summary.md; returns the results."""
  out = Path(out)
  bts = load_obd(behavior_policy="bts")
  random_log = load_obd(behavior_policy="random")
  n = len(bts.rewards)
  target_dist = np.full((n, bts.num_actions), 1.0 / bts.num_actions)
  reward_hat = cross_fitted_reward_hat(bts)
  rounds = ope.logged_rounds(bts.rewards, bts.actions, bts.logging_probs, target_dist, reward_hat)

  truth = stats.confidence_interval(random_log.rewards, method="t")
  key = jax.random.key(seed)
  estimates = {}
  for index, (name, options) in enumerate(ESTIMATORS.items()):
    estimator = ope.FROM_ROUNDS["beta_ips" if name.startswith("beta_ips") else name]
    estimate = estimator(rounds, **options)
    bootstrap = ope.estimator_bootstrap_interval(
        estimator, rounds, key=jax.random.fold_in(key, index), num_resamples=num_resamples,
        **options)
    t_interval = stats.confidence_interval(estimate.per_sample, method="t")
    estimates[name] = {"value": estimate.value, "stderr": estimate.stderr,
                       "ci_t": [t_interval.lower, t_interval.upper],
                       "ci_bootstrap": [bootstrap.lower, bootstrap.upper]}
  diagnostics = ope.weight_diagnostics(rounds.weights)
  improvement = ope.improves_on_logging(ope.beta_ips_from_rounds(rounds), bts.rewards)
  results = {
      "data": "Open Bandit Dataset sample (ZOZO, Inc., CC BY 4.0), campaign 'all'",
      "num_rounds": n,
      "target_policy": "uniform random over 80 items",
      "truth": {"value": float(np.mean(random_log.rewards)), "ci_t": [truth.lower, truth.upper],
                "source": "mean click of the random-logged sample"},
      "bts_on_policy_value": float(np.mean(bts.rewards)),
      "estimates": estimates,
      "weight_diagnostics": diagnostics._asdict(),
      "safe_improvement_over_bts": improvement._asdict(),
  }
  write_json(out / "results.json", results)
  _plot(results, out / "obd_estimates.png")
  (out / "summary.md").write_text(summary(results))
  return results


def _plot(results: dict, path: Path) -> None:
  plt = pyplot()
  names = list(results["estimates"])
  fig, ax = plt.subplots(figsize=(6.5, 3.4))
  lo, hi = results["truth"]["ci_t"]
  ax.axhspan(lo, hi, color="tab:green", alpha=0.2, label="random log 95% CI (truth)")
  ax.axhline(results["truth"]["value"], color="tab:green")
  for i, name in enumerate(names):
    est = results["estimates"][name]
    value = float(est["value"])
    b_lo, b_hi = (float(v) for v in est["ci_bootstrap"])
    ax.errorbar([i], [value], yerr=[[value - b_lo], [b_hi - value]], fmt="o", color="tab:blue",
                capsize=3, label="estimate, 95% bootstrap CI" if i == 0 else None)
  ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
  ax.set_ylabel("click rate of the uniform policy")
  ax.set_title("Off-policy estimates from the BTS log vs the random log", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary(results: dict) -> str:
  truth = results["truth"]["value"]
  rows = [[name, float(e["value"]), float(e["stderr"]),
           f"[{float(e['ci_bootstrap'][0]):.4f}, {float(e['ci_bootstrap'][1]):.4f}]",
           float(e["value"]) / truth - 1]
          for name, e in results["estimates"].items()]
  diag = results["weight_diagnostics"]
  return ("## Open Bandit sample: value of the uniform policy estimated from the BTS log\n\n"
          f"Truth (mean click of the random log): {truth:.4f}, 95% CI "
          f"[{float(results['truth']['ci_t'][0]):.4f}, {float(results['truth']['ci_t'][1]):.4f}]. "
          f"Effective sample size {float(diag['effective_sample_size']):.0f} of "
          f"{results['num_rounds']}, max weight {float(diag['max_weight']):.0f}.\n\n" +
          markdown_table(["estimator", "estimate", "stderr", "95% bootstrap CI", "relative error"], rows) +
          "\n")
