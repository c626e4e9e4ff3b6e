"""Cross-fitted reward and propensity models: out-of-fold predictions, OBP's fitting weights,
recovery of known logistic / softmax models, positions, the floor, and input checks.

Tolerances of the recovery tests come from the asymptotics of maximum likelihood (see each test);
keys are fixed, so every test is deterministic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import saferl_jax as sj
from saferl_jax.models import reward_models as rm
from saferl_jax.models.reward_models import (cross_fit_propensities, cross_fit_reward_model,
                                             fitting_weights)

# One cheap optimizer, shared, so the fast tests compile a small kernel once per shape.
SGD = optax.sgd(0.5)


def sigmoid(z):
  return 1 / (1 + np.exp(-z))


def logistic_log(n=2000, d=3, num_actions=4, seed=0):
  """Contexts, uniformly logged actions and Bernoulli rewards from a known logistic model."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  weights, bias = rng.normal(size=(num_actions, d)), rng.normal(size=num_actions)
  true = sigmoid(x @ weights.T + bias)  # [n, A]
  a = rng.integers(0, num_actions, n)
  r = (rng.random(n) < true[np.arange(n), a]).astype(np.float32)
  return x, a, r, true


def small_log(n=40, d=2, num_actions=3, seed=1):
  x, a, r, _ = logistic_log(n, d, num_actions, seed)
  return x, a, r


# Fitting weights (SPEC, "Real logs": OBP's three methods).


def test_fitting_weights_match_hand_values():
  actions = jnp.array([0, 1, 2])
  p = jnp.array([0.5, 0.25, 0.1])
  pi = jnp.array([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0], [0.1, 0.1, 0.8]])
  np.testing.assert_allclose(fitting_weights(actions), [1.0, 1.0, 1.0])
  # iw: pi(a_i|x_i) / p_i = 0.2 / 0.5, 0.4 / 0.25, 0.8 / 0.1
  np.testing.assert_allclose(fitting_weights(actions, method="iw", logging_probs=p, target_dist=pi),
                             [0.4, 1.6, 8.0], rtol=1e-6)
  # mrdr: pi (1 - p) / p^2 = 0.2 * 0.5 / 0.25, 0.4 * 0.75 / 0.0625, 0.8 * 0.9 / 0.01
  np.testing.assert_allclose(
      fitting_weights(actions, method="mrdr", logging_probs=p, target_dist=pi),
      [0.4, 4.8, 72.0], rtol=1e-5)


def test_fitting_weights_read_the_logged_slot_of_a_three_axis_target():
  actions, positions = jnp.array([1, 0]), jnp.array([2, 0])
  target = np.full((2, 2, 3), 0.5)
  target[0, :, 2] = [0.9, 0.1]  # round 0 logged action 1 at slot 2: pi = 0.1
  target[1, :, 0] = [0.3, 0.7]  # round 1 logged action 0 at slot 0: pi = 0.3
  p = jnp.array([0.5, 0.2])
  np.testing.assert_allclose(
      fitting_weights(actions, method="iw", logging_probs=p, target_dist=target,
                      positions=positions), [0.1 / 0.5, 0.3 / 0.2], rtol=1e-6)
  np.testing.assert_allclose(
      fitting_weights(actions, method="mrdr", logging_probs=p, target_dist=target,
                      positions=positions), [0.1 * 0.5 / 0.25, 0.3 * 0.8 / 0.04], rtol=1e-5)


@pytest.mark.parametrize("missing", ["logging_probs", "target_dist"])
def test_iw_and_mrdr_name_what_they_miss(missing):
  x, a, r = small_log()
  given = {"logging_probs": np.full(len(a), 0.5), "target_dist": np.full((len(a), 3), 1 / 3)}
  del given[missing]
  for method in ("iw", "mrdr"):
    with pytest.raises(ValueError, match=missing):
      fitting_weights(a, method=method, **given)
    with pytest.raises(ValueError, match=missing):
      cross_fit_reward_model(x, a, r, num_actions=3, key=jax.random.key(0), method=method,
                             **given)


