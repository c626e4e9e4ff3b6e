"""Estimate one OBD logger's on-policy click rate from the other logger's log (floor 3).

The Open Bandit Dataset holds, per campaign, two logs of the same items and slots: one by
Bernoulli Thompson Sampling (BTS), one by the uniform random policy. Each log's mean click is its
policy's on-policy value, so estimating it off-policy from the other log has a ground truth.

- From the BTS log (default) the target is the uniform policy: 1/A on every item at every slot.
- From the random log the target is BTS. OBD does not record BTS's full action distribution, and
  BTS ignores the context, so the target is BTS's per-slot item frequency in its own log,
  pi(a | l) = #(a shown at l) / #(rounds at l): its average over the logging period. The truth, the
  BTS log's mean click, is the value of the time-varying BTS; the gap between the two is part of
  what this direction measures.

The study uses the log's structure: positions (target_dist and reward_hat are [n, A, L]), a
cross-fitted contextual logistic reward model (`ope.cross_fit_reward_model`) whose penalty is
chosen by out-of-fold log loss (reported beside a constant click rate's), hyperparameters of
Switch-DR, DRos and SubGaussian IPS/DR chosen by SLOPE (`ope.tune`), the plug-in beta*-IPS with
its jackknife bias and the cross-fitted one, normal intervals (`ope.evaluate`; delta method for
the self-normalised estimators) and percentile-bootstrap intervals.

Memory: target_dist and reward_hat take 8 n A L bytes (1.9 GB per million rounds for OBD's
80 items and 3 slots); `max_rounds` keeps the first rounds of each log in time order.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from saferl_jax import ope, stats
from saferl_jax.data import load_obd, take_rounds
from saferl_jax.experiments.common import markdown_table, pyplot, write_json

UNTUNED = ("ips", "snips", "dm", "dr", "sndr", "beta_ips")
TUNED = ("switch_dr", "dr_os", "sg_ips", "sg_dr")  # hyperparameter chosen by SLOPE
L2_GRID = (1.0, 10.0, 100.0)  # the reward model's penalty, chosen by out-of-fold log loss


def _target(log, behavior_policy: str) -> np.ndarray:
  """[A, L] the other logger's policy per slot (see the module docstring)."""
  if behavior_policy == "bts":
    return np.full((log.num_actions, log.num_positions), 1.0 / log.num_actions)
  counts = np.zeros((log.num_actions, log.num_positions))
  np.add.at(counts, (log.actions, log.positions), 1.0)
  return counts / counts.sum(axis=0, keepdims=True)


def _log_loss(probs: np.ndarray, rewards: np.ndarray) -> float:
  probs = np.clip(probs, 1e-12, 1 - 1e-12)
  return float(-np.mean(rewards * np.log(probs) + (1 - rewards) * np.log1p(-probs)))


def fit_reward_model(log, *, key: jax.Array, l2_grid=L2_GRID) -> tuple[np.ndarray, dict]:
  """Cross-fitted logistic qhat(x, a, l) [n, A, L], its penalty chosen by out-of-fold log loss.

  Returns:
    (reward_hat, a dict of each penalty's out-of-fold log loss, the chosen one, and the
    log loss of a constant click rate fitted on the other fold, for comparison).
  """
  losses, fits = {}, {}
  rows = np.arange(len(log.rewards))
  for l2 in l2_grid:
    fit = ope.cross_fit_reward_model(
        log.contexts, log.actions, log.rewards, num_actions=log.num_actions, key=key,
        positions=log.positions, num_positions=log.num_positions, l2=l2)
    reward_hat = np.asarray(fit.reward_hat)
    losses[l2] = _log_loss(reward_hat[rows, log.actions, log.positions], log.rewards)
    fits[l2] = (reward_hat, np.asarray(fit.fold_ids))
  best = min(losses, key=losses.get)
  reward_hat, fold_ids = fits[best]
  constant = np.zeros(len(rows))
  for fold in np.unique(fold_ids):
    constant[fold_ids == fold] = np.mean(log.rewards[fold_ids != fold])
  return reward_hat, {"out_of_fold_log_loss": {str(l2): v for l2, v in losses.items()},
                      "chosen_l2": best,
                      "constant_click_rate_log_loss": _log_loss(constant, log.rewards)}


