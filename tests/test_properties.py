"""One table of public floor-1 functions, each run through the same properties (as rax's losses_test).

Every case builds a small input from a seed. The properties: eager equals jit; vmap over a batch of
3 equals a Python loop; with a `where` mask, an all-masked input gives finite values and finite
gradients; extreme inputs (propensities of 1e-8, logits of 1e4) give finite values and gradients.
Closed-form values live beside each module's own tests.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

from saferl_jax import ope, policy_gradient
from saferl_jax.cltr import estimators as cltr_estimators
from saferl_jax.diffusion import losses, step
from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.ranking import metrics, plackett_luce

N, A = 6, 4  # logged rounds, actions
D, K = 5, 3  # items per list, ranks
S, B = 3, 4  # denoising steps, samples (B = 2 prompts x 2)
SCHEDULE = linear_schedule(1000)


class Case(NamedTuple):
  """fn(*args) -> an array or a NamedTuple of arrays; make(rng) -> args; grad_arg: the float argument
  to differentiate; masked: the last argument is a bool `where`; extreme(args) -> args or None."""
  fn: Callable
  make: Callable
  grad_arg: int | None = 0
  masked: bool = False
  extreme: Callable | None = None


def _bandit(rng, with_model=True):
  target = rng.dirichlet(np.ones(A), size=N).astype(np.float32)
  args = (rng.binomial(1, 0.5, N).astype(np.float32), rng.integers(0, A, N).astype(np.int32),
          rng.uniform(0.1, 1.0, N).astype(np.float32), target)
  return args + (rng.uniform(0, 1, (N, A)).astype(np.float32),) if with_model else args


def _bandit_slots(rng):
  """A log of 2 slots: target_dist and reward_hat [N, A, 2] with positions [N]."""
  target = np.moveaxis(rng.dirichlet(np.ones(A), size=(N, 2)), -1, 1).astype(np.float32)
  return (rng.binomial(1, 0.5, N).astype(np.float32), rng.integers(0, A, N).astype(np.int32),
          rng.uniform(0.1, 1.0, N).astype(np.float32), target,
          rng.uniform(0, 1, (N, A, 2)).astype(np.float32), rng.integers(0, 2, N).astype(np.int32))


def _tiny_propensities(args):
  """Every logged propensity 1e-8: importance weights up to 1e8, still finite in float32."""
  return args[:2] + (np.full(N, 1e-8, np.float32),) + args[3:]


def _list(rng):
  return rng.normal(size=D).astype(np.float32), rng.permutation(D).astype(np.int32)


def _mask(rng):
  where = rng.random(D) < 0.7
  where[0] = True
  return where


def _one_tiny(exposure):
  """The logger exposes item 0 with 1e-8: an exposure ratio of about 1e7."""
  return np.where(np.arange(D) == 0, np.float32(1e-8), exposure)


def _huge_logits(args):
  """Logits spread over +-1e4 (float32 exp overflows at 89)."""
  return (args[0] * np.float32(1e4),) + args[1:]


def _labels(rng):
  return rng.integers(0, 5, D).astype(np.float32), rng.permutation(D).astype(np.int32), _mask(rng)


def _exposures(rng):
  exposure = rng.dirichlet(np.ones(D)).astype(np.float32)
  logging_exposure = rng.dirichlet(np.ones(D)).astype(np.float32)
  return exposure, logging_exposure, rng.normal(size=D).astype(np.float32), _mask(rng)


def _step(rng):
  x_t, eps, x_prev = (rng.normal(size=(2, 3)).astype(np.float32) for _ in range(3))
  return x_prev, x_t, eps


def _log_probs(rng):
  return (rng.normal(size=(S, B)).astype(np.float32) - 3, rng.normal(size=(S, B)).astype(np.float32) - 3,
          rng.normal(size=B).astype(np.float32))


CASES = {
    # Bandit evaluation (ope): differentiate through the target policy.
    "ips": Case(lambda *a: ope.ips(*a), lambda r: _bandit(r, False), 3, extreme=_tiny_propensities),
    "ips_clipped": Case(lambda *a: ope.ips(*a, clip=10.0), lambda r: _bandit(r, False), 3,
                        extreme=_tiny_propensities),
    "snips": Case(lambda *a: ope.snips(*a), lambda r: _bandit(r, False), 3, extreme=_tiny_propensities),
    "beta_ips": Case(lambda *a: ope.beta_ips(*a), lambda r: _bandit(r, False), 3,
                     extreme=_tiny_propensities),
    "dm": Case(lambda *a: ope.dm(*a[3:]), _bandit, 3),
    "dr": Case(lambda *a: ope.dr(*a), _bandit, 3, extreme=_tiny_propensities),
    "sndr": Case(lambda *a: ope.sndr(*a), _bandit, 3, extreme=_tiny_propensities),
    "switch_dr": Case(lambda *a: ope.switch_dr(*a, tau=5.0), _bandit, 3, extreme=_tiny_propensities),
    "dr_os": Case(lambda *a: ope.dr_os(*a, lambda_=1.0), _bandit, 3, extreme=_tiny_propensities),
    "sg_ips": Case(lambda *a: ope.sg_ips(*a, lambda_=0.3), lambda r: _bandit(r, False), 3,
                   extreme=_tiny_propensities),
    "sg_dr": Case(lambda *a: ope.sg_dr(*a, lambda_=0.3), _bandit, 3, extreme=_tiny_propensities),
    # The jackknife bias first, so that the gradient property differentiates it.
    "beta_ips_bias": Case(lambda *a: (lambda o: (o.bias, o.value, o.baseline))(ope.beta_ips_bias(*a)),
                          lambda r: _bandit(r, False), 3, extreme=_tiny_propensities),
    "dr_positions": Case(lambda r, a, p, t, q, pos: ope.dr(r, a, p, t, q, positions=pos), _bandit_slots,
                         3, extreme=_tiny_propensities),
    # Shared policy-gradient pieces.
    "clipped_surrogate": Case(
        lambda ratio, adv: policy_gradient.clipped_surrogate(ratio, adv, clip_low=0.8, clip_high=1.2),
        lambda r: (r.uniform(0.5, 1.5, B).astype(np.float32), r.normal(size=B).astype(np.float32)),
        extreme=lambda a: (np.exp(np.float32(80.0)) * a[0], a[1])),
    "leave_one_out_baseline": Case(policy_gradient.leave_one_out_baseline,
                                   lambda r: (r.normal(size=(K, 2)).astype(np.float32),)),
    "hard_filter": Case(lambda rewards, where: policy_gradient.hard_filter(rewards, quantile=0.5, where=where),
                        lambda r: (r.normal(size=D).astype(np.float32), _mask(r)), None, masked=True),
    # Diffusion: the step's log-density and the losses on per-step log-probs.
    "step_log_prob": Case(
        lambda x_prev, x_t, eps: step.step_log_prob(x_prev, x_t, eps, 981, 961, SCHEDULE, eta=1.0),
        _step, 2, extreme=lambda a: (a[0], a[1], a[2] * np.float32(1e4))),
    "reinforce_loss": Case(losses.reinforce_loss, lambda r: _log_probs(r)[::2],
                           extreme=lambda a: (a[0] * np.float32(1e4), a[1])),
    "ppo_loss": Case(lambda new, old, adv: losses.ppo_loss(new, old, adv, clip_range=0.2), _log_probs,
                     extreme=lambda a: (a[0] * np.float32(1e4), a[1], a[2])),
    "loop_advantages": Case(losses.loop_advantages, lambda r: (r.normal(size=(2, 2)).astype(np.float32),)),
    # Ranking: metrics and Plackett-Luce log-probabilities.
    "dcg_at_k": Case(lambda labels, rankings, where: metrics.dcg_at_k(labels, rankings, k=K, where=where),
                     _labels, masked=True, extreme=lambda a: (a[0] * np.float32(20), a[1], a[2])),
    "ndcg_at_k": Case(lambda labels, rankings, where: metrics.ndcg_at_k(labels, rankings, k=K, where=where),
                      _labels, masked=True, extreme=lambda a: (a[0] * np.float32(20), a[1], a[2])),
    "ranking_log_prob": Case(
        lambda logits, rankings, where: plackett_luce.ranking_log_prob(logits, rankings, where=where),
        lambda r: _list(r) + (_mask(r),), masked=True, extreme=_huge_logits),
    "ranking_log_prob_top_k": Case(
        lambda logits, rankings: plackett_luce.ranking_log_prob(logits, rankings[:K]), _list,
        extreme=_huge_logits),
    # Counterfactual LTR from clicks.
    "ips_document_rewards": Case(
        lambda clicks, rho, betabar: cltr_estimators.ips_document_rewards(clicks, rho, betabar),
        lambda r: (r.binomial(1, 0.5, D).astype(np.float32), r.uniform(0.1, 0.9, D).astype(np.float32),
                   r.uniform(0, 0.1, D).astype(np.float32)), 1,
        extreme=lambda a: (a[0], np.full(D, 1e-8, np.float32), a[2])),
    "policy_value": Case(
        lambda exposure, rewards, where: cltr_estimators.policy_value(exposure, rewards, where=where),
        lambda r: _exposures(r)[::2] + (_mask(r),), masked=True),
    "exposure_divergence": Case(
        lambda exposure, logging, where: cltr_estimators.exposure_divergence(exposure, logging, where=where),
        lambda r: _exposures(r)[:2] + (_mask(r),), masked=True,
        extreme=lambda a: (a[0], _one_tiny(a[1]), a[2])),
    "prpo_objective": Case(
        lambda exposure, logging, rewards, where: cltr_estimators.prpo_objective(
            exposure, logging, rewards, where=where), _exposures, masked=True,
        extreme=lambda a: (a[0], _one_tiny(a[1]), a[2], a[3])),
}
MASKED = [name for name, case in CASES.items() if case.masked]
EXTREME = [name for name, case in CASES.items() if case.extreme is not None]


def _scalar(out):
  """The differentiable output summed to a scalar: a NamedTuple's first field (value, loss)."""
  return jnp.sum(jax.tree.leaves(out)[0])