# Out of fold: round i's prediction never depends on its own fold's data.


@pytest.mark.parametrize("model, optimizer", [("logistic", SGD), ("logistic", None), ("mlp", None)],
                         ids=["sgd", "lbfgs", "mlp-lbfgs"])
@pytest.mark.slow
def test_changing_one_folds_rewards_leaves_that_folds_predictions_unchanged(model, optimizer):
  x, a, r = small_log()
  options = dict(num_actions=3, key=jax.random.key(3), model=model, optimizer=optimizer,
                 num_steps=20)
  fit = cross_fit_reward_model(x, a, r, **options)
  in_fold = np.asarray(fit.fold_ids) == 0
  changed = np.where(in_fold, 1.0 - r, r)  # flip every reward of fold 0
  refit = cross_fit_reward_model(x, a, changed, **options)
  np.testing.assert_array_equal(refit.fold_ids, fit.fold_ids)
  np.testing.assert_array_equal(refit.reward_hat[in_fold], fit.reward_hat[in_fold])
  # The other fold's model trained on the flipped rewards, so its rows did move (else the test
  # could not fail).
  assert np.abs(np.asarray(refit.reward_hat - fit.reward_hat)[~in_fold]).max() > 1e-3


@pytest.mark.slow
def test_folds_are_balanced_and_drawn_from_the_key():
  x, a, r = small_log()
  fits = [cross_fit_reward_model(x, a, r, num_actions=3, key=jax.random.key(k), optimizer=SGD,
                                 num_steps=20) for k in (0, 0, 1)]
  assert np.bincount(np.asarray(fits[0].fold_ids)).tolist() == [20, 20]
  np.testing.assert_array_equal(fits[0].reward_hat, fits[1].reward_hat)  # same key, same result
  assert not np.array_equal(fits[0].fold_ids, fits[2].fold_ids)
  assert fits[0].reward_hat.shape == (40, 3) and fits[0].train_losses.shape == (2, 20)


@pytest.mark.slow
def test_rounds_of_weight_zero_do_not_move_any_prediction():
  """With method="iw", a round whose action the target never takes has s_i = 0: its reward can
  change without changing reward_hat anywhere, in any fold (the weights enter the fit)."""
  x, a, r = small_log()
  target = np.tile([0.5, 0.5, 0.0], (len(a), 1))  # action 2 gets weight 0
  options = dict(num_actions=3, key=jax.random.key(0), method="iw",
                 logging_probs=np.full(len(a), 1 / 3), target_dist=target, num_steps=20)
  fit = cross_fit_reward_model(x, a, r, **options)
  changed = np.where(a == 2, 1.0 - r, r)
  np.testing.assert_array_equal(cross_fit_reward_model(x, a, changed, **options).reward_hat,
                                fit.reward_hat)
  normal = dict(options, method="normal")
  assert not np.array_equal(cross_fit_reward_model(x, a, changed, **normal).reward_hat,
                            cross_fit_reward_model(x, a, r, **normal).reward_hat)


# Recovery of a known model.


@pytest.mark.slow
def test_logistic_model_recovers_a_known_logistic_reward():
  """The model class holds the truth (per-action weights and biases), so the maximum-likelihood
  error at a new context is asymptotically Var(eta_hat(x)) = z^T I^-1 z / n_a for the n_a rounds
  of that action in the training folds; with s = E[p (1 - p)], E[(p_hat - p)^2] ~ s^2 (d + 1) /
  (s n_a) = s (d + 1) / n_a. The test allows twice that RMSE (the information is not constant in
  x, and l2 = 1 shrinks a little), and checks that a constant model is well outside it."""
  n, d, num_actions, num_folds = 2000, 3, 4, 2
  x, a, r, true = logistic_log(n, d, num_actions)
  fit = cross_fit_reward_model(x, a, r, num_actions=num_actions, key=jax.random.key(0),
                               num_folds=num_folds)
  assert fit.reward_hat.shape == (n, num_actions)
  n_a = n * (num_folds - 1) / num_folds / num_actions
  s = float(np.mean(true * (1 - true)))
  tolerance = 2 * np.sqrt(s * (d + 1) / n_a)
  rmse = float(np.sqrt(np.mean((np.asarray(fit.reward_hat) - true) ** 2)))
  assert rmse < tolerance, (rmse, tolerance)
  constant = float(np.sqrt(np.mean((r.mean() - true) ** 2)))
  assert constant > 2 * tolerance
  # The objective went down and the stopping rule ended both fits before num_steps.
  losses = np.asarray(fit.train_losses)
  assert np.all(losses[:, -1] < losses[:, 0]) and np.all(losses[:, -1] == losses[:, -2])