def _first(log, max_rounds: int | None):
  if max_rounds is None or max_rounds >= len(log.rewards):
    return log
  return take_rounds(log, np.argsort(log.timestamps, kind="stable")[:max_rounds])


def run(out: Path, *, root: str | Path | None = None, behavior_policy: str = "bts",
        campaign: str = "all", max_rounds: int | None = None, num_resamples: int = 1000,
        seed: int = 0) -> dict:
  """Writes DIR/results.json, DIR/obd_estimates.png and DIR/summary.md; returns the results.

  Args:
    out: the output folder.
    root: an OBD download (`<root>/<policy>/<campaign>/<campaign>.csv`); None: the shipped sample.
    behavior_policy: the log to evaluate from ("bts" or "random"); the target is the other one.
    campaign: "all", "men" or "women" (the sample ships "all" only).
    max_rounds: keep the first rounds of each log in time order (memory, see the module doc).
    num_resamples: bootstrap resamples per estimator.
    seed: seeds the reward model's folds and the bootstrap.
  """
  out = Path(out)
  other_policy = {"bts": "random", "random": "bts"}.get(behavior_policy)
  if other_policy is None:
    raise ValueError(f"behavior_policy: must be 'bts' or 'random', got {behavior_policy!r}")
  logged = _first(load_obd(root, behavior_policy=behavior_policy, campaign=campaign), max_rounds)
  other = _first(load_obd(root, behavior_policy=other_policy, campaign=campaign,
                          vocabulary=logged.vocabulary), max_rounds)
  if other.num_actions != logged.num_actions or other.num_positions != logged.num_positions:
    raise ValueError(f"root: the {behavior_policy} and {other_policy} logs of campaign "
                     f"{campaign!r} differ in items or slots")
  n = len(logged.rewards)
  key = jax.random.key(seed)
  model_key, bootstrap_key = jax.random.split(key)
  reward_hat, model = fit_reward_model(logged, key=model_key)
  target_policy = _target(other if behavior_policy == "random" else logged, behavior_policy)
  target_dist = np.broadcast_to(target_policy, (n,) + target_policy.shape)
  arrays = (logged.rewards, logged.actions, logged.logging_probs, target_dist, reward_hat)
  rounds = ope.logged_rounds(*arrays, positions=logged.positions)

  options = {name: {} for name in UNTUNED}
  tuned = {}
  for name in TUNED:
    choice = ope.tune_from_rounds(rounds, estimator=name, method="slope")
    option = ope.TUNABLE[name].option
    options[name] = {option: float(choice.best)}
    # JSON has no infinity; "inf" is the estimator's unbiased setting (no clipping or shrinkage).
    tuned[name] = {"option": option,
                   **{field: [v if np.isfinite(v) else "inf" for v in np.ravel(values).tolist()]
                      for field, values in (("value", choice.best), ("grid", choice.grid))}}
  report = ope.evaluate_from_rounds(rounds, estimators=UNTUNED + TUNED, options=options)
  options["beta_ips_cross_fit"] = {"baseline": "cross_fit"}

  estimates = {}
  for index, name in enumerate(report.names + ("beta_ips_cross_fit",)):
    estimator = ope.FROM_ROUNDS["beta_ips" if name.startswith("beta_ips") else name]
    if index < len(report.names):
      value, stderr = report.values[index], report.stderrs[index]
      normal = [report.interval.lower[index], report.interval.upper[index]]
    else:
      estimate = estimator(rounds, **options[name])
      value, stderr = estimate.value, estimate.stderr
      interval = stats.confidence_interval(estimate.per_sample, method="normal")
      normal = [interval.lower, interval.upper]
    bootstrap = ope.estimator_bootstrap_interval(
        estimator, rounds, key=jax.random.fold_in(bootstrap_key, index),
        num_resamples=num_resamples, **options[name])
    estimates[name] = {"value": value, "stderr": stderr, "ci_normal": normal,
                       "ci_bootstrap": [bootstrap.lower, bootstrap.upper]}
  truth = stats.confidence_interval(other.rewards, method="t")
  bias = ope.beta_ips_bias_from_rounds(rounds)
  improvement = ope.improves_on_logging(ope.beta_ips_from_rounds(rounds), logged.rewards)
  results = {
      "data": (f"Open Bandit Dataset ({'shipped sample' if root is None else root}; ZOZO, Inc., "
               f"CC BY 4.0), campaign {campaign!r}"),
      "behavior_policy": behavior_policy,
      "target_policy": ("uniform random over the items, every slot" if behavior_policy == "bts"
                        else "BTS's per-slot item frequency in its own log"),
      "num_rounds": n, "num_actions": logged.num_actions, "num_positions": logged.num_positions,
      "truth": {"value": float(np.mean(other.rewards)), "ci_t": [truth.lower, truth.upper],
                "source": f"mean click of the {other_policy} log ({len(other.rewards)} rounds)"},
      "logging_on_policy_value": float(np.mean(logged.rewards)),
      "reward_model": model,
      "tuned": tuned,
      "estimates": estimates,
      "beta_ips_jackknife_bias": float(bias.bias),
      "weight_diagnostics": report.diagnostics._asdict(),
      "safe_improvement_over_logger": improvement._asdict(),
  }
  write_json(out / "results.json", results)
  _plot(results, out / "obd_estimates.png")
  (out / "summary.md").write_text(summary(results))
  return results


