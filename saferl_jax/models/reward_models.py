"""Cross-fitted reward and propensity models for off-policy evaluation on real logs (floor 2).

DM, DR, SNDR, Switch-DR and DRos need a reward model qhat(x, a) (qhat(x, a, l) with slots), and
logs without recorded propensities need an estimate of the logger pi0(a | x). Both are fitted
here out of fold: the rounds are split into K folds by a permutation drawn from `key`, K models
are fitted at once (`jax.vmap` over folds, each fold's rows weighted 0 in its own model), and
round i's prediction comes from the one model that never saw it (cross-fitting, as in double /
debiased machine learning), so no round's own reward or action enters its own qhat or pi0hat.

The models are pure functions of a params pytree (no Flax), fitted by full-batch optax steps in
one compiled call for all folds: the fit is written for one fold and vmapped over folds, so each
fold model has its own optimizer state and line search and never sees a number computed from its
own fold. The default optimizer is `optax.lbfgs()` with its zoom line search, which needs no
learning rate and converges in tens of steps on these smooth, L2-regularised objectives; any
optax transformation may be passed instead (`optimizer=optax.adam(1e-2)`), and passing the same
object again reuses the compiled fit. The steps run in a `lax.while_loop` that stops once a step
lowers the objective by at most `tol` (relative), at most `num_steps` steps: at float32 precision
a converged L-BFGS would otherwise spend its whole line-search budget on every further step (on
OBD's sample, 100 fixed steps cost about ten times 10).

Features. A round is (x, a, l): the context x [d], the action's representation phi(a) [F] (its
one-hot, F = A, or its row of `action_features` [A, F], e.g. OBD's item features) and, with
positions, the slot's one-hot e_l [L] (without positions there is one slot, and e_l = [1] is the
intercept).

References:
  Farajtabar, Chow, Ghavamzadeh. More Robust Doubly Robust Off-policy Evaluation. ICML 2018.
  https://arxiv.org/abs/1802.03493
  Chernozhukov, Chetverikov, Demirer, Duflo, Hansen, Newey, Robins. Double/Debiased Machine
  Learning for Treatment and Structural Parameters. Econometrics Journal 2018.
  https://arxiv.org/abs/1608.00060
  Saito, Aihara, Matsutani, Narita. Open Bandit Dataset and Pipeline: Towards Realistic and
  Reproducible Off-Policy Evaluation. NeurIPS 2021 Datasets and Benchmarks.
  https://arxiv.org/abs/2008.07146
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from saferl_jax import checks

MODELS = ("logistic", "mlp")
METHODS = ("normal", "iw", "mrdr")
LOSSES = ("auto", "logistic", "squared")


class RewardModelFit(NamedTuple):
  """Out-of-fold predictions of a cross-fitted reward model.

  Attributes:
    reward_hat: [n, A] qhat(x_i, a) for every action ([n, A, L], qhat(x_i, a, l) for every
      slot, when positions were given); row i from the model fitted without fold_ids[i].
    fold_ids: [n] the fold of each round, in [0, num_folds).
    train_losses: [num_folds, num_steps] each fold model's training objective (weighted mean
      loss plus penalty, see `cross_fit_reward_model`) before each step; once its fit has
      stopped (see `tol`), the last value repeats.
  """
  reward_hat: jax.Array
  fold_ids: jax.Array
  train_losses: jax.Array


class PropensityFit(NamedTuple):
  """Out-of-fold estimates of the logging policy.

  Attributes:
    logging_probs: [n] max(pi0hat(a_i | x_i[, l_i]), floor): the estimated propensity of each
      logged action (at its slot), floored; pass it where an estimator wants logging_probs.
    dist: [n, A] pi0hat(. | x_i), each row summing to 1 ([n, A, L] with positions: dist[i, :, l]
      is the distribution over actions at slot l); not floored.
    fold_ids: [n] the fold of each round, in [0, num_folds).
    train_losses: [num_folds, num_steps] each fold model's training objective (mean negative
      log-likelihood plus penalty) before each step; once its fit has stopped (see `tol`), the
      last value repeats.
  """
  logging_probs: jax.Array
  dist: jax.Array
  fold_ids: jax.Array
  train_losses: jax.Array


# Fitting weights.


def fitting_weights(actions: ArrayLike, *, method: str = "normal",
                    logging_probs: ArrayLike | None = None, target_dist: ArrayLike | None = None,
                    positions: ArrayLike | None = None) -> jax.Array:
  """Per-round sample weights s_i of Open Bandit Pipeline's three reward-model fitting methods.

  "normal": s_i = 1; "iw": s_i = pi(a_i|x_i) / p_i; "mrdr": s_i = pi(a_i|x_i) (1 - p_i) / p_i^2,
  with p_i = logging_probs[i] and pi(a_i|x_i) = target_dist[i, a_i] (target_dist[i, a_i,
  positions[i]] for a target_dist [n, A, L] with positions). "mrdr" weights the squared error of
  qhat so that the fitted model minimises the variance of the DR estimate (More Robust DR).

  Args:
    actions: [n] logged actions.
    method: "normal", "iw" or "mrdr".
    logging_probs: [n] propensities p_i in (0, 1]; required by "iw" and "mrdr".
    target_dist: [n, A] target policy pi(. | x_i), or [n, A, L] with positions; required by "iw"
      and "mrdr".
    positions: [n] slots, to read a target_dist [n, A, L].

  Returns:
    [n] weights (ones for "normal").

  Example:
    >>> import jax.numpy as jnp
    >>> w = fitting_weights(jnp.array([0, 1]), method="mrdr", logging_probs=jnp.array([0.5, 0.25]),
    ...                     target_dist=jnp.array([[1.0, 0.0], [0.5, 0.5]]))
    >>> [round(float(v), 3) for v in w]  # 1 * 0.5 / 0.25, 0.5 * 0.75 / 0.0625
    [2.0, 6.0]

  References:
    Farajtabar, Chow, Ghavamzadeh. More Robust Doubly Robust Off-policy Evaluation. ICML 2018.
    https://arxiv.org/abs/1802.03493
  """
  checks.check_choice("method", method, METHODS)
  actions = checks.as_int("actions", actions)
  checks.check_ndim("actions", actions, 1)
  n = actions.shape[0]
  if method == "normal":
    return jnp.ones((n,), jnp.result_type(float))
  missing = [name for name, value in (("logging_probs", logging_probs),
                                      ("target_dist", target_dist)) if value is None]
  if missing:
    raise ValueError(f"{', '.join(missing)}: method={method!r} weights rounds by pi(a_i|x_i) / "
                     f"p_i and needs logging_probs [n] and target_dist [n, A] (or [n, A, L])")
  logging_probs = checks.as_float("logging_probs", logging_probs)
  target_dist = checks.as_float("target_dist", target_dist)
  checks.check_ndim("logging_probs", logging_probs, 1)
  if positions is not None:
    positions = checks.as_int("positions", positions)
    checks.check_ndim("positions", positions, 1)
  _check_target_dist(target_dist, n, None, positions)
  checks.check_same_length(actions=actions, logging_probs=logging_probs)
  checks.check_values(
      (checks.ValueCheck("actions", "index", target_dist.shape[1], "action"),
       checks.ValueCheck("logging_probs", "probability"),
       checks.ValueCheck("target_dist", "distribution_rows"),
       checks.ValueCheck("positions", "index",
                         target_dist.shape[2] if target_dist.ndim == 3 else 1, "position")),
      actions, logging_probs, _actions_last(target_dist),
      positions if target_dist.ndim == 3 else None)
  return _fitting_weights(method, actions, logging_probs, target_dist,
                          jnp.zeros_like(actions) if positions is None else positions)


def _fitting_weights(method: str, actions, logging_probs, target_dist, positions) -> jax.Array:
  if method == "normal":
    return jnp.ones(actions.shape, logging_probs.dtype if logging_probs is not None
                    else jnp.result_type(float))
  rows = jnp.arange(actions.shape[0])
  if target_dist.ndim == 3:
    pi = target_dist[rows, actions, positions]
  else:
    pi = target_dist[rows, actions]
  if method == "iw":
    return pi / logging_probs
  return pi * (1.0 - logging_probs) / jnp.square(logging_probs)


def _actions_last(target_dist: jax.Array) -> jax.Array:
  """target_dist with the action axis last, so each row of the check is one distribution."""
  return jnp.moveaxis(target_dist, 1, -1) if target_dist.ndim == 3 else target_dist


def _check_target_dist(target_dist: jax.Array, n: int, num_actions: int | None,
                       positions) -> None:
  want = "[n, A] (or [n, A, L] with positions)"
  if target_dist.ndim not in (2, 3) or (target_dist.ndim == 3 and positions is None):
    raise ValueError(f"target_dist: expected {want}, got shape {tuple(target_dist.shape)}"
                     + (" without positions" if target_dist.ndim == 3 else ""))
  if target_dist.shape[0] != n:
    raise ValueError(f"target_dist: has {target_dist.shape[0]} rounds but actions has {n}")
  if num_actions is not None and target_dist.shape[1] != num_actions:
    raise ValueError(f"target_dist: has {target_dist.shape[1]} actions, num_actions is "
                     f"{num_actions}")


# Folds and the fitting loop.


def _fold_ids(key: jax.Array, n: int, num_folds: int) -> jax.Array:
  """[n] balanced folds: the rounds of a random permutation dealt out in turn."""
  order = jax.random.permutation(key, n)
  return jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) % num_folds)


_DEFAULT_OPTIMIZER: list = []


def _default_optimizer() -> optax.GradientTransformationExtraArgs:
  """One optax.lbfgs() for the process, so repeated fits reuse the compiled code."""
  if not _DEFAULT_OPTIMIZER:
    _DEFAULT_OPTIMIZER.append(optax.lbfgs())
  return _DEFAULT_OPTIMIZER[0]


def _check_optimizer(optimizer) -> optax.GradientTransformationExtraArgs:
  if optimizer is None:
    return _default_optimizer()
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(f"optimizer: must be an optax GradientTransformation (e.g. optax.lbfgs()), "
                    f"got {type(optimizer).__name__}")
  if isinstance(optimizer, optax.GradientTransformationExtraArgs):
    return optimizer
  return _with_extra_args(optimizer)


@functools.lru_cache(maxsize=32)
def _with_extra_args(optimizer):
  # Cached, so the same plain transformation maps to the same wrapper and the fit compiles once.
  return optax.with_extra_args_support(optimizer)


def _minimise(objective: Callable[[Any], jax.Array], params, optimizer, num_steps: int,
              tol: float | jax.Array):
  """Full-batch optax steps on one fold's objective; (final params, [num_steps] objectives).

  Written for one fold and vmapped over folds: each fold model keeps its own optimizer state
  and line search, so model k never sees a number computed from fold k's rows (a line search
  shared by all folds would let them steer it). A `lax.while_loop` runs at most `num_steps`
  steps and stops once a step lowers the objective by no more than tol times its value; vmapped,
  the loop ends when every fold has stopped, a stopped fold's parameters staying as they are. A
  step whose parameters would not be finite is skipped (the parameters stay), so one bad line
  search cannot turn the model into NaN; the objective then stops moving and the loop stops.

  Returns:
    (final params, [num_steps] the objective before each step; after the stop, the last value
    repeats).
  """
  value_and_grad = jax.value_and_grad(objective)
  dtype = jax.tree.leaves(params)[0].dtype

  def keep_going(carry):
    step, *_, done = carry
    return (step < num_steps) & ~done

  def body(carry):
    step, params, state, previous, values, _ = carry
    value, grad = value_and_grad(params)
    updates, state = optimizer.update(grad, state, params, value=value, grad=grad,
                                      value_fn=objective)
    new = optax.apply_updates(params, updates)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
    params = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, params)
    decrease = previous - value
    done = (decrease >= 0) & (decrease <= tol * jnp.abs(value))
    return step + 1, params, state, value, values.at[step].set(value), done

  carry = (jnp.asarray(0), params, optimizer.init(params), jnp.asarray(jnp.inf, dtype),
           jnp.zeros((num_steps,), dtype), jnp.asarray(False))
  steps, params, _, last, values, _ = jax.lax.while_loop(keep_going, body, carry)
  return params, jnp.where(jnp.arange(num_steps) < steps, values, last)


def _penalty(params: dict, penalised: tuple[str, ...]) -> jax.Array:
  return sum(jnp.sum(jnp.square(params[name])) for name in penalised)


# Reward models: params pytrees and pure functions of them.


def _init_logistic(key, num_features: int, action_dim: int, num_positions: int, dtype) -> dict:
  del key  # the objective is convex: start at 0
  return {"w": jnp.zeros((num_features, action_dim + num_positions), dtype),
          "v": jnp.zeros((action_dim,), dtype), "c": jnp.zeros((num_positions,), dtype)}


def _logistic_logged(params, contexts, phi_logged, positions):
  """Scores of the logged (x_i, a_i, l_i): x_i^T W [phi(a_i), e_l] + v . phi(a_i) + c_l."""
  action_dim = phi_logged.shape[1]
  xw = contexts @ params["w"]
  rows = jnp.arange(contexts.shape[0])
  return (jnp.sum((xw[:, :action_dim] + params["v"]) * phi_logged, axis=1)
          + xw[rows, action_dim + positions] + params["c"][positions])


def _logistic_all(params, contexts, phi):
  """[n, A, L] scores of every (x_i, a, l)."""
  action_dim = phi.shape[1]
  xw = contexts @ params["w"]
  by_action = (xw[:, :action_dim] + params["v"]) @ phi.T  # [n, A]
  by_slot = xw[:, action_dim:] + params["c"]  # [n, L]
  return by_action[:, :, None] + by_slot[:, None, :]


def _init_mlp(key, num_features: int, action_dim: int, num_positions: int, dtype,
              hidden_size: int) -> dict:
  k1, k2, k3, k4 = jax.random.split(key, 4)
  fan_in = num_features + action_dim + num_positions
  scale = 1.0 / np.sqrt(max(fan_in, 1))
  normal = lambda k, shape, s: s * jax.random.normal(k, shape, dtype)  # noqa: E731
  return {"w_x": normal(k1, (num_features, hidden_size), scale),
          "w_a": normal(k2, (action_dim, hidden_size), scale),
          "w_l": normal(k3, (num_positions, hidden_size), scale),
          "b1": jnp.zeros((hidden_size,), dtype),
          "w_out": normal(k4, (hidden_size,), 1.0 / np.sqrt(hidden_size)),
          "b_out": jnp.zeros((), dtype)}


def _mlp_logged(params, contexts, phi_logged, positions):
  """Scores of the logged rounds: w_out . tanh(W_x x + W_a phi(a) + W_l e_l + b1) + b_out."""
  hidden = jnp.tanh(contexts @ params["w_x"] + phi_logged @ params["w_a"]
                    + params["w_l"][positions] + params["b1"])
  return hidden @ params["w_out"] + params["b_out"]


def _mlp_all(params, contexts, phi):
  """[n, A, L] scores, one action at a time (memory n L hidden, not n A L hidden)."""
  x_part = contexts @ params["w_x"] + params["b1"]  # [n, H]
  a_part = phi @ params["w_a"]  # [A, H]

  def one_action(a_row):
    hidden = jnp.tanh(x_part[:, None, :] + a_row + params["w_l"][None])  # [n, L, H]
    return hidden @ params["w_out"] + params["b_out"]  # [n, L]
  return jnp.moveaxis(jax.lax.map(one_action, a_part), 0, 1)


_REWARD_MODELS = {
    # name: (init, scores of logged rounds, scores of every (a, l), penalised params)
    "logistic": (_init_logistic, _logistic_logged, _logistic_all, ("w", "v")),
    "mlp": (_init_mlp, _mlp_logged, _mlp_all, ("w_x", "w_a", "w_l", "w_out")),
}


def _link(loss: str, scores: jax.Array) -> jax.Array:
  return jax.nn.sigmoid(scores) if loss == "logistic" else scores


def _per_round_loss(loss: str, scores: jax.Array, rewards: jax.Array) -> jax.Array:
  if loss == "logistic":
    return optax.sigmoid_binary_cross_entropy(scores, rewards)
  return 0.5 * jnp.square(scores - rewards)


def _train_weights(sample_weights, fold_ids, fold):
  """Weights of one fold model: s_i on the other folds, 0 on its own, normalised to mean 1 on
  the rows it trains on (all 0 when the target never takes a logged action there)."""
  train = fold_ids != fold
  w = jnp.where(train, sample_weights, 0.0)
  total = jnp.sum(w)
  scale = jnp.where(total > 0, jnp.sum(train) / jnp.where(total > 0, total, 1.0), 0.0)
  return w * scale, jnp.sum(train)


@functools.partial(jax.jit, static_argnames=("model", "loss", "num_folds", "num_positions",
                                               "num_steps", "hidden_size", "optimizer"))
def _fit_reward_kernel(contexts, actions, rewards, positions, phi, sample_weights, key, l2, tol, *,
                       model, loss, num_folds, num_positions, num_steps, hidden_size, optimizer):
  init, logged, every, penalised = _REWARD_MODELS[model]
  fold_key, init_key = jax.random.split(key)
  n = contexts.shape[0]
  fold_ids = _fold_ids(fold_key, n, num_folds)
  phi_logged = phi[actions]
  dtype = contexts.dtype
  extra = {"hidden_size": hidden_size} if model == "mlp" else {}

  def fit_fold(fold, fold_key):
    weights, num_train = _train_weights(sample_weights, fold_ids, fold)

    def objective(params):
      scores = logged(params, contexts, phi_logged, positions)
      data = jnp.sum(weights * _per_round_loss(loss, scores, rewards))
      return (data + 0.5 * l2 * _penalty(params, penalised)) / num_train

    params0 = init(fold_key, contexts.shape[1], phi.shape[1], num_positions, dtype, **extra)
    return _minimise(objective, params0, optimizer, num_steps, tol)

  folds = jnp.arange(num_folds)
  params, losses = jax.vmap(fit_fold)(folds, jax.random.split(init_key, num_folds))

  def out_of_fold(reward_hat, fold_and_params):
    fold, fold_params = fold_and_params
    predictions = _link(loss, every(fold_params, contexts, phi))
    return jnp.where((fold_ids == fold)[:, None, None], predictions, reward_hat), None

  reward_hat, _ = jax.lax.scan(out_of_fold, jnp.zeros((n, phi.shape[0], num_positions), dtype),
                               (folds, params))
  return reward_hat, fold_ids, losses


# Shared input checks.


def _check_common(contexts, actions, *, num_actions, key, positions, num_positions, num_folds,
                  num_steps, tol, l2):
  checks.check_count("num_actions", num_actions)
  checks.check_key("key", key)
  checks.check_count("num_folds", num_folds, low=2)
  checks.check_count("num_steps", num_steps)
  checks.check_real("l2", l2, low=0.0)
  checks.check_real("tol", tol, low=0.0)
  contexts = checks.as_float("contexts", contexts)
  if contexts.ndim != 2:
    raise ValueError(f"contexts: expected a 2-d array [n, d], got shape {tuple(contexts.shape)}")
  actions = checks.as_int("actions", actions)
  checks.check_ndim("actions", actions, 1)
  arrays = {"contexts": contexts, "actions": actions}
  if positions is None:
    if num_positions is not None:
      raise ValueError("num_positions: given without positions; pass positions [n] as well")
  else:
    if num_positions is None:
      raise ValueError("num_positions: required with positions (the L of the [n, A, L] output)")
    checks.check_count("num_positions", num_positions)
    positions = checks.as_int("positions", positions)
    checks.check_ndim("positions", positions, 1)
    arrays["positions"] = positions
  n = checks.check_same_length(**arrays)
  if num_folds > n:
    raise ValueError(f"num_folds: must be at most the number of rounds ({n}), got {num_folds}")
  return contexts, actions, positions, n


def cross_fit_reward_model(
    contexts: ArrayLike, actions: ArrayLike, rewards: ArrayLike, *, num_actions: int,
    key: jax.Array, positions: ArrayLike | None = None, num_positions: int | None = None,
    action_features: ArrayLike | None = None, logging_probs: ArrayLike | None = None,
    target_dist: ArrayLike | None = None, num_folds: int = 2, model: str = "logistic",
    method: str = "normal", loss: str = "auto", num_steps: int = 100, tol: float = 1e-6,
    l2: float = 1.0, hidden_size: int = 32, optimizer: optax.GradientTransformation | None = None,
) -> RewardModelFit:
  """Out-of-fold qhat(x_i, a) for every action (and slot), from K models fitted on the other folds.

  Round i's fold k = fold_ids[i] comes from a permutation drawn from `key`; model k minimises

    (sum_{j not in fold k} (s_j / sbar_k) loss(f(x_j, a_j, l_j), r_j) + (l2 / 2) ||theta||^2) / n_k

  over the n_k rounds outside fold k, where s_j are the fitting weights of `method` (see
  `fitting_weights`) normalised by their mean sbar_k there. reward_hat[i] = link(f_k(x_i, a, l))
  for every a (and l). With l2 = 1 and "normal" this is scikit-learn's LogisticRegression(C=1)
  objective, the base model Open Bandit Pipeline's examples use.

  Models, over (x, phi(a), e_l) (see the module docstring):
    "logistic": f = x^T W [phi(a), e_l] + v . phi(a) + c_l, a bilinear contextual model: with
      one-hot actions x^T W phi(a) gives each action its own weight vector over the context, and
      x^T W e_l each slot its own; v . phi(a) is a per-action bias and c_l an unpenalised slot
      intercept. W and v are penalised. Convex; starts at 0.
    "mlp": f = w_out . tanh(W_x x + W_a phi(a) + W_l e_l + b1) + b_out, one hidden layer of
      `hidden_size` units, weights penalised, initialised from `key`.

  Loss and link: "logistic" (binary cross-entropy on the logit, qhat = sigmoid(f)) or "squared"
  (0.5 (f - r)^2, qhat = f); "auto" picks "logistic" when every reward is 0 or 1 and "squared"
  otherwise (it reads the rewards, so under jax.jit name the loss). As in OBP, whose fitting
  methods pass s_i as sample weights to the base model's own loss, "iw" and "mrdr" weight this
  loss (Farajtabar et al. state MRDR for the squared error).

  Args:
    contexts: [n, d] context features x_i.
    actions: [n] logged actions in [0, num_actions).
    rewards: [n] observed rewards.
    num_actions: A, the number of actions.
    key: a typed PRNG key; it draws the folds (the same as `cross_fit_propensities` draws from
      the same key and n) and the MLP's initial weights. Same key, same result.
    positions: [n] slot of each round in [0, num_positions); the model then takes the slot as an
      input and reward_hat covers every slot.
    num_positions: L, required with positions.
    action_features: [A, F] features phi(a) of each action (default: the one-hot, F = A).
    logging_probs: [n] propensities, for method "iw" and "mrdr".
    target_dist: [n, A] (or [n, A, L] with positions) the target policy, for "iw" and "mrdr".
    num_folds: K >= 2, at most n.
    model: "logistic" or "mlp".
    method: "normal", "iw" or "mrdr" (OBP's fitting methods; see `fitting_weights`).
    loss: "auto", "logistic" or "squared".
    num_steps: the most optimizer steps (full batch).
    tol: stop once a step lowers the summed objective by at most tol times its value (0: run
      every step).
    l2: penalty on the weights (in units of one training round, as scikit-learn's 1 / C).
    hidden_size: hidden units of the "mlp".
    optimizer: an optax transformation; default `optax.lbfgs()` (zoom line search, no learning
      rate). With a first-order one, give its learning rate: `optax.adam(1e-2)`.

  Returns:
    A `RewardModelFit(reward_hat, fold_ids, train_losses)`; reward_hat is [n, A], or [n, A, L]
    with positions.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (60, 2))
    >>> a = jnp.arange(60) % 3
    >>> r = (x[:, 0] > 0).astype(jnp.float32)
    >>> fit = cross_fit_reward_model(x, a, r, num_actions=3, key=jax.random.key(1), num_steps=10)
    >>> fit.reward_hat.shape, fit.train_losses.shape
    ((60, 3), (2, 10))

  References:
    Farajtabar, Chow, Ghavamzadeh. More Robust Doubly Robust Off-policy Evaluation. ICML 2018.
    https://arxiv.org/abs/1802.03493
    Chernozhukov et al. Double/Debiased Machine Learning for Treatment and Structural
    Parameters. 2018. https://arxiv.org/abs/1608.00060
    Saito, Aihara, Matsutani, Narita. Open Bandit Dataset and Pipeline. NeurIPS 2021 Datasets
    and Benchmarks. https://arxiv.org/abs/2008.07146
  """
  checks.check_choice("model", model, MODELS)
  checks.check_choice("method", method, METHODS)
  checks.check_choice("loss", loss, LOSSES)
  checks.check_count("hidden_size", hidden_size)
  optimizer = _check_optimizer(optimizer)
  contexts, actions, positions, n = _check_common(
      contexts, actions, num_actions=num_actions, key=key, positions=positions,
      num_positions=num_positions, num_folds=num_folds, num_steps=num_steps, tol=tol, l2=l2)
  rewards = checks.as_float("rewards", rewards)
  checks.check_ndim("rewards", rewards, 1)
  checks.check_same_length(actions=actions, rewards=rewards)
  dtype = contexts.dtype
  if action_features is None:
    phi = jnp.eye(num_actions, dtype=dtype)
  else:
    phi = checks.as_float("action_features", action_features)
    if phi.ndim != 2 or phi.shape[0] != num_actions:
      raise ValueError(f"action_features: expected [num_actions, F] = [{num_actions}, F], got "
                       f"shape {tuple(phi.shape)}")
  if method != "normal":
    missing = [name for name, value in (("logging_probs", logging_probs),
                                        ("target_dist", target_dist)) if value is None]
    if missing:
      raise ValueError(f"{', '.join(missing)}: method={method!r} weights rounds by "
                       f"pi(a_i|x_i) / p_i and needs logging_probs [n] and target_dist [n, A] "
                       f"(or [n, A, L] with positions)")
    logging_probs = checks.as_float("logging_probs", logging_probs)
    checks.check_ndim("logging_probs", logging_probs, 1)
    checks.check_same_length(actions=actions, logging_probs=logging_probs)
    target_dist = checks.as_float("target_dist", target_dist)
    _check_target_dist(target_dist, n, num_actions, positions)
    if target_dist.ndim == 3 and target_dist.shape[2] != num_positions:
      raise ValueError(f"target_dist: has {target_dist.shape[2]} slots, num_positions is "
                       f"{num_positions}")
  else:
    logging_probs = target_dist = None
  checks.check_values(
      (checks.ValueCheck("contexts", "finite"),
       checks.ValueCheck("actions", "index", num_actions, "action"),
       checks.ValueCheck("rewards", "finite"),
       checks.ValueCheck("positions", "index", num_positions, "position"),
       checks.ValueCheck("action_features", "finite"),
       checks.ValueCheck("logging_probs", "probability"),
       checks.ValueCheck("target_dist", "distribution_rows")),
      contexts, actions, rewards, positions, None if action_features is None else phi,
      logging_probs, None if target_dist is None else _actions_last(target_dist))
  if loss == "auto":
    if not checks.is_concrete(rewards):
      raise ValueError("loss: 'auto' reads the rewards, which are traced here; pass "
                       "loss='logistic' or loss='squared'")
    host = np.asarray(rewards)
    loss = "logistic" if np.all((host == 0) | (host == 1)) else "squared"
  elif loss == "logistic" and checks.is_concrete(rewards):
    host = np.asarray(rewards)
    if np.any((host < 0) | (host > 1)):
      raise ValueError("rewards: loss='logistic' needs rewards in [0, 1]; use loss='squared'")
  slots = jnp.zeros_like(actions) if positions is None else positions
  weights = _fitting_weights(method, actions, logging_probs, target_dist, slots)
  reward_hat, fold_ids, losses = _fit_reward_kernel(
      contexts, actions, rewards, slots, phi, weights.astype(dtype), key,
      jnp.asarray(l2, dtype), jnp.asarray(tol, dtype), model=model, loss=loss, num_folds=num_folds,
      num_positions=1 if positions is None else num_positions, num_steps=num_steps,
      hidden_size=hidden_size, optimizer=optimizer)
  if positions is None:
    reward_hat = reward_hat[:, :, 0]
  return RewardModelFit(reward_hat, fold_ids, losses)


# Propensity model: multinomial logistic regression over actions (within a slot).


@functools.partial(jax.jit, static_argnames=("num_actions", "num_folds", "num_positions",
                                               "num_steps", "optimizer"))
def _fit_propensity_kernel(contexts, actions, positions, key, l2, tol, *, num_actions, num_folds,
                           num_positions, num_steps, optimizer):
  fold_key, _ = jax.random.split(key)  # the same folds as the reward model from this key
  n, d = contexts.shape
  fold_ids = _fold_ids(fold_key, n, num_folds)
  dtype = contexts.dtype
  rows = jnp.arange(n)

  def logits_of(params):  # [n, L, A]
    by_context = contexts @ params["w"] + params["b"]
    return by_context[:, None, :] + params["c"][None]

  def fit_fold(fold):
    weights, num_train = _train_weights(jnp.ones((n,), dtype), fold_ids, fold)

    def objective(params):
      logits = contexts @ params["w"] + params["b"] + params["c"][positions]  # [n, A], own slot
      nll = -jax.nn.log_softmax(logits)[rows, actions]
      penalty = sum(jnp.sum(jnp.square(p)) for p in params.values())
      return (jnp.sum(weights * nll) + 0.5 * l2 * penalty) / num_train

    params0 = {"w": jnp.zeros((d, num_actions), dtype), "b": jnp.zeros((num_actions,), dtype),
               "c": jnp.zeros((num_positions, num_actions), dtype)}
    return _minimise(objective, params0, optimizer, num_steps, tol)

  folds = jnp.arange(num_folds)
  params, losses = jax.vmap(fit_fold)(folds)

  def out_of_fold(dist, fold_and_params):
    fold, fold_params = fold_and_params
    predictions = jax.nn.softmax(logits_of(fold_params), axis=-1)
    return jnp.where((fold_ids == fold)[:, None, None], predictions, dist), None

  dist, _ = jax.lax.scan(out_of_fold, jnp.zeros((n, num_positions, num_actions), dtype),
                         (folds, params))
  return jnp.swapaxes(dist, 1, 2), fold_ids, losses  # [n, A, L]


def cross_fit_propensities(
    contexts: ArrayLike, actions: ArrayLike, *, num_actions: int, key: jax.Array,
    positions: ArrayLike | None = None, num_positions: int | None = None, num_folds: int = 2,
    floor: float | None = None, num_steps: int = 100, tol: float = 1e-6, l2: float = 1.0,
    optimizer: optax.GradientTransformation | None = None,
) -> PropensityFit:
  """Out-of-fold logging propensities pi0hat(a_i | x_i) from a cross-fitted multinomial logit.

  pi0hat(a | x, l) = softmax_a(x^T W + b + c_l)[a]: one weight vector W[:, a] and bias b[a] per
  action, plus a per-slot action bias c_l [A] when positions are given. With positions this is
  OBD's (and OBP's) meaning of a propensity: the probability of action a *at* slot l, a
  distribution over actions within each slot (the slot is an input, not predicted). Fold model k
  minimises (sum_{j not in fold k} -log pi0hat(a_j | x_j, l_j) + (l2 / 2) ||(W, b, c)||^2) / n_k,
  starting from the uniform logger (all 0); the folds are those of `cross_fit_reward_model` with
  the same key. The logged propensity is floored,

    logging_probs[i] = max(pi0hat(a_i | x_i, l_i), floor),   floor = 1 / (10 A) by default,

  so that no importance weight exceeds 10 A times the target's probability when the model is
  confidently wrong; `dist` is left unfloored and its rows sum to 1.

  Args:
    contexts: [n, d] context features x_i.
    actions: [n] logged actions in [0, num_actions).
    num_actions: A, the number of actions.
    key: a typed PRNG key; it draws the folds. Same key, same result.
    positions: [n] slot of each round in [0, num_positions).
    num_positions: L, required with positions.
    num_folds: K >= 2, at most n.
    floor: lower bound of the returned logging_probs, in (0, 1 / A]; default 1 / (10 A).
    num_steps: the most optimizer steps (full batch).
    tol: stop once a step lowers the summed objective by at most tol times its value (0: run
      every step).
    l2: penalty on W, b and c, in units of one training round.
    optimizer: an optax transformation; default `optax.lbfgs()`.

  Returns:
    A `PropensityFit(logging_probs, dist, fold_ids, train_losses)`; dist is [n, A], or [n, A, L]
    with positions.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (60, 2))
    >>> a = (x[:, 0] > 0).astype(jnp.int32)
    >>> fit = cross_fit_propensities(x, a, num_actions=2, key=jax.random.key(1), num_steps=10)
    >>> fit.logging_probs.shape, fit.dist.shape, bool(jnp.allclose(fit.dist.sum(1), 1.0))
    ((60,), (60, 2), True)

  References:
    Chernozhukov et al. Double/Debiased Machine Learning for Treatment and Structural
    Parameters. 2018. https://arxiv.org/abs/1608.00060
    Saito, Aihara, Matsutani, Narita. Open Bandit Dataset and Pipeline. NeurIPS 2021 Datasets
    and Benchmarks. https://arxiv.org/abs/2008.07146
  """
  optimizer = _check_optimizer(optimizer)
  contexts, actions, positions, n = _check_common(
      contexts, actions, num_actions=num_actions, key=key, positions=positions,
      num_positions=num_positions, num_folds=num_folds, num_steps=num_steps, tol=tol, l2=l2)
  if floor is None:
    floor = 1.0 / (10 * num_actions)
  else:
    checks.check_real("floor", floor, low=0.0, high=1.0 / num_actions, open_low=True)
  checks.check_values(
      (checks.ValueCheck("contexts", "finite"),
       checks.ValueCheck("actions", "index", num_actions, "action"),
       checks.ValueCheck("positions", "index", num_positions, "position")),
      contexts, actions, positions)
  slots = jnp.zeros_like(actions) if positions is None else positions
  dist, fold_ids, losses = _fit_propensity_kernel(
      contexts, actions, slots, key, jnp.asarray(l2, contexts.dtype),
      jnp.asarray(tol, contexts.dtype), num_actions=num_actions,
      num_folds=num_folds, num_positions=1 if positions is None else num_positions,
      num_steps=num_steps, optimizer=optimizer)
  logged = dist[jnp.arange(n), actions, slots]
  logging_probs = jnp.maximum(logged, jnp.asarray(floor, dist.dtype))
  if positions is None:
    dist = dist[:, :, 0]
  return PropensityFit(logging_probs, dist, fold_ids, losses)