@pytest.mark.slow
def test_mlp_learns_a_reward_that_depends_on_context_and_action():
  n, d, num_actions = 2000, 3, 4
  x, a, r, true = logistic_log(n, d, num_actions)
  fit = cross_fit_reward_model(x, a, r, num_actions=num_actions, key=jax.random.key(0),
                               model="mlp", hidden_size=16)
  rmse = float(np.sqrt(np.mean((np.asarray(fit.reward_hat) - true) ** 2)))
  constant = float(np.sqrt(np.mean((r.mean() - true) ** 2)))
  assert rmse < constant / 2, (rmse, constant)


@pytest.mark.slow
def test_positions_give_predictions_for_every_slot():
  """Clicks fall with the slot (position bias): the fitted reward_hat is [n, A, L], and its mean
  at each slot is within 3 standard errors of that slot's true click rate (the model, logistic in
  x and the slot, does not hold the true product p(x, a) e_l, so per-row errors are not bounded
  here), in the true order."""
  n, num_actions, num_positions = 1200, 3, 3
  x, a, _, true = logistic_log(n, 2, num_actions)
  rng = np.random.default_rng(5)
  positions = rng.integers(0, num_positions, n)
  examination = np.array([1.0, 0.5, 0.2])
  r = (rng.random(n) < true[np.arange(n), a] * examination[positions]).astype(np.float32)
  fit = cross_fit_reward_model(x, a, r, num_actions=num_actions, key=jax.random.key(0),
                               positions=positions, num_positions=num_positions)
  assert fit.reward_hat.shape == (n, num_actions, num_positions)
  slot_means = np.asarray(fit.reward_hat).mean(axis=(0, 1))
  truth = true.mean() * examination
  stderr = np.sqrt(truth * (1 - truth) / np.bincount(positions))
  assert np.all(np.abs(slot_means - truth) < 3 * stderr), (slot_means, truth, stderr)
  assert slot_means[0] > slot_means[1] > slot_means[2]
  # Action features (here the one-hot itself) give the same model as the default.
  same = cross_fit_reward_model(x, a, r, num_actions=num_actions, key=jax.random.key(0),
                                positions=positions, num_positions=num_positions,
                                action_features=np.eye(num_actions))
  np.testing.assert_allclose(same.reward_hat, fit.reward_hat, atol=1e-5)


@pytest.mark.slow
def test_iw_and_mrdr_fit_with_positions_and_a_three_axis_target():
  n, num_actions, num_positions = 300, 3, 2
  x, a, r, _ = logistic_log(n, 2, num_actions)
  positions = np.arange(n) % num_positions
  target = np.full((n, num_actions, num_positions), 1 / num_actions)
  for method in ("iw", "mrdr"):
    fit = cross_fit_reward_model(x, a, r, num_actions=num_actions, key=jax.random.key(0),
                                 positions=positions, num_positions=num_positions, method=method,
                                 logging_probs=np.full(n, 0.5), target_dist=target, num_steps=30)
    assert fit.reward_hat.shape == (n, num_actions, num_positions)
    assert np.all(np.isfinite(fit.reward_hat))


