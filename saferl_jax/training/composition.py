"""AND-composition of pretrained diffusion models: training-free and primal-dual (floor 3).

The problem (SPEC section 6): min_p max_i KL(p || q_i) over n pretrained models q_i (same
architecture, stacked parameters [n, ...]). Its Lagrangian over weights mu on the simplex is
sum_i mu_i KL(p || q_i), and both loops here take the dual step from the path KLs of the round's
own samples:

  KLhat_i = mean_b sum_t ||mu_p(x_t^b) - mu_{q_i}(x_t^b)||^2 / (2 sigma_t^2)     (`path_kls`)
  mu <- dual.update(state, -KLhat)    (`simplex_descent`: mu <- Proj_simplex(mu + eta KLhat))

  `compose`        training-free: p is the weighted-score sampler, eps = sum_i mu_i eps_i
                   (`weighted_apply`); each round samples B points with the current mu, estimates
                   KLhat and updates mu. The weighted score is the score of prod_i q_{i,t}^{mu_i},
                   exact for prod_i q_i^{mu_i} only at t = 0 (`saferl_jax.diffusion.composition`).
  `compose_train`  primal-dual: a trainable model p_theta (same architecture; by default model 0's
                   parameters) takes one optimizer step per round on sum_i mu_i KL(p_theta || q_i),
                   the path KL estimated on trajectories of `differentiable_sample` through every
                   step: the states are reparameterised (x_t' = mu_theta(x_t) + sigma_t z), so the
                   gradient of the mean over samples of sum_t ||mu_theta(x_t) - mu_i(x_t)||^2 /
                   (2 sigma_t^2) is an unbiased pathwise estimate of the path KL's gradient. mu is
                   updated from the same samples' KLhat.

Both run S seeds vmapped through the one training driver (`saferl_jax.training.driver`):
round r draws its randomness from fold_in(seed key, r), so a resumed run equals an uninterrupted
one; checkpoints every `eval_every` rounds. History (rows [rounds, S]): "weights/<i>" (the
weights that sampled the round), "kl/<i>" (KLhat_i), "kl_max"; compose_train adds "loss".

References:
  Khalafi, Hounie, Ding, Ribeiro. Constrained Diffusion Models via Dual Training (composition of
  models by primal-dual training). NeurIPS 2025. https://arxiv.org/abs/2508.19104
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saferl_jax import checks
from saferl_jax.constrained.duals import DualOptimizer, DualState, simplex_descent
from saferl_jax.diffusion import conditions as conds
from saferl_jax.diffusion.composition import check_weights, path_kls, weighted_apply
from saferl_jax.diffusion.sampler import (_check_num_steps, _check_process, _check_shape,
                                          differentiable_sample, sample)
from saferl_jax.training import checkpoints, driver


@dataclasses.dataclass(frozen=True)
class CompositionSampling:
  """How each round samples (static: it shapes the compiled round)."""
  shape: tuple[int, ...]      # one sample's shape, e.g. (2,)
  num_samples: int = 256      # B, samples per round (all of one condition)
  num_steps: int = 10         # S, sampling steps
  eta: float = 1.0            # DDIM's eta in (0, 1] (> 0: path KLs need positive step variances)
  reduce: str = "sum"         # "sum": exact KLs; "mean": per dimension


class CompositionState(NamedTuple):
  """The training-free loop's state: the weights (as `params`, the driver's field)."""
  params: DualState


class ComposeTrainState(NamedTuple):
  """The primal-dual loop's state.

  Attributes:
    params: the trained model's parameters.
    opt_state: its optimizer's state.
    dual: the weights' `DualState`.
  """
  params: Any
  opt_state: Any
  dual: DualState


class CompositionResult(NamedTuple):
  """Final weights [S, n] ([n] for one key), the trained parameters (compose_train; None for
  compose) and the history {name: [rounds, S]}."""
  weights: jax.Array
  params: Any
  history: dict


def _check_sampling(sampling, schedule) -> None:
  if not isinstance(sampling, CompositionSampling):
    raise TypeError(f"sampling: must be a CompositionSampling, got {type(sampling).__name__}")
  _check_shape(sampling.shape)
  checks.check_count("sampling.num_samples", sampling.num_samples)
  _check_process(schedule, sampling.eta)
  _check_num_steps(sampling.num_steps, schedule)
  checks.check_choice("sampling.reduce", sampling.reduce, ("sum", "mean"))


def _num_models(model_params) -> int:
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None
           for leaf in jax.tree_util.tree_leaves(model_params)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"model_params: expected the models' parameters stacked along a leading axis "
                     f"n (every leaf [n, ...]), got leading sizes {sorted(map(str, sizes))}")
  return int(sizes.pop())


def _round_kls(apply_fn, params, model_apply_fn, model_params, trajectory, schedule, sampling):
  """[n] KLhat_i: the mean over the round's samples of the path KL to model i."""
  kls = path_kls(apply_fn, params, model_apply_fn, model_params, trajectory, schedule=schedule,
                 eta=sampling.eta, reduce=sampling.reduce)
  return jnp.mean(kls, axis=1)


