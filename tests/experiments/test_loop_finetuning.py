"""The LOOP experiment's many-prompt tasks: the circle task's closed-form optimum, and the results schema."""

import json

import jax
import numpy as np
import pytest

from saferl_jax.data import mixture2d
from saferl_jax.experiments import loop_finetuning

PRIOR = mixture2d.default_mixture()


def _reweighted_moments(direction, reward_scale, kl_weight, num_samples, seed):
  """Self-normalised importance estimates under q ∝ p exp(c u . x / beta) from prior samples:
  (estimates [6], standard errors [6]) of the mean [2] and the four component weights."""
  rng = np.random.default_rng(seed)
  weights, means = np.asarray(PRIOR.weights, np.float64), np.asarray(PRIOR.means, np.float64)
  weights /= weights.sum()  # float32 weights, renormalised for numpy
  components = rng.choice(len(weights), size=num_samples, p=weights)
  x = means[components] + 0.4 * rng.standard_normal((num_samples, 2))
  log_w = reward_scale * x @ np.asarray(direction) / kl_weight
  w = np.exp(log_w - log_w.max())
  w /= w.sum()
  features = np.concatenate([x, np.eye(len(weights))[components]], axis=1)  # [n, 6]
  estimates = w @ features
  # Delta-method standard error of a self-normalised estimate: sqrt(sum_i w_i^2 (f_i - mean)^2).
  errors = np.sqrt((w ** 2) @ (features - estimates) ** 2)
  return estimates, errors


def _closed_form(direction, reward_scale, kl_weight):
  optimum = loop_finetuning.circle_optimum(PRIOR, direction, reward_scale=reward_scale,
                                           kl_weight=kl_weight)
  return np.concatenate([np.asarray(mixture2d.mixture_mean(optimum)), np.asarray(optimum.weights)])


@pytest.mark.parametrize("angle", [0.3, 2.0, 4.4])
def test_circle_optimum_matches_monte_carlo_reweighting_of_the_prior(angle):
  """q*(x) ∝ p(x) exp(c u . x / beta): its mean and mode weights equal importance-reweighted prior
  samples within 4 standard errors; the optimum at another temperature is rejected."""
  direction = np.array([np.cos(angle), np.sin(angle)])
  estimates, errors = _reweighted_moments(direction, 1.5, 1.0, 200_000, seed=int(10 * angle))
  exact = _closed_form(direction, 1.5, 1.0)
  np.testing.assert_array_less(np.abs(estimates - exact), 4 * errors)
  # The same tolerance tells the optimum at another temperature (beta 1.3) apart: the test has power.
  wrong = _closed_form(direction, 1.5, 1.3)
  assert np.max(np.abs(estimates - wrong) / errors) > 8


def test_circle_optimum_rejects_a_bad_scale():
  with pytest.raises(ValueError, match="reward_scale"):
    loop_finetuning.circle_optimum(PRIOR, [1.0, 0.0], reward_scale=float("nan"), kl_weight=1.0)
  with pytest.raises(ValueError, match="kl_weight"):
    loop_finetuning.circle_optimum(PRIOR, [1.0, 0.0], reward_scale=1.0, kl_weight=0.0)


TINY = loop_finetuning.Config(
    train_steps=100, sampling_steps=4, channels=8, pretrain_steps=20, pretrain_batch=32,
    classifier_steps=20, prompts_per_round=2, samples_per_prompt=2, rounds=4, eval_every=2,
    minibatches=1, num_seeds=2, mixture_pretrain_steps=20, mixture_rounds=4, circle_hidden=(16, 16),
    circle_eval_prompts=3, circle_eval_samples=16, sweep_methods=("ppo", "loop"),
    sweep_clip_ranges=(0.1, 0.3), sweep_learning_rates=(1e-4,), sweep_rounds=2)


def _all_finite(tree) -> bool:
  return bool(np.all(np.isfinite(np.asarray(jax.tree_util.tree_leaves(tree), float))))


@pytest.mark.slow
def test_run_adds_the_many_prompt_results_to_the_existing_keys(tmp_path):
  """results.json keeps the digits and mixture keys and adds many_prompts and its sweep, with
  finite values and one entry per round (per evaluation for the distance)."""
  loop_finetuning.run(tmp_path, TINY)
  results = json.loads((tmp_path / "results.json").read_text())
  for key in ("task", "initial_reward", "methods", "mixture2d", "claims", "config"):
    assert key in results
  assert set(results["methods"]) == set(results["mixture2d"]["methods"]) == {"reinforce", "ppo", "loop"}
  assert set(results["many_prompts"]) == {"circle", "digits_ink"}
  batch = TINY.prompts_per_round * TINY.samples_per_prompt
  for name, rounds in (("circle", TINY.mixture_rounds), ("digits_ink", TINY.rounds)):
    task = results["many_prompts"][name]
    assert np.isfinite(task["initial_reward"])
    assert set(task["methods"]) == {"reinforce", "ppo", "grpo", "loop"}
    for curve in task["methods"].values():
      assert curve["reward_queries"] == [batch * (r + 1) for r in range(rounds)]
      assert len(curve["reward_mean"]) == len(curve["reward_ci"]) == len(curve["approx_kl"]) == rounds
      assert all(lo <= mean <= hi for (lo, hi), mean in zip(curve["reward_ci"], curve["reward_mean"]))
      assert len(curve["last_rounds_reward_per_seed"]) == TINY.num_seeds
      assert ("distance_to_optimum" in curve) == (name == "circle")
      if name == "circle":
        assert len(curve["distance_to_optimum"]) == rounds // TINY.eval_every + 1
        assert all(d >= -0.05 for d in curve["distance_to_optimum"])  # an unbiased MMD^2 estimate
      assert _all_finite([curve[k] for k in curve if k != "initial_eval"])
    assert task["methods"]["reinforce"]["approx_kl"] == [0.0] * rounds  # on-policy: no ratio
  sweep = results["many_prompts_sweep"]
  assert sweep["clip_ranges"] == [0.1, 0.3] and sweep["learning_rates"] == [1e-4]
  for table in sweep["methods"].values():
    for field in ("last_rounds_reward", "approx_kl", "clip_fraction", "distance_to_optimum"):
      assert np.shape(table[field]) == (1, 2) and _all_finite(table[field])
  assert (tmp_path / "many_prompts.png").exists()
  assert "Many prompts" in (tmp_path / "summary.md").read_text()
