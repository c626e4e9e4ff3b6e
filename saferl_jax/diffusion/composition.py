"""AND-composition of diffusion models: the weighted score and path KLs between samplers (floor 1).

The problem (SPEC section 6): given pretrained models q_1..q_n, find min_p max_i KL(p || q_i).
For weights mu on the simplex, min_p sum_i mu_i KL(p || q_i) is solved by the geometric mixture
p_mu ∝ prod_i q_i^{mu_i}, and the optimal mu* maximises the concave dual D(mu) = -log Z(mu),
Z(mu) = ∫ prod_i q_i^{mu_i}; at mu* the KLs KL(p_mu* || q_i) are equal on mu*'s support.

Training-free sampling runs the ordinary sampler with the weighted prediction

  eps_mu(x_t, t, c) = sum_i mu_i eps_i(x_t, t, c)                          (`weighted_apply`),

the score of prod_i q_{i,t}^{mu_i}, the product of the models' *noised* marginals. The noised
marginal of the product, (prod_i q_i^{mu_i})_t, is a different density: the two agree only at
t = 0, so this product-of-experts sampler is exact only at t = 0 and its samples are not exactly
p_mu (`saferl_jax.data.composition2d` measures the gap on a 2-D grid).

The weights are tuned from path KLs. Two samplers that share x_T ~ N(0, I) and the step
variances sigma_t^2 are Gaussian Markov chains, and the KL between their path measures is

  KL(P || Q) = E_P[ sum_t ||mu_P(x_t) - mu_Q(x_t)||^2 / (2 sigma_t^2) ]      (`path_kl`),

estimated on P's stored trajectories, one value per sample; it bounds the KL between the final
samples' distributions from above (data processing). `path_kls` does this against n stacked models
at once. Both DDIM and flow steps have means affine in the prediction, so with weights on the
simplex the weighted sampler's mean is the mu-weighted mean of the models' means.

Functions act on one batch of trajectories; the models' axis is the leading axis of their stacked
parameters.

References:
  Khalafi, Hounie, Ding, Ribeiro. Constrained Diffusion Models via Dual Training (composition by
  primal-dual training). NeurIPS 2025. https://arxiv.org/abs/2508.19104
  Du, Durkan, Strudel, Tenenbaum, Dieleman, Fergus, Sohl-Dickstein, Doucet, Grathwohl. Reduce,
  Reuse, Recycle: Compositional Generation with Energy-Based Diffusion Models and MCMC. ICML 2023
  (the weighted score is not the score of the noised product). https://arxiv.org/abs/2302.11552
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.diffusion.sampler import Trajectory, trajectory_transitions
from saferl_jax.diffusion.step import Reduce, step_kl

ApplyFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


def weighted_apply(apply_fn: ApplyFn) -> ApplyFn:
  """The composed prediction sum_i w_i apply_fn(params_i, x_t, t, c) over stacked parameters.

  composed((stacked_params, weights), x_t, t, c) = sum_i weights[i] apply_fn(stacked_params[i],
  x_t, t, c), the models evaluated by one `jax.vmap` over the leading axis of stacked_params. With
  weights on the simplex it is the score of prod_i q_{i,t}^{w_i}; this product-of-experts score
  is exact for p ∝ prod_i q_i^{w_i} only at t = 0 (module docstring). The result plugs into
  `sample`, `trajectory_transitions` and `differentiable_sample` unchanged (params = the pair).
  One object per apply_fn (cached), so compiled samplers are reused.

  Args:
    apply_fn: apply_fn(params, x_t [B, *shape], t [B], conditions [B, ...]) -> [B, *shape].

  Returns:
    composed(params, x_t, t, conditions) with params = (stacked_params [n, ...] pytree,
    weights [n]).

  Example:
    >>> apply_fn = lambda params, x, t, c: params * x
    >>> composed = weighted_apply(apply_fn)
    >>> composed((jnp.array([1.0, 3.0]), jnp.array([0.25, 0.75])), jnp.ones((2, 2)), None,
    ...          None).tolist()
    [[2.5, 2.5], [2.5, 2.5]]
    >>> composed is weighted_apply(apply_fn)
    True
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn: must be callable, got {type(apply_fn).__name__}")
  return _weighted_apply(apply_fn)


@functools.lru_cache(maxsize=64)
def _weighted_apply(apply_fn: ApplyFn) -> ApplyFn:
  def composed(params, x_t, t, conditions):
    stacked_params, weights = params
    predictions = jax.vmap(apply_fn, in_axes=(0, None, None, None))(stacked_params, x_t, t,
                                                                   conditions)
    weights = jnp.asarray(weights, predictions.dtype)
    return jnp.tensordot(weights, predictions, axes=1)
  return composed


def _per_step_kl(means, reference_means, stds, reduce):
  """[S, B]: step_kl of every step and sample."""
  return jax.vmap(lambda m, r, std: jax.vmap(lambda a, b: step_kl(a, b, std, reduce=reduce))(m, r))(
      means, reference_means, stds)