def _grad(case, args):
  if case.grad_arg is None:
    return []
  i = case.grad_arg
  return jax.grad(lambda x: _scalar(case.fn(*args[:i], x, *args[i + 1:])))(jnp.asarray(args[i]))


def _assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), leaf


@pytest.mark.parametrize("name", CASES)
def test_eager_equals_jit(name):
  case = CASES[name]
  args = case.make(np.random.default_rng(0))
  # Jit may fuse and reorder float32 arithmetic: a few ulps apart, far inside rtol 1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               case.fn(*args), jax.jit(case.fn)(*args))


@pytest.mark.parametrize("name", CASES)
def test_vmap_equals_a_loop(name):
  case = CASES[name]
  examples = [case.make(np.random.default_rng(seed)) for seed in range(3)]
  batched = jax.vmap(case.fn)(*(np.stack(arg) for arg in zip(*examples)))
  for i, args in enumerate(examples):
    jax.tree.map(lambda b, one: np.testing.assert_allclose(b[i], one, rtol=1e-5, atol=1e-6),
                 batched, case.fn(*args))


@pytest.mark.parametrize("name", MASKED)
def test_all_masked_gives_finite_values_and_gradients(name):
  case = CASES[name]
  args = case.make(np.random.default_rng(0))
  args = args[:-1] + (np.zeros_like(args[-1]),)
  _assert_finite(case.fn(*args))
  _assert_finite(_grad(case, args))


@pytest.mark.parametrize("name", EXTREME)
def test_extreme_inputs_stay_finite(name):
  case = CASES[name]
  args = case.extreme(case.make(np.random.default_rng(0)))
  _assert_finite(case.fn(*args))
  _assert_finite(_grad(case, args))


def test_hypothesis_runs_derandomised():
  """tests/conftest.py loads the 'ci' profile: every @given test draws the same examples each run."""
  assert settings().derandomize and settings().deadline is None
