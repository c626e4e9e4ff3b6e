"""Test-session settings no test file can make: XLA's compiler settings, a compilation cache for
the session, marks for the docstring examples (doctests) of saferl_jax, and the files' order."""

import collections
import os
import tempfile

import pytest

# Most of the suite's time on 2 CPU cores is XLA compiling small programs, not running them.
# Three compiler settings make it faster; results stay within every test's derived tolerance.
# Each is set before JAX starts its backend, unless XLA_FLAGS already names it; the library,
# benchmarks and experiments keep XLA's defaults. Measured one file at a time on one core,
# tests/training/test_finetune_beyond.py:
# - backend optimisation level 0 (LLVM -O0): 53 s -> 23 s with the other two set;
# - the classic fusion emitters, not the new MLIR ones (xla_cpu_use_fusion_emitters=false):
#   43 s -> 24 s (tests/ope/test_estimators.py 65 s -> 36 s);
# - one LLVM module per program, not split for parallel code generation, which on a core busy
#   with the other xdist worker only adds work: 22.6 s -> 21.3 s (test_estimators 34 s -> 29 s).
TEST_XLA_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false",
                  "xla_cpu_parallel_codegen_split_count": "1"}
for _name, _value in TEST_XLA_FLAGS.items():
  if _name not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_name}={_value}".strip()

# JAX's persistent compilation cache, one fresh directory per test session, shared by the xdist
# workers (the controller loads this file first and the workers inherit its environment). Many
# tests compile programs another test (or another closure with the same program) compiled
# already: every finetune call with a new reward closure retraces an identical program. Entries
# are keyed by the program, the compile options and the JAX version, so results cannot change;
# only the compile time does (tests/experiments/test_constrained_digits.py, run twice in two
# processes: 27 s, then 12 s). Every program is cached, however short its compilation: most are
# short at optimisation level 0. Set SAFERL_JAX_TEST_XLA_CACHE to reuse a directory across sessions.
if "SAFERL_JAX_TEST_XLA_CACHE" not in os.environ:
  os.environ["SAFERL_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="saferl-jax-xla-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["SAFERL_JAX_TEST_XLA_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Examples that take 0.6 s or more on 2 CPU cores (mostly XLA compilation); they run in the slow
# tier, so `pytest -m "not slow"` stays under 2 minutes.
SLOW_DOCTESTS = {
    "saferl_jax.cltr.bias_estimation.estimate_bias",
    "saferl_jax.data.click_logs.with_click_model",
    "saferl_jax.training.reward_network.train_reward_network",
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
    "saferl_jax.data.constrained_bandit.policy_values",
    "saferl_jax.data.constrained_bandit.simulate_log",
    "saferl_jax.data.constrained_bandit.simulate_logs",
    "saferl_jax.data.constrained_bandit.two_reward_problem",
    "saferl_jax.data.digits.split",
    "saferl_jax.data.ltr.make_ltr_dataset",
    "saferl_jax.data.ltr.split",
    "saferl_jax.data.mixture2d.constrained_optimum",
    "saferl_jax.data.mixture2d.mixture_mmd",
    "saferl_jax.data.mixture2d.sample_mixture",
    "saferl_jax.data.obd.iter_obd",
    "saferl_jax.data.obd.load_obd",
    "saferl_jax.data.synthetic_bandit.logged_rounds",
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
    "saferl_jax.models.lora.lora_functional",
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


# Files measured at 20 s or more on 2 CPU cores (tests/test_cli.py's demo alone takes about a
# minute). They are handed to the xdist workers first, so that the two workers finish together;
# pyproject.toml turns off xdist's own order (files with most tests first), which put the demo
# last and left the other worker idle for minutes.
LONGEST_FIRST = ("tests/test_cli.py", "tests/test_notebooks.py",
                 "tests/experiments/test_constrained_mixture2d.py", "tests/test_readme.py",
                 "tests/ope/test_estimators.py", "tests/models/test_reward_models.py",
                 "tests/experiments/test_obd_evaluation.py", "tests/experiments/test_cltr_safety.py")


def pytest_collection_modifyitems(items):
  """Marks the slow doctests; orders the files: LONGEST_FIRST, then by number of tests."""
  for item in items:
    if isinstance(item, pytest.DoctestItem) and item.name in SLOW_DOCTESTS:
      item.add_marker(pytest.mark.slow)

  def file_of(item):
    return item.nodeid.split("::")[0]
  counts = collections.Counter(map(file_of, items))
  rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: (rank.get(file_of(item), len(rank)), -counts[file_of(item)]))