def path_kl(apply_fn: ApplyFn, params: Any, reference_params: Any, trajectory: Trajectory, *,
            schedule, eta: ArrayLike, reference_apply_fn: ApplyFn | None = None,
            guidance_scale: ArrayLike | None = None, null_condition: Any = None,
            reduce: Reduce = "sum") -> jax.Array:
  """Per sample, the path KL sum_t KL(p(.|x_t) || q(.|x_t)) on p's stored trajectory.

  KL_b = sum_t ||mu_p(x_t^b) - mu_q(x_t^b)||^2 / (2 sigma_t^2) (`step_kl` per step), both means
  recomputed on the stored states by `trajectory_transitions`. Its mean over trajectories sampled
  from p estimates KL(P || Q) between the two chains' path measures; differentiable in params,
  reference_params and, when the trajectory was drawn by `differentiable_sample`, in the states
  (the pathwise gradient of the reparameterised chain).

  Args:
    apply_fn: p's apply_fn(params, x_t [B, *shape], t [B], conditions) -> [B, *shape].
    params: p's parameters.
    reference_params: q's parameters.
    trajectory: a `Trajectory` of B samples (sampled from p for an estimate of KL(P || Q)).
    schedule: the schedule used to sample.
    eta: as used to sample (> 0: the step variances must be positive).
    reference_apply_fn: q's apply_fn (default: apply_fn).
    guidance_scale, null_condition, reduce: as used to sample (`trajectory_transitions`).

  Returns:
    [B] the path KL of each sample, >= 0.

  Example:
    >>> import jax
    >>> from saferl_jax.diffusion.sampler import sample
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> apply_fn, s = (lambda params, x, t, c: params * x), linear_schedule(100)
    >>> traj = sample(apply_fn, 0.5, jnp.array([0]), key=jax.random.key(0), schedule=s,
    ...               num_steps=10, eta=1.0, samples_per_condition=3, shape=(2,))
    >>> path_kl(apply_fn, 0.5, 0.5, traj, schedule=s, eta=1.0).tolist()
    [0.0, 0.0, 0.0]
    >>> bool(jnp.all(path_kl(apply_fn, 0.5, 0.6, traj, schedule=s, eta=1.0) > 0))
    True
  """
  options = dict(schedule=schedule, eta=eta, guidance_scale=guidance_scale,
                 null_condition=null_condition, reduce=reduce)
  mine = trajectory_transitions(apply_fn, params, trajectory, **options)
  reference = trajectory_transitions(reference_apply_fn or apply_fn, reference_params, trajectory,
                                     **options)
  return jnp.sum(_per_step_kl(mine.means, reference.means, mine.stds, reduce), axis=0)


def path_kls(apply_fn: ApplyFn, params: Any, model_apply_fn: ApplyFn, model_params: Any,
             trajectory: Trajectory, *, schedule, eta: ArrayLike,
             reduce: Reduce = "sum") -> jax.Array:
  """Per model and sample, the path KL from p to each of n stacked models q_i on p's trajectory.

  KL[i, b] = sum_t ||mu_p(x_t^b) - mu_{q_i}(x_t^b)||^2 / (2 sigma_t^2); p's means are computed
  once, the models' by a `jax.vmap` over the leading axis of model_params. AND-composition's
  dual step reads the means over samples, KLhat_i = mean_b KL[i, b].

  Args:
    apply_fn: p's apply_fn (for the training-free composition: `weighted_apply(model_apply_fn)`
      with params = (model_params, weights)).
    params: p's parameters.
    model_apply_fn: the models' apply_fn.
    model_params: [n, ...] the models' stacked parameters (a pytree with leading axis n).
    trajectory: a `Trajectory` of B samples from p (unguided).
    schedule: the schedule used to sample.
    eta: as used to sample (> 0).
    reduce: "sum" or "mean", as used to sample.

  Returns:
    [n, B] path KLs, >= 0.

  Example:
    >>> import jax
    >>> from saferl_jax.diffusion.sampler import sample
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> apply_fn, s = (lambda params, x, t, c: params * x), linear_schedule(100)
    >>> models, weights = jnp.array([0.4, 0.6]), jnp.array([0.5, 0.5])
    >>> composed = weighted_apply(apply_fn)
    >>> traj = sample(composed, (models, weights), jnp.array([0]), key=jax.random.key(0),
    ...               schedule=s, num_steps=10, eta=1.0, samples_per_condition=4, shape=(2,))
    >>> kls = path_kls(composed, (models, weights), apply_fn, models, traj, schedule=s, eta=1.0)
    >>> kls.shape, bool(jnp.allclose(kls[0], kls[1], rtol=1e-4))  # halfway: equally far
    ((2, 4), True)
  """
  options = dict(schedule=schedule, eta=eta, reduce=reduce)
  mine = trajectory_transitions(apply_fn, params, trajectory, **options)
  references = jax.vmap(lambda p: trajectory_transitions(model_apply_fn, p, trajectory,
                                                         **options).means)(model_params)
  return jax.vmap(lambda means: jnp.sum(_per_step_kl(mine.means, means, mine.stds, reduce),
                                        axis=0))(references)


def check_weights(name: str, weights: ArrayLike, num_models: int | None = None) -> jax.Array:
  """Weights on the simplex [n] (>= 0, summing to 1 within 1e-5), checked when concrete.

  Example:
    >>> check_weights("weights", [0.25, 0.75]).tolist()
    [0.25, 0.75]
  """
  weights = checks.as_float(name, weights)
  if weights.ndim != 1 or weights.shape[0] == 0:
    raise ValueError(f"{name}: expected a non-empty 1-d array [n], got shape {tuple(weights.shape)}")
  if num_models is not None and weights.shape[0] != num_models:
    raise ValueError(f"{name}: expected {num_models} weights (one per model), got "
                     f"{weights.shape[0]}")
  if checks.is_concrete(weights):
    checks.check_finite(name, weights)
    if bool(jnp.any(weights < 0)) or abs(float(jnp.sum(weights)) - 1.0) > 1e-5:
      raise ValueError(f"{name}: must be >= 0 and sum to 1 (a point of the simplex), got "
                       f"{weights.tolist()}")
  return weights