@pytest.mark.slow
def test_auto_loss_picks_squared_for_non_binary_rewards():
  x, a, r = small_log()
  scaled = 3.0 * r  # rewards in {0, 3}: squared loss, identity link
  options = dict(num_actions=3, key=jax.random.key(0), optimizer=SGD, num_steps=20)
  auto = cross_fit_reward_model(x, a, scaled, **options)
  np.testing.assert_array_equal(
      auto.reward_hat, cross_fit_reward_model(x, a, scaled, loss="squared", **options).reward_hat)
  with pytest.raises(ValueError, match="rewards: loss='logistic'"):
    cross_fit_reward_model(x, a, scaled, loss="logistic", **options)


# Propensities.


def softmax_logger(n=3000, d=2, num_actions=4, seed=0):
  """Contexts and actions drawn from a known softmax logger pi0(a|x) = softmax(x W)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  logits = x @ (1.5 * rng.normal(size=(d, num_actions)))
  pi0 = np.exp(logits - logits.max(1, keepdims=True))
  pi0 /= pi0.sum(1, keepdims=True)
  a = (rng.random((n, 1)) > np.cumsum(pi0, axis=1)).sum(1)
  return x, np.minimum(a, num_actions - 1), pi0


@pytest.mark.slow
def test_propensities_recover_a_known_softmax_logger():
  """For a well-specified multinomial logit, sum_a (p_hat - p)^2 / p at a new context is
  asymptotically a chi-square form with mean (d + 1)(A - 1) / n_train (the free parameters over
  the training rounds); the test allows twice its mean, and checks the uniform guess is far off."""
  n, d, num_actions = 3000, 2, 4
  x, a, pi0 = softmax_logger(n, d, num_actions)
  fit = cross_fit_propensities(x, a, num_actions=num_actions, key=jax.random.key(0))
  dist = np.asarray(fit.dist)
  np.testing.assert_allclose(dist.sum(1), 1.0, atol=1e-5)
  bound = 2 * (d + 1) * (num_actions - 1) / (n / 2)
  chi2 = float(np.mean(np.sum((dist - pi0) ** 2 / pi0, axis=1)))
  assert chi2 < bound, (chi2, bound)
  uniform = float(np.mean(np.sum((1 / num_actions - pi0) ** 2 / pi0, axis=1)))
  assert uniform > 10 * bound
  floor = 1 / (10 * num_actions)
  np.testing.assert_allclose(fit.logging_probs,
                             np.maximum(dist[np.arange(n), a], floor), rtol=1e-6)


@pytest.mark.slow
def test_propensities_per_slot_and_the_floor():
  """With positions the model gives a distribution over actions at each slot; the logged
  propensity is that of the logged action at its slot, floored."""
  n, num_actions, num_positions = 1500, 4, 2
  x, a, _ = softmax_logger(n, 2, num_actions, seed=1)
  positions = np.random.default_rng(2).integers(0, num_positions, n)
  a = np.where(positions == 1, 3, a)  # slot 1 always shows action 3
  floor = 0.1
  fit = cross_fit_propensities(x, a, num_actions=num_actions, key=jax.random.key(0),
                               positions=positions, num_positions=num_positions, floor=floor)
  dist = np.asarray(fit.dist)
  assert dist.shape == (n, num_actions, num_positions)
  np.testing.assert_allclose(dist.sum(1), 1.0, atol=1e-5)
  assert np.median(dist[:, 3, 1]) > 0.99 and np.median(dist[:, 3, 0]) < 0.5
  logged = dist[np.arange(n), a, positions]
  np.testing.assert_allclose(fit.logging_probs, np.maximum(logged, floor), rtol=1e-6)
  assert np.min(fit.logging_probs) >= floor and np.any(logged < floor)
  # The same key draws the same folds as the reward model.
  rewards = np.zeros(n, np.float32)
  same = cross_fit_reward_model(x, a, rewards, num_actions=num_actions, key=jax.random.key(0),
                                optimizer=SGD, num_steps=20)
  np.testing.assert_array_equal(same.fold_ids, fit.fold_ids)


# Input checks.


@pytest.mark.parametrize("change, match", [
    (dict(contexts=np.zeros(40)), "contexts: expected a 2-d"),
    (dict(actions=np.zeros((40, 1), int)), "actions"),
    (dict(rewards=np.zeros(39)), "rewards: has 39 rounds"),
    (dict(actions=np.full(40, 3)), r"actions: every action must be in \[0, 3\)"),
    (dict(num_folds=1), "num_folds: must be >= 2"),
    (dict(num_folds=41), "num_folds: must be at most the number of rounds"),
    (dict(model="forest"), "model: must be one of"),
    (dict(method="dm"), "method: must be one of"),
    (dict(loss="hinge"), "loss: must be one of"),
    (dict(positions=np.zeros(40, int)), "num_positions: required with positions"),
    (dict(num_positions=3), "num_positions: given without positions"),
    (dict(positions=np.full(40, 2), num_positions=2), "positions: every position"),
    (dict(action_features=np.zeros((2, 5))), "action_features: expected"),
    (dict(l2=-1.0), "l2: must be >= 0"),
    (dict(num_steps=0), "num_steps: must be >= 1"),
    (dict(key=jax.random.PRNGKey(0)), "key: expected a typed PRNG key"),
])
def test_reward_model_refuses_bad_inputs_by_name(change, match):
  x, a, r = small_log()
  args = dict(contexts=x, actions=a, rewards=r, num_actions=3, key=jax.random.key(0))
  args.update(change)
  with pytest.raises(ValueError, match=match):
    cross_fit_reward_model(args.pop("contexts"), args.pop("actions"), args.pop("rewards"), **args)


def test_non_finite_contexts_and_bad_propensities_are_named():
  x, a, r = small_log()
  bad = x.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="contexts: contains 1 NaN"):
    cross_fit_reward_model(bad, a, r, num_actions=3, key=jax.random.key(0))
  with pytest.raises(ValueError, match="contexts: contains 1 NaN"):
    cross_fit_propensities(bad, a, num_actions=3, key=jax.random.key(0))
  with pytest.raises(ValueError, match="logging_probs: every propensity"):
    cross_fit_reward_model(x, a, r, num_actions=3, key=jax.random.key(0), method="iw",
                           logging_probs=np.zeros(40), target_dist=np.full((40, 3), 1 / 3))
  with pytest.raises(ValueError, match="target_dist: rows must sum to 1"):
    cross_fit_reward_model(x, a, r, num_actions=3, key=jax.random.key(0), method="mrdr",
                           logging_probs=np.full(40, 0.5), target_dist=np.full((40, 3), 0.5))
  with pytest.raises(ValueError, match="floor: must be <="):
    cross_fit_propensities(x, a, num_actions=3, key=jax.random.key(0), floor=0.5)
  with pytest.raises(TypeError, match="optimizer: must be an optax"):
    cross_fit_propensities(x, a, num_actions=3, key=jax.random.key(0), optimizer="adam")


def test_public_paths():
  assert sj.models.cross_fit_reward_model is rm.cross_fit_reward_model
  assert sj.models.cross_fit_propensities is rm.cross_fit_propensities
  assert sj.models.RewardModelFit is rm.RewardModelFit


@pytest.mark.slow
def test_vmap_over_logs_equals_a_loop():
  """Under jax.vmap (or jax.jit) the values are the caller's to check and the loss must be named
  (loss="auto" reads the rewards); the numbers are those of the eager calls, log by log (the
  propensity model shares the vmapped fitting loop)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 40, 2)).astype(np.float32)
  a = rng.integers(0, 3, (2, 40))
  r = (rng.random((2, 40)) < 0.4).astype(np.float32)
  keys = jax.random.split(jax.random.key(0), 2)

  def reward_hat(x, a, r, key):
    return cross_fit_reward_model(x, a, r, num_actions=3, key=key, loss="logistic",
                                  num_steps=20).reward_hat

  eager = np.stack([reward_hat(x[i], a[i], r[i], keys[i]) for i in range(2)])
  np.testing.assert_allclose(jax.vmap(reward_hat)(x, a, r, keys), eager, atol=1e-6)
  with pytest.raises(ValueError, match="loss: 'auto' reads the rewards"):
    jax.jit(lambda r: cross_fit_reward_model(x[0], a[0], r, num_actions=3, key=keys[0]))(r[0])