def _metrics(weights, kls) -> dict:
  metrics = {f"weights/{i}": weights[i] for i in range(weights.shape[0])}
  metrics.update({f"kl/{i}": kls[i] for i in range(kls.shape[0])})
  metrics["kl_max"] = jnp.max(kls)
  return metrics


def _slacks(kls, normalize_kls: bool):
  """The dual's slacks -KLhat, or -KLhat / max_i KLhat (a step of eta in simplex units)."""
  if normalize_kls:
    return -kls / jnp.maximum(jnp.max(kls), jnp.finfo(kls.dtype).tiny)
  return -kls


def _compose_round(state: CompositionState, data, key, round_index, *, apply_fn, dual, sampling,
                   normalize_kls):
  model_params, schedule, condition = data
  composed = weighted_apply(apply_fn)
  weights = state.params.multipliers
  trajectory = sample(composed, (model_params, weights), condition,
                      key=jax.random.fold_in(key, round_index), schedule=schedule,
                      num_steps=sampling.num_steps, eta=sampling.eta,
                      samples_per_condition=sampling.num_samples, shape=sampling.shape,
                      reduce=sampling.reduce)
  kls = _round_kls(composed, (model_params, weights), apply_fn, model_params, trajectory, schedule,
                   sampling)
  return (CompositionState(dual.update(state.params, _slacks(kls, normalize_kls))),
          _metrics(weights, kls))


def _compose_train_round(state: ComposeTrainState, data, key, round_index, *, apply_fn, dual,
                         optimizer, sampling, normalize_kls):
  model_params, schedule, condition = data
  weights = state.dual.multipliers

  def loss_fn(params):
    trajectory = differentiable_sample(
        apply_fn, params, condition, key=jax.random.fold_in(key, round_index), schedule=schedule,
        num_steps=sampling.num_steps, eta=sampling.eta, samples_per_condition=sampling.num_samples,
        shape=sampling.shape, backprop_steps=sampling.num_steps, reduce=sampling.reduce)
    kls = _round_kls(apply_fn, params, apply_fn, model_params, trajectory, schedule, sampling)
    return jnp.dot(weights, kls), kls

  (loss, kls), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  kls = jax.lax.stop_gradient(kls)
  metrics = {**_metrics(weights, kls), "loss": loss}
  dual_state = dual.update(state.dual, _slacks(kls, normalize_kls))
  return ComposeTrainState(params, opt_state, dual_state), metrics


def _common_checks(model_params, schedule, sampling, rounds, eval_every, dual_optimizer,
                   initial_weights, checkpoint_mismatch, condition):
  _check_sampling(sampling, schedule)
  driver.check_chunks("rounds", rounds, eval_every)
  checks.check_choice("checkpoint_mismatch", checkpoint_mismatch, driver.CHECKPOINT_MISMATCH)
  num_models = _num_models(model_params)
  if dual_optimizer is None:
    dual_optimizer = simplex_descent(0.1)
  elif not isinstance(dual_optimizer, DualOptimizer):
    raise TypeError(f"dual_optimizer: must be a DualOptimizer (e.g. simplex_descent(eta)), got "
                    f"{type(dual_optimizer).__name__}")
  weights = (jnp.full((num_models,), 1.0 / num_models) if initial_weights is None else
             check_weights("initial_weights", initial_weights, num_models))
  condition = conds.check("condition", jnp.asarray(condition)[None])
  return num_models, dual_optimizer, weights, condition


def _seed_keys(key) -> tuple[jax.Array, bool]:
  """(keys [S], single_seed)."""
  driver.check_seed_keys(key)
  return (key[None], True) if key.ndim == 0 else (key, False)


def _per_seed(tree, num_seeds: int):
  return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_seeds,) + jnp.shape(x)), tree)


