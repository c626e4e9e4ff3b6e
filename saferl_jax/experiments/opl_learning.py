"""Off-policy learning with baseline-corrected policy gradients, after [OB] (floor 3).

Synthetic data as in [OB]: contexts of dimension 5, binary rewards, many actions and a softmax
logger with a negative inverse temperature. Every method trains the same linear softmax policy
from the same logs, for several seeds at once: IPS, SNIPS, BanditNet (its baseline lambda chosen
on a grid by SNIPS on a validation log), the value-optimal beta* and the gradient-optimal
beta*_grad. The simulator's exact policy value is recorded after every epoch; the variance of
each gradient estimator is measured at the initial parameters on the full training log. After
learning, each policy faces the safe-deployment test on a held-out log.

Claim checked: beta*_grad reaches the highest value soonest and has the lowest gradient
variance; every learned policy beats the logging policy. Training is checkpointed per method, keyed by
the whole config.

References:
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. Optimal Baseline Corrections for Off-Policy
  Contextual Bandits. RecSys 2024. https://arxiv.org/abs/2405.05736
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax import ope, opl, stats
from saferl_jax.data import synthetic_bandit as sb
from saferl_jax.experiments.common import Checkpoint, markdown_table, progress, pyplot, write_json

METHODS = ("ips", "snips", "banditnet", "beta_value", "beta_grad")
LABELS = {"ips": "IPS", "snips": "SNIPS", "banditnet": "BanditNet", "beta_value": "beta*-IPS (value)",
          "beta_grad": "beta*-IPS (gradient)"}


@dataclasses.dataclass(frozen=True)
class Config:
  num_actions: int = 50
  dim_context: int = 5
  num_contexts: int = 1000
  logger_inverse_temperature: float = -1.0
  num_train: int = 5_000
  num_validation: int = 5_000
  epochs: int = 20
  batch_size: int = 250
  learning_rate: float = 0.05
  banditnet_lambdas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  num_seeds: int = 5
  seed: int = 0


QUICK = Config()
FULL = Config(num_actions=100, num_train=50_000, num_validation=20_000, epochs=50, num_seeds=20)


def _logged(problem, log) -> opl.LoggedBatch:
  return opl.logged_batch(problem.contexts[log.context_ids], log.actions, log.rewards,
                          log.logging_probs)


def _snips_value(apply_fn, params, batch: opl.LoggedBatch) -> jax.Array:
  log_probs = opl.logged_log_probs(apply_fn, params, batch.contexts, batch.actions)
  return opl.snips_objective(log_probs, batch.rewards, batch.logging_probs)


def _gradient_variances(apply_fn, params, batch: opl.LoggedBatch, banditnet_lambda) -> dict:
  """Variance of each method's gradient estimator on one batch, at the given parameters.

  SNIPS's gradient is (1 / mean w) mean_i (r_i - V_snips) grad w_i to first order: a baseline
  correction with beta = V_snips, scaled by 1 / mean(w).
  """
  per_example = opl.per_example_weight_gradients(apply_fn, params, batch)
  log_probs = opl.logged_log_probs(apply_fn, params, batch.contexts, batch.actions)
  weights = opl.policy_weights(log_probs, batch.logging_probs)
  snips_value = jnp.sum(batch.rewards * weights) / jnp.sum(weights)
  baselines = {
      "ips": 0.0,
      "banditnet": banditnet_lambda,
      "beta_value": opl.value_optimal_baseline(log_probs, batch.rewards, batch.logging_probs),
      "beta_grad": opl.gradient_optimal_baseline(batch.rewards, per_example),
  }
  out = {m: opl.gradient_variance(batch.rewards, per_example, b) for m, b in baselines.items()}
  out["snips"] = opl.gradient_variance(batch.rewards, per_example, snips_value) / jnp.mean(weights)**2
  return out


def run(out: Path, config: Config = QUICK) -> dict:
  """Trains every method, writes DIR/results.json, plots and summary.md; returns the results."""
  out = Path(out)
  checkpoints = Checkpoint(out, dataclasses.asdict(config))  # training runs keyed by the config
  key = jax.random.key(config.seed)
  problem_key, data_key, init_key, train_key = jax.random.split(key, 4)
  problem = sb.make_problem(problem_key, num_actions=config.num_actions, dim_context=config.dim_context,
                            num_contexts=config.num_contexts,
                            logger_inverse_temperature=config.logger_inverse_temperature)
  seeds = config.num_seeds
  train_keys, validation_keys, holdout_keys = jnp.split(jax.random.split(data_key, 3 * seeds), 3)
  train = _logged(problem, sb.simulate_logs(problem, keys=train_keys, num_rounds=config.num_train))
  validation = _logged(problem, sb.simulate_logs(problem, keys=validation_keys, num_rounds=config.num_validation))
  holdout_logs = sb.simulate_logs(problem, keys=holdout_keys, num_rounds=config.num_validation)
  holdout = _logged(problem, holdout_logs)

  apply_fn, _ = opl.as_functional(opl.LinearPolicy(config.dim_context, config.num_actions,
                                                   rngs=nnx.Rngs(0)))
  init_params = jax.vmap(lambda k: opl.as_functional(opl.LinearPolicy(
      config.dim_context, config.num_actions, rngs=nnx.Rngs(params=k)))[1])(
          jax.random.split(init_key, seeds))

  def policy_dist(params, contexts):
    return jax.nn.softmax(apply_fn(params, contexts), axis=-1)

  def evaluate(params):
    return {"value": sb.policy_value(policy_dist(params, problem.contexts), problem.expected_rewards)}

  def fit(method, banditnet_lambda=0.0):
    name = method if method != "banditnet" else f"banditnet_{banditnet_lambda:g}"
    return opl.train(apply_fn, init_params, train, key=jax.random.split(train_key, seeds),
                     method=method, epochs=config.epochs, batch_size=config.batch_size,
                     optimizer=optax.adam(config.learning_rate), banditnet_lambda=banditnet_lambda,
                     evaluate=evaluate, checkpoint_path=checkpoints.path_for(name))

  runs = {}
  banditnet_runs = {}
  steps = [("banditnet", lam) for lam in config.banditnet_lambdas] + [
      (m, 0.0) for m in METHODS if m != "banditnet"]
  for method, lam in progress(steps, "opl training runs"):
    result = fit(method, lam)
    if method == "banditnet":
      banditnet_runs[lam] = result
    else:
      runs[method] = result
  # BanditNet: the lambda whose policies have the best mean SNIPS value on the validation logs.
  validation_snips = {lam: float(jnp.mean(jax.vmap(lambda p, b: _snips_value(apply_fn, p, b))(
      r.params, validation))) for lam, r in banditnet_runs.items()}
  best_lambda = max(validation_snips, key=validation_snips.get)
  runs["banditnet"] = banditnet_runs[best_lambda]

  grad_variances = jax.vmap(lambda p, b: _gradient_variances(apply_fn, p, b, best_lambda))(
      init_params, train)
  logging_value = float(sb.policy_value(problem.logging_dist, problem.expected_rewards))
  methods = {}
  for method in METHODS:
    curve = np.asarray(runs[method].history["value"])  # [epochs + 1, seeds]
    final = curve[-1]
    interval = stats.confidence_interval(final, method="t")
    targets = jax.vmap(policy_dist)(runs[method].params, holdout.contexts)
    decisions = jax.vmap(lambda r, a, p, t: ope.improves_on_logging(
        ope.beta_ips(r, a, p, t), r).deploy)(holdout.rewards, holdout.actions, holdout.logging_probs,
                                           targets)
    methods[method] = {
        "value_curve": curve.mean(axis=1),
        "value_curve_ci": [[float(v) for v in stats.confidence_interval(row, method="t")]
                           for row in curve],
        "final_value": float(final.mean()),
        "final_value_ci": [interval.lower, interval.upper],
        "grad_variance": float(jnp.mean(grad_variances[method])),
        "deploy_rate": float(jnp.mean(decisions)),
        "beats_logging_in_every_seed": bool(np.all(final > logging_value)),
    }
  methods["banditnet"]["lambda"] = best_lambda
  results = {
      "config": dataclasses.asdict(config),
      "logging_value": logging_value,
      "optimal_value": float(jnp.mean(jnp.max(problem.expected_rewards, axis=1))),
      "methods": methods,
      "banditnet_validation_snips": validation_snips,
      "claims": _claims(methods, logging_value),
  }
  write_json(out / "results.json", results)
  _plot(results, out)
  (out / "summary.md").write_text(summary(results))
  return results


def _claims(methods: dict, logging_value: float) -> dict:
  """Which method learns fastest (mean true value over the epochs, i.e. the area under its
  learning curve), which has the lowest gradient variance, and whether all beat the logger."""
  mean_value = {m: float(np.mean(methods[m]["value_curve"][1:])) for m in METHODS}
  fastest = max(mean_value, key=mean_value.get)
  lowest_variance = min(METHODS, key=lambda m: methods[m]["grad_variance"])
  return {
      "mean_value_over_epochs": mean_value,
      "fastest_learner": fastest,
      "beta_grad_learns_fastest": fastest == "beta_grad",
      "lowest_gradient_variance": lowest_variance,
      "beta_grad_lowest_gradient_variance": lowest_variance == "beta_grad",
      "every_learned_policy_beats_logging": all(
          methods[m]["beats_logging_in_every_seed"] for m in METHODS),
  }


def _plot(results: dict, out: Path) -> None:
  plt = pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
  for method, stats_ in results["methods"].items():
    curve = np.asarray(stats_["value_curve"], float)
    ci = np.asarray(stats_["value_curve_ci"], float)
    epochs = np.arange(len(curve))
    left.plot(epochs, curve, marker="o", markersize=3, label=LABELS[method])
    left.fill_between(epochs, ci[:, 0], ci[:, 1], alpha=0.15)
  left.axhline(results["logging_value"], color="gray", linestyle="--", label="logging policy")
  left.axhline(results["optimal_value"], color="black", linestyle=":", label="optimal policy")
  left.set_xlabel("epoch")
  left.set_ylabel("true policy value")
  left.legend(fontsize=7)
  names = list(results["methods"])
  right.bar([LABELS[m] for m in names], [results["methods"][m]["grad_variance"] for m in names])
  right.set_ylabel("gradient variance at initialisation")
  right.tick_params(axis="x", labelrotation=20, labelsize=7)
  fig.tight_layout()
  fig.savefig(out / "opl.png", dpi=120)
  plt.close(fig)


def summary(results: dict) -> str:
  rows = []
  claims = results["claims"]
  for method, m in results["methods"].items():
    rows.append([LABELS[method], claims["mean_value_over_epochs"][method], m["final_value"],
                 f"[{float(m['final_value_ci'][0]):.3f}, {float(m['final_value_ci'][1]):.3f}]",
                 m["grad_variance"], m["deploy_rate"]])
  config = results["config"]
  return (f"## Off-policy learning ({config['num_seeds']} seeds, {config['num_train']:,} logged rounds, "
          f"A = {config['num_actions']}, logger beta0 = {config['logger_inverse_temperature']:g})\n\n"
          f"Logging policy value {results['logging_value']:.3f}; optimal {results['optimal_value']:.3f}; "
          f"BanditNet lambda {results['methods']['banditnet']['lambda']:g}.\n\n" +
          markdown_table(["method", "mean value over epochs", "final value", "95% CI",
                          "gradient variance at init", "deploy rate"], rows) +
          f"\n\nFastest learner (highest mean value over epochs): {LABELS[claims['fastest_learner']]}. "
          f"Lowest gradient variance: {LABELS[claims['lowest_gradient_variance']]}. Every learned "
          f"policy beats the logging one in every seed: {claims['every_learned_policy_beats_logging']}.\n")
