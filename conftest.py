"""Test-session settings no test file can make: XLA's optimisation level, and marks for the
docstring examples (doctests) of saferl_jax."""

import os

import pytest

# Most of the suite's time on 2 CPU cores is XLA compiling small programs, not running them.
# Backend optimisation level 0 compiles about a third faster (tests/test_cli.py's cltr command:
# 38 s -> 25 s); results stay within every test's derived tolerance. Set before JAX starts its
# backend; the library, benchmarks and experiments keep XLA's default level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

# Examples that take 0.6 s or more on 2 CPU cores (mostly XLA compilation); they run in the slow
# tier, so `pytest -m "not slow"` stays near 2 minutes.
SLOW_DOCTESTS = {
    "saferl_jax.cltr.estimators.policy_aware_propensities",
    "saferl_jax.cltr.reward_model.fit_reward_regression",
    "saferl_jax.data.click_logs.simulate_click_log",
    "saferl_jax.data.composition2d.compose_on_grid",
    "saferl_jax.data.composition2d.grid_log_densities",
    "saferl_jax.data.composition2d.grid_mmd",
    "saferl_jax.data.composition2d.mixture_eps_apply",
    "saferl_jax.data.composition2d.optimal_weights",
    "saferl_jax.data.composition2d.sample_grid",
    "saferl_jax.data.constrained_bandit.constrained_batch",
    "saferl_jax.data.constrained_bandit.simulate_logs",
    "saferl_jax.data.digits.split",
    "saferl_jax.data.ltr.make_ltr_dataset",
    "saferl_jax.data.ltr.split",
    "saferl_jax.data.mixture2d.constrained_optimum",
    "saferl_jax.data.mixture2d.mixture_mmd",
    "saferl_jax.data.mixture2d.sample_mixture",
    "saferl_jax.data.obd.load_obd",
    "saferl_jax.data.synthetic_bandit.make_problem",
    "saferl_jax.data.synthetic_bandit.simulate_log",
    "saferl_jax.diffusion.composition.path_kl",
    "saferl_jax.diffusion.composition.path_kls",
    "saferl_jax.diffusion.flow.flow_matching_loss",
    "saferl_jax.diffusion.losses.epsilon_loss",
    "saferl_jax.diffusion.sampler.differentiable_sample",
    "saferl_jax.diffusion.sampler.sample",
    "saferl_jax.diffusion.sampler.select_samples",
    "saferl_jax.diffusion.sampler.select_step",
    "saferl_jax.diffusion.sampler.stepwise_value_and_grad",
    "saferl_jax.diffusion.sampler.trajectory_log_probs",
    "saferl_jax.diffusion.sampler.trajectory_transitions",
    "saferl_jax.experiments.loop_finetuning.circle_optimum",
    "saferl_jax.fast_random.gumbel",
    "saferl_jax.models.classifier.DigitClassifier",
    "saferl_jax.models.denoisers.ConvDenoiser",
    "saferl_jax.models.denoisers.DictEncoder",
    "saferl_jax.models.denoisers.MLPDenoiser",
    "saferl_jax.models.denoisers.SequenceEncoder",
    "saferl_jax.models.lora.LoRALayer",
    "saferl_jax.models.lora.disable_adapters",
    "saferl_jax.models.reward_models.cross_fit_propensities",
    "saferl_jax.models.reward_models.cross_fit_reward_model",
    "saferl_jax.ope.confidence.estimator_bootstrap_interval",
    "saferl_jax.opl.constrained.constrained_objective",
    "saferl_jax.ranking.exposure_gradient.exposure_objective_gradient",
    "saferl_jax.ranking.metrics.expected_metric_from_samples",
    "saferl_jax.ranking.pl_rank.pl_rank_gradient",
    "saferl_jax.ranking.pl_rank.reinforce_gradient",
    "saferl_jax.ranking.plackett_luce.ranking_log_prob",
    "saferl_jax.stats.bootstrap.bootstrap_interval",
    "saferl_jax.training.composition.compose",
    "saferl_jax.training.composition.compose_train",
    "saferl_jax.training.constrained_opl.train_constrained",
    "saferl_jax.training.finetuning.finetune",
}


def pytest_collection_modifyitems(items):
  for item in items:
    if isinstance(item, pytest.DoctestItem) and item.name in SLOW_DOCTESTS:
      item.add_marker(pytest.mark.slow)
