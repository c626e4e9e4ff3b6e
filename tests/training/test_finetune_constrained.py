"""Primal-dual fine-tuning (finetune(constraints=...)): logging, the unconstrained limit, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from saferl_jax import constrained
from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.models.denoisers import MLPDenoiser
from saferl_jax.models.functional import as_functional
from saferl_jax.training.finetuning import Constraints, Sampling, finetune

APPLY_FN, PARAMS = as_functional(MLPDenoiser(2, num_classes=2, hidden=(16, 16), rngs=nnx.Rngs(0)))
SCHEDULE = linear_schedule(100)
SAMPLING = Sampling(shape=(2,), num_classes=2, prompts_per_round=4, samples_per_prompt=4,
                    num_steps=8)
OPTIMIZER = optax.adam(3e-3)
ETA = 0.5
DUAL = constrained.dual_descent(ETA)
OPTIONS = dict(method="loop", rounds=4, eval_every=2, schedule=SCHEDULE, sampling=SAMPLING,
               optimizer=OPTIMIZER)
SEED_PARAMS = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), PARAMS)
SEED_KEYS = jax.random.split(jax.random.key(5), 2)


def first(x0, conditions):
  """r_0 = x_1 (the primary reward)."""
  del conditions
  return x0[:, 0]


def second(x0, conditions):
  """r = x_2 (a constraint pulling another way)."""
  del conditions
  return x0[:, 1]


def constraints(threshold=5.0, initial=0.3, dual_every=2):
  # "same" is the primary reward itself: its logged mean must equal history["reward"].
  return Constraints({"same": first, "up": second}, {"same": -100.0, "up": threshold}, DUAL,
                     {"same": 0.0, "up": initial}, dual_every=dual_every)


@pytest.mark.slow
def test_constraints_slacks_multipliers_and_the_lagrangian_are_logged_as_recomputed():
  result = finetune(APPLY_FN, SEED_PARAMS, first, key=SEED_KEYS, constraints=constraints(),
                    **OPTIONS)
  history = result.history
  # The same samples score the primary and the "same" constraint: their batch means are equal.
  np.testing.assert_array_equal(history["constraint/same"], history["reward"])
  for name, threshold in (("same", -100.0), ("up", 5.0)):
    np.testing.assert_array_equal(history[f"slack/{name}"],
                                  history[f"constraint/{name}"] - np.float32(threshold))
    # Projected dual descent every 2 rounds: lambda_r = max(0, lambda_{r-1} - eta slack_r) after
    # rounds 2 and 4, unchanged after rounds 1 and 3 (float32 arithmetic as in the loop: 1 ulp).
    previous = np.full(2, 0.3 if name == "up" else 0.0, np.float32)
    for r in range(4):
      expected = (np.maximum(previous - np.float32(ETA) * history[f"slack/{name}"][r], 0.0)
                  if (r + 1) % 2 == 0 else previous)
      np.testing.assert_allclose(history[f"lambda/{name}"][r], expected, rtol=1e-6, atol=1e-6)
      previous = history[f"lambda/{name}"][r]
  # The "up" constraint (mean x_2 >= 5, beyond the samples of the untrained model) is violated:
  # its multiplier grows.
  assert np.all(history["slack/up"] < 0) and np.all(history["lambda/up"][-1] > 0.3)
  # The Lagrangian's mean is r_0's mean plus the round's multipliers times the mean slacks (mean
  # of sums against sums of means: float32 rounding of values of size ~10, so 1e-5).
  multipliers = {name: np.concatenate([np.full((1, 2), start), history[f"lambda/{name}"][:-1]])
                 for name, start in (("same", 0.0), ("up", 0.3))}
  expected = history["reward"] + sum(multipliers[n] * history[f"slack/{n}"] for n in multipliers)
  np.testing.assert_allclose(history["lagrangian"], expected, rtol=1e-5, atol=1e-5)
  assert history["lambda/up"].shape == (4, 2)


@pytest.mark.slow
def test_a_met_constraint_at_zero_multiplier_is_the_unconstrained_run():
  # b = -100 is met by every sample, and lambda_0 = 0 stays 0 (max(0, 0 - eta s) with s > 0), so
  # the Lagrangian reward is r_0 + 0 (r - b) = r_0 exactly and the runs coincide.
  met = Constraints({"up": second}, {"up": -100.0}, DUAL)
  options = OPTIONS | dict(key=jax.random.key(1))
  reference = finetune(APPLY_FN, PARAMS, first, **options)
  result = finetune(APPLY_FN, PARAMS, first, constraints=met, **options)
  np.testing.assert_array_equal(result.history["lambda/up"], 0.0)
  np.testing.assert_array_equal(result.history["lagrangian"], result.history["reward"])
  np.testing.assert_array_equal(result.history["reward"], reference.history["reward"])
  np.testing.assert_array_equal(ravel_pytree(result.params)[0], ravel_pytree(reference.params)[0])


@pytest.mark.slow
def test_resume_of_a_constrained_run_equals_the_uninterrupted_run(tmp_path, interrupt_checkpoints):
  options = OPTIONS | dict(key=SEED_KEYS, constraints=constraints())
  reference = finetune(APPLY_FN, SEED_PARAMS, first, **options)
  path = tmp_path / "run"
  interrupt_checkpoints.at = 2
  with pytest.raises(KeyboardInterrupt):
    finetune(APPLY_FN, SEED_PARAMS, first, checkpoint_path=path, **options)
  resumed = finetune(APPLY_FN, SEED_PARAMS, first, checkpoint_path=path, **options)
  assert interrupt_checkpoints.saved == [2, 4]
  np.testing.assert_array_equal(ravel_pytree(resumed.params)[0], ravel_pytree(reference.params)[0])
  assert set(resumed.history) == set(reference.history)
  for name in reference.history:
    np.testing.assert_array_equal(resumed.history[name], reference.history[name])
  # Other constraints (another threshold, initial multiplier, period or dual step) are refused.
  for other in (constraints(threshold=5.1), constraints(initial=0.0), constraints(dual_every=1),
                constraints()._replace(dual_optimizer=constrained.dual_descent(0.25))):
    with pytest.raises(ValueError, match="constraints"):
      finetune(APPLY_FN, SEED_PARAMS, first, checkpoint_path=path,
               **(options | dict(constraints=other)))
  assert interrupt_checkpoints.saved == [2, 4]


def test_bad_constraints_are_named():
  options = OPTIONS | dict(key=jax.random.key(0))

  def refused(error, match, bad, **extra):
    with pytest.raises(error, match=match):
      finetune(APPLY_FN, PARAMS, first, constraints=bad, **(options | extra))

  good = Constraints({"up": second}, {"up": 0.5}, DUAL)
  refused(TypeError, "^constraints: must be a Constraints", {"up": second})
  refused(ValueError, "^constraints.thresholds: must name", good._replace(thresholds={"down": 0.5}))
  refused(ValueError, "^constraints.thresholds\\['up'\\]: must be finite",
          good._replace(thresholds={"up": float("nan")}))
  refused(TypeError, "^constraints.rewards: must be a non-empty mapping", good._replace(rewards={}))
  refused(TypeError, "^constraints.rewards\\['up'\\]: must be callable",
          good._replace(rewards={"up": 1.0}))
  refused(ValueError, "^constraints.rewards\\['up'\\]: must return one reward per sample",
          good._replace(rewards={"up": lambda x0, c: x0}))
  refused(TypeError, "^constraints.dual_optimizer: must be a DualOptimizer",
          good._replace(dual_optimizer=optax.sgd(0.1)))
  refused(ValueError, "^constraints.dual_every", good._replace(dual_every=0))
  refused(ValueError, "^constraints.initial_multipliers: must be None or map",
          good._replace(initial_multipliers={"down": 1.0}))
  refused(ValueError, "^constraints.initial_multipliers\\['up'\\]: must be >= 0",
          good._replace(initial_multipliers={"up": -1.0}))
  refused(ValueError, "^constraints: primal-dual training needs a policy-gradient method", good,
          method="draft")
  # Simplex weights must sum to 1: the dual optimizer's own check, named as the field.
  refused(ValueError, "^constraints.initial_multipliers: multipliers: weights on the simplex",
          good._replace(dual_optimizer=constrained.simplex_descent(0.1),
                        initial_multipliers={"up": 0.5}))


def test_constraints_are_exported_from_the_facades():
  import saferl_jax.constrained
  import saferl_jax.diffusion
  assert saferl_jax.constrained.Constraints is Constraints
  assert saferl_jax.diffusion.Constraints is Constraints
  assert saferl_jax.constrained.finetune is finetune