def _plot(results: dict, path: Path) -> None:
  plt = pyplot()
  names = list(results["estimates"])
  fig, ax = plt.subplots(figsize=(7.5, 3.6))
  lo, hi = results["truth"]["ci_t"]
  ax.axhspan(lo, hi, color="tab:green", alpha=0.2, label="other log's 95% CI (truth)")
  ax.axhline(results["truth"]["value"], color="tab:green")
  for i, name in enumerate(names):
    est = results["estimates"][name]
    value = float(est["value"])
    b_lo, b_hi = (float(v) for v in est["ci_bootstrap"])
    ax.errorbar([i], [value], yerr=[[value - b_lo], [b_hi - value]], fmt="o", color="tab:blue",
                capsize=3, label="estimate, 95% bootstrap CI" if i == 0 else None)
  ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
  ax.set_ylabel("click rate of the target policy")
  ax.set_title(f"Off-policy estimates from the {results['behavior_policy']} log: "
               f"{results['target_policy']}", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary(results: dict) -> str:
  truth = results["truth"]["value"]
  rows = [[name, float(e["value"]), float(e["stderr"]),
           f"[{float(e['ci_normal'][0]):.4f}, {float(e['ci_normal'][1]):.4f}]",
           f"[{float(e['ci_bootstrap'][0]):.4f}, {float(e['ci_bootstrap'][1]):.4f}]",
           float(e["value"]) / truth - 1]
          for name, e in results["estimates"].items()]
  diag = results["weight_diagnostics"]
  model = results["reward_model"]
  tuned = ", ".join(f"{name} {t['option']}={t['value'][0]:.4g}" if t["value"][0] != "inf" else
                    f"{name} {t['option']}=inf" for name, t in results["tuned"].items())
  return (f"## Open Bandit: {results['target_policy']} estimated from the "
          f"{results['behavior_policy']} log\n\n"
          f"Truth ({results['truth']['source']}): {truth:.4f}, 95% CI "
          f"[{float(results['truth']['ci_t'][0]):.4f}, {float(results['truth']['ci_t'][1]):.4f}]. "
          f"{results['num_rounds']} rounds; effective sample size "
          f"{float(diag['effective_sample_size']):.0f}, max weight {float(diag['max_weight']):.0f}. "
          f"Reward model: logistic over context x item x slot, l2 = {model['chosen_l2']:g}, "
          f"out-of-fold log loss {model['out_of_fold_log_loss'][str(model['chosen_l2'])]:.5f} "
          f"(a constant click rate: {model['constant_click_rate_log_loss']:.5f}). "
          f"Tuned by SLOPE: {tuned}. beta*-IPS jackknife bias "
          f"{results['beta_ips_jackknife_bias']:.2g}.\n\n" +
          markdown_table(["estimator", "estimate", "stderr", "95% normal CI", "95% bootstrap CI",
                          "relative error"], rows) + "\n")
