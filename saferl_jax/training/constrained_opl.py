"""Constrained off-policy learning by primal-dual steps, many seeds at once (floor 3).

Each step, for every seed, on its whole log (full batch: the lower bound needs every round):

  primal  theta <- optimizer step ascending L(theta, lambda) = V0hat + lambda . (LCB_delta(Vhat)
          - b)   (`saferl_jax.opl.constrained.constrained_objective`);
  dual    lambda <- dual.update(lambda, slacks) from the same step's slacks LCB_delta(Vihat) - b_i
          (`saferl_jax.constrained.dual_descent` or `nu_pi`), every `dual_every` steps;

through the one training driver (`saferl_jax.training.driver.run`: S seeds vmapped, compiled
chunks, orbax checkpoints after every chunk, resumed bit for bit). The multipliers and the
controller's memory live in the train state, so they are checkpointed with the parameters. With
`dual=None` the multipliers stay at their initial values: 0 gives the unconstrained learner
(max V0hat), w the fixed-weight sum V0hat + w . (Vhat - b) (with penalty="estimate").

References:
  Khalafi, Hounie, Ding, Ribeiro. NeurIPS 2025. https://arxiv.org/abs/2508.19104
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. RecSys 2024. https://arxiv.org/abs/2405.05736
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from saferl_jax import checks
from saferl_jax.constrained.duals import DualOptimizer, DualState
from saferl_jax.opl.constrained import (ESTIMATORS, PENALTIES, ConstrainedBatch,
                                        constrained_objective)
from saferl_jax.stats.bounds import METHODS as BOUNDS
from saferl_jax.training import checkpoints, driver
from saferl_jax.training.driver import TrainResult


class ConstrainedTrainState(NamedTuple):
  """The policy's parameters, the optimizer's state and the dual variables (one seed, or [S, ...]).

  Attributes:
    params: the policy's parameters.
    opt_state: the optax optimizer's state.
    dual: the `DualState` (multipliers [m] and the controller's memory).
  """
  params: Any
  opt_state: Any
  dual: DualState


def _step(state: ConstrainedTrainState, data: tuple, key: jax.Array, step: jax.Array, *,
          apply_fn, optimizer, dual, names, estimator, delta, bound, max_value, penalty,
          dual_every):
  del key  # full-batch steps: nothing random
  data, thresholds = data  # the thresholds travel as data: another b reuses the compiled chunk

  def lagrangian(params):
    policy_dist = jax.nn.softmax(apply_fn(params, data.contexts), axis=-1)
    out = constrained_objective(
        policy_dist, data.actions, data.rewards, data.logging_probs, state.dual.multipliers,
        thresholds=thresholds.astype(policy_dist.dtype), estimator=estimator,
        reward_hat=data.reward_hat, delta=delta, bound=bound, max_value=max_value,
        penalty=penalty)
    return out.lagrangian, out

  grads, out = jax.grad(lagrangian, has_aux=True)(state.params)
  ascent = jax.tree_util.tree_map(jnp.negative, grads)
  updates, opt_state = optimizer.update(ascent, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_dual = state.dual
  if dual is not None:
    stepped = dual.update(state.dual, out.slacks)
    due = (step + 1) % dual_every == 0
    new_dual = jax.tree_util.tree_map(lambda new, old: jnp.where(due, new, old), stepped,
                                      state.dual)
  metrics = {"value/primary": out.estimates[0], "lagrangian": out.lagrangian}
  for i, name in enumerate(names):
    metrics[f"estimate/{name}"] = out.estimates[1 + i]
    metrics[f"lcb/{name}"] = out.lower_bounds[i]
    metrics[f"slack/{name}"] = out.slacks[i]
    metrics[f"lambda/{name}"] = new_dual.multipliers[i]
  return ConstrainedTrainState(params, opt_state, new_dual), metrics




def train_constrained(
    apply_fn: Callable,
    params,
    data: ConstrainedBatch,
    *,
    key: jax.Array,
    thresholds: Sequence[float],
    num_steps: int,
    optimizer: optax.GradientTransformation,
    dual: DualOptimizer | None,
    multipliers: Any = None,
    names: Sequence[str] | None = None,
    estimator: str = "beta_ips",
    delta: float = 0.05,
    bound: str = "t",
    max_value: float | None = None,
    penalty: str = "lower_bound",
    dual_every: int = 1,
    eval_every: int | None = None,
    evaluate: Callable[[Any], dict] | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_mismatch: str = "error",
    run_config: dict | None = None,
) -> TrainResult:
  """Learns a softmax policy with high-confidence constraints from logged feedback, S seeds at once.

  Args:
    apply_fn: apply_fn(params, contexts [n, d]) -> logits [n, A].
    params: initial parameters with a leading seed axis [S, ...] (none for a single key).
    data: a `ConstrainedBatch`, one per seed ([S, n, ...]) or shared by every seed ([n, ...]).
    key: [S] PRNG keys (one per seed; the steps are full-batch, so they only count the seeds);
      a single key means S = 1 and no seed axis.
    thresholds: [m] b, one per constraint (the rewards' columns 1..m).
    num_steps: primal steps.
    optimizer: an optax optimizer of the primal ascent (it receives the negated gradient).
    dual: a `DualOptimizer` (`dual_descent`, `nu_pi`), or None to hold the multipliers fixed.
    multipliers: initial lambda >= 0, [m] or [S, m]; None: zeros.
    names: [m] constraint names for the history (default "c1", "c2", ...).
    estimator: "beta_ips" or "dr" (`constrained_objective`).
    delta, bound, max_value, penalty: the lower bound's options (`constrained_objective`).
    dual_every: steps per dual update.
    eval_every: steps per compiled chunk, evaluation and checkpoint; None: num_steps.
    evaluate: optional jittable evaluate(params) -> {name: scalar} for one seed, recorded before
      training and after every chunk (e.g. the true values in a simulator).
    checkpoint_path: an orbax checkpoint directory, written after every chunk and resumed from
      when it holds this very run.
    checkpoint_mismatch: "error", or "new" to checkpoint beside another run's checkpoint.
    run_config: optional JSON dict bound to the checkpoint.

  Returns:
    A `TrainResult`; history [num_steps, S] per step: "value/primary" (V0hat), "lagrangian" and
    per constraint "estimate/<name>", "lcb/<name>", "slack/<name>", "lambda/<name>" (after the
    step's dual update); evaluate's names [num_steps / eval_every + 1, S].

  Example:
    >>> from saferl_jax.constrained import dual_descent
    >>> from saferl_jax.data import constrained_bandit as cb
    >>> problem = cb.two_reward_problem(jax.random.key(0), num_actions=3, num_contexts=20)
    >>> log = cb.simulate_log(problem, key=jax.random.key(1), num_rounds=200)
    >>> apply_fn = lambda p, x: x @ p
    >>> result = train_constrained(apply_fn, jnp.zeros((5, 3)), cb.constrained_batch(problem, log),
    ...                            key=jax.random.key(2), thresholds=[0.5], num_steps=5,
    ...                            optimizer=optax.adam(0.1), dual=dual_descent(1.0))
    >>> result.history["lambda/c1"].shape
    (5,)
  """
  checks.check_choice("estimator", estimator, ESTIMATORS)
  checks.check_choice("bound", bound, BOUNDS)
  checks.check_choice("penalty", penalty, PENALTIES)
  checks.check_level_option("delta", delta)
  checks.check_count("num_steps", num_steps)
  checks.check_count("dual_every", dual_every)
  eval_every = num_steps if eval_every is None else eval_every
  checks.check_count("eval_every", eval_every)
  checks.check_choice("checkpoint_mismatch", checkpoint_mismatch, driver.CHECKPOINT_MISMATCH)
  if dual is not None and not isinstance(dual, DualOptimizer):
    raise TypeError(f"dual: must be a DualOptimizer (dual_descent, nu_pi) or None, got "
                    f"{type(dual).__name__}")
  thresholds = checks.as_float("thresholds", thresholds)
  checks.check_ndim("thresholds", thresholds, 1)
  checks.check_finite("thresholds", thresholds)
  m = thresholds.shape[0]
  if m == 0:
    raise ValueError("thresholds: expected at least one constraint")
  names = tuple(f"c{i + 1}" for i in range(m)) if names is None else tuple(names)
  if len(names) != m or len(set(names)) != m or not all(isinstance(s, str) and s for s in names):
    raise ValueError(f"names: expected {m} distinct non-empty strings, got {names!r}")

  key, params, single_seed = driver.seed_axis(key, params)
  num_seeds = key.shape[0]
  if not isinstance(data, ConstrainedBatch):
    raise TypeError(f"data: must be a ConstrainedBatch, got {type(data).__name__}")
  data = ConstrainedBatch(*(checks.as_float(f, x) if f != "actions" else checks.as_int(f, x)
                            for f, x in zip(ConstrainedBatch._fields, data)))
  per_seed = data.actions.ndim == 2
  driver.check_data_seeds(data.actions.shape[0] if per_seed else None, key, single_seed)
  rewards_shape = data.rewards.shape[-2:]
  if rewards_shape[-1] != 1 + m:
    raise ValueError(f"data: rewards have {rewards_shape[-1]} columns, expected 1 + m = {1 + m} "
                     "(the primary reward, then one per threshold)")
  one_seed_contexts = data.contexts[0, :1] if per_seed else data.contexts[:1]
  num_actions = jax.eval_shape(apply_fn, driver.one_seed(params), one_seed_contexts).shape[-1]
  checks.check_indices("actions", data.actions, num_actions, what="action")
  checks.check_probabilities("logging_probs", data.logging_probs)

  multipliers = jnp.zeros(m) if multipliers is None else checks.as_float("multipliers",
                                                                         multipliers)
  if multipliers.shape not in ((m,), (num_seeds, m)):
    raise ValueError(f"multipliers: expected shape {(m,)} or {(num_seeds, m)}, got "
                     f"{tuple(multipliers.shape)}")
  checks.check_finite("multipliers", multipliers)
  if bool(jnp.any(multipliers < 0)):
    raise ValueError("multipliers: must be >= 0")
  multipliers = jnp.broadcast_to(multipliers, (num_seeds, m))
  dual_state = DualState(multipliers, jnp.zeros_like(multipliers))
  state = ConstrainedTrainState(params, jax.vmap(optimizer.init)(params), dual_state)

  options = {"thresholds": thresholds.tolist(), "names": list(names), "estimator": estimator,
             "delta": float(delta), "bound": bound,
             "max_value": None if max_value is None else float(max_value), "penalty": penalty,
             "dual_every": int(dual_every),
             "dual": None if dual is None else checkpoints.dual_optimizer_probe(dual, jnp.ones(m))}
  fingerprint = None if checkpoint_path is None else driver.fingerprint(
      loop="constrained_opl.train_constrained", state=state, data=data, key=key,
      num_steps=num_steps, eval_every=eval_every, options=options, evaluate=evaluate,
      optimizer=optimizer, run_config=run_config)
  step_fn = driver.step_function(
      _step, apply_fn=apply_fn, optimizer=optimizer, dual=dual, names=names, estimator=estimator,
      delta=float(delta),
      bound=bound, max_value=None if max_value is None else float(max_value), penalty=penalty,
      dual_every=int(dual_every))
  state, history, _ = driver.run(
      step_fn, state, (data, thresholds), key, num_steps=num_steps, eval_every=eval_every,
      fingerprint=fingerprint, data_axes=(0 if per_seed else None, None), evaluate=evaluate,
      checkpoint_path=checkpoint_path, checkpoint_mismatch=checkpoint_mismatch,
      description=f"constrained_opl ({estimator})")
  return driver.finish(state.params, history, single_seed)