def compose(apply_fn: Callable, model_params: Any, *, key: jax.Array, rounds: int, schedule,
            sampling: CompositionSampling, dual_optimizer: DualOptimizer | None = None,
            initial_weights=None, normalize_kls: bool = False, condition: Any = 0,
            eval_every: int = 10, evaluate: Callable | None = None,
            checkpoint_path: str | Path | None = None, checkpoint_mismatch: str = "error",
            run_config: dict | None = None) -> CompositionResult:
  """Training-free AND-composition: dual ascent on the weights of the weighted-score sampler.

  Each round: sample B trajectories from eps_mu = sum_i mu_i eps_i (`weighted_apply`), estimate
  KLhat_i = mean path KL to model i (`path_kls`), then mu <- dual.update(state, -KLhat) (module
  docstring). The weights converge to where the composed chain's path KLs are equal on the
  support: the chain-level optimum, which differs from the density-level mu* because the
  weighted score is exact only at t = 0. With two models it is always mu = (1/2, 1/2): the
  composed step mean is mu_1 m_1 + mu_2 m_2 (DDIM means are affine in eps), so on every
  trajectory KL_1 = mu_2^2 D and KL_2 = mu_1^2 D with the same D = sum_t ||m_1 - m_2||^2 /
  (2 sigma_t^2), equal only at mu_1 = mu_2, whatever the density-level mu* is (measured in
  `saferl_jax.experiments.constrained_composition`, where mu* = (0.77, 0.23)).

  Args:
    apply_fn: the models' apply_fn(params, x_t [B, *shape], t [B], conditions [B, ...]).
    model_params: [n, ...] the n models' parameters stacked along a leading axis.
    key: one typed PRNG key, or [S] (one per seed, vmapped).
    rounds: number of rounds, a multiple of eval_every.
    schedule: the `NoiseSchedule` the models were trained with.
    sampling: a `CompositionSampling`.
    dual_optimizer: a `DualOptimizer` on the simplex (default `simplex_descent(0.1)`).
    initial_weights: [n] starting weights on the simplex (default uniform).
    normalize_kls: divide the slacks by the round's largest KLhat, so that eta is a step in
      simplex units whatever the KLs' scale (path KLs range from O(1) to O(1000) nats with the
      schedule and the models, and a fixed eta either crawls or jumps to a corner).
    condition: the one condition every sample gets (for an unconditional class-id model, its null
      token).
    eval_every: rounds per compiled chunk (evaluation and checkpoint after each).
    evaluate: optional jittable evaluate(dual_state) -> {name: scalar} for one seed.
    checkpoint_path: orbax checkpoint directory (resumes a run with the same fingerprint).
    checkpoint_mismatch: "error" or "new" (`driver.run`).
    run_config: JSON bound into the checkpoint's fingerprint.

  Returns:
    A `CompositionResult` (params None).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> apply_fn = lambda params, x, t, c: params * x
    >>> result = compose(apply_fn, jnp.array([0.2, 0.9]), key=jax.random.key(0), rounds=4,
    ...                  schedule=linear_schedule(100), eval_every=4,
    ...                  sampling=CompositionSampling(shape=(2,), num_samples=16, num_steps=5))
    >>> result.weights.shape, result.history["kl/1"].shape
    ((2,), (4,))

  References:
    Khalafi, Hounie, Ding, Ribeiro. NeurIPS 2025. https://arxiv.org/abs/2508.19104
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn: must be callable, got {type(apply_fn).__name__}")
  _, dual_optimizer, weights, condition = _common_checks(
      model_params, schedule, sampling, rounds, eval_every, dual_optimizer, initial_weights,
      checkpoint_mismatch, condition)
  key, single_seed = _seed_keys(key)
  state = CompositionState(jax.vmap(dual_optimizer.init)(_per_seed(weights, key.shape[0])))
  data = (model_params, schedule, condition)
  if normalize_kls not in (True, False):
    raise ValueError(f"normalize_kls: must be True or False, got {normalize_kls!r}")
  options = {"sampling": dataclasses.asdict(sampling), "condition": np.asarray(condition).tolist(),
             "normalize_kls": bool(normalize_kls)}
  fingerprint = None if checkpoint_path is None else driver.fingerprint(
      loop="compose", state=state, data=data, key=key, num_steps=rounds, eval_every=eval_every,
      options=options, evaluate=evaluate, run_config=run_config,
      dual=checkpoints.dual_optimizer_probe(dual_optimizer, weights))
  step_fn = driver.step_function(_compose_round, apply_fn=apply_fn, dual=dual_optimizer,
                                 sampling=sampling, normalize_kls=bool(normalize_kls))
  state, history, _ = driver.run(step_fn, state, data, key, num_steps=rounds,
                                 eval_every=eval_every, fingerprint=fingerprint,
                                 data_axes=(None, None, None), evaluate=evaluate,
                                 checkpoint_path=checkpoint_path,
                                 checkpoint_mismatch=checkpoint_mismatch, description="compose")
  result = driver.finish(state.params.multipliers, history, single_seed)
  return CompositionResult(result.params, None, result.history)


def compose_train(apply_fn: Callable, model_params: Any, *, key: jax.Array, rounds: int, schedule,
                  sampling: CompositionSampling, optimizer: optax.GradientTransformation,
                  dual_optimizer: DualOptimizer | None = None, initial_params: Any = None,
                  initial_weights=None, normalize_kls: bool = False, condition: Any = 0,
                  eval_every: int = 10,
                  evaluate: Callable | None = None, checkpoint_path: str | Path | None = None,
                  checkpoint_mismatch: str = "error",
                  run_config: dict | None = None) -> CompositionResult:
  """Primal-dual AND-composition: train p_theta on sum_i mu_i KL(p_theta || q_i), mu by dual ascent.

  Each round: B trajectories of `differentiable_sample` (gradient through every step), the loss
  sum_i mu_i KLhat_i with KLhat_i the mean path KL to model i on those reparameterised states
  (a pathwise, unbiased gradient of the path KL), one optimizer step on theta, then
  mu <- dual.update(state, -KLhat) from the same samples.

  Args:
    apply_fn, model_params, key, rounds, schedule, sampling, dual_optimizer, initial_weights,
      normalize_kls, condition, eval_every, checkpoint_path, checkpoint_mismatch, run_config:
      as for `compose`.
    optimizer: an optax optimizer for theta.
    initial_params: theta's starting parameters (one model's structure; default model 0's).
    evaluate: optional jittable evaluate(params) -> {name: scalar} for one seed.

  Returns:
    A `CompositionResult` with the trained params ([S, ...], or one seed's for one key).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> apply_fn = lambda params, x, t, c: params * x
    >>> sampling = CompositionSampling(shape=(2,), num_samples=16, num_steps=5)
    >>> result = compose_train(apply_fn, jnp.array([0.2, 0.9]), key=jax.random.key(0), rounds=4,
    ...                        schedule=linear_schedule(100), optimizer=optax.sgd(0.001),
    ...                        eval_every=4, sampling=sampling)
    >>> bool(0.2 < float(result.params) < 0.9), result.history["loss"].shape
    (True, (4,))

  References:
    Khalafi, Hounie, Ding, Ribeiro. NeurIPS 2025. https://arxiv.org/abs/2508.19104
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn: must be callable, got {type(apply_fn).__name__}")
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(f"optimizer: must be an optax GradientTransformation, got "
                    f"{type(optimizer).__name__}")
  _, dual_optimizer, weights, condition = _common_checks(
      model_params, schedule, sampling, rounds, eval_every, dual_optimizer, initial_weights,
      checkpoint_mismatch, condition)
  if initial_params is None:
    initial_params = jax.tree_util.tree_map(lambda x: x[0], model_params)
  driver.check_finite_params(initial_params)
  key, single_seed = _seed_keys(key)
  params = _per_seed(initial_params, key.shape[0])
  state = ComposeTrainState(params, jax.vmap(optimizer.init)(params),
                            jax.vmap(dual_optimizer.init)(_per_seed(weights, key.shape[0])))
  data = (model_params, schedule, condition)
  if normalize_kls not in (True, False):
    raise ValueError(f"normalize_kls: must be True or False, got {normalize_kls!r}")
  options = {"sampling": dataclasses.asdict(sampling), "condition": np.asarray(condition).tolist(),
             "normalize_kls": bool(normalize_kls)}
  fingerprint = None if checkpoint_path is None else driver.fingerprint(
      loop="compose_train", state=state, data=data, key=key, num_steps=rounds,
      eval_every=eval_every, options=options, evaluate=evaluate, optimizer=optimizer,
      run_config=run_config, dual=checkpoints.dual_optimizer_probe(dual_optimizer, weights))
  step_fn = driver.step_function(_compose_train_round, apply_fn=apply_fn, dual=dual_optimizer,
                                 optimizer=optimizer, sampling=sampling,
                                 normalize_kls=bool(normalize_kls))
  state, history, _ = driver.run(step_fn, state, data, key, num_steps=rounds,
                                 eval_every=eval_every, fingerprint=fingerprint,
                                 data_axes=(None, None, None), evaluate=evaluate,
                                 checkpoint_path=checkpoint_path,
                                 checkpoint_mismatch=checkpoint_mismatch,
                                 description="compose (primal-dual)")
  result = driver.finish(state.params, history, single_seed)
  weights = state.dual.multipliers[0] if single_seed else state.dual.multipliers
  return CompositionResult(weights, result.params, result.history)


