"""A network relevance model for DR, fitted to clicks with the counterfactual loss (floor 3).

The ridge model (`cltr.fit_reward_regression`) is closed form; the authors of [PRPO] fit a
(150, 75) MLP with a sigmoid output instead, trained with the counterfactual cross-entropy
(`cltr.counterfactual_cross_entropy`). `train_reward_network` does that for S seeds at once
through the one training driver: full-batch optax steps on every logged (query, document).

References:
  [PRPO] Gupta, Oosterhuis, de Rijke. Practical and Robust Safety Guarantees for Advanced
  Counterfactual Learning to Rank. CIKM 2024. https://arxiv.org/abs/2407.19943
  [DR-LTR] Oosterhuis. Doubly-Robust Estimation for Correcting Position-Bias in Click Feedback
  for Unbiased Learning to Rank. TOIS 2023. https://arxiv.org/abs/2203.17118
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saferl_jax import checks
from saferl_jax.cltr.reward_model import counterfactual_cross_entropy
from saferl_jax.training import driver
from saferl_jax.training.driver import TrainResult, TrainState


class ClickRegressionData(NamedTuple):
  """What the network learns from, per (query, document) (a leading seed axis for several seeds).

  Attributes:
    features: [Q, D, F] document features.
    ips_targets: [Q, D] mean clipped IPS estimates rt = (cbar - betabar) / rho_c.
    propensity_ratios: [Q, D] rho / rho_c.
    weights: [Q, D] 0 for padding and never-displayed documents (e.g. 1, or sessions per query).
  """
  features: jax.Array
  ips_targets: jax.Array
  propensity_ratios: jax.Array
  weights: jax.Array


def _step(state: TrainState, data: ClickRegressionData, key, step_index, *, apply_fn, optimizer):
  del key, step_index  # full-batch and deterministic

  def loss_fn(params):
    loss = counterfactual_cross_entropy(apply_fn(params, data.features), data.ips_targets,
                                        data.propensity_ratios, data.weights)
    return loss / jnp.maximum(jnp.sum(data.weights), 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return TrainState(optax.apply_updates(state.params, updates), opt_state), {"loss": loss}


def train_reward_network(apply_fn: Callable, params, data: ClickRegressionData, *,
                         key: jax.Array, steps: int, optimizer: optax.GradientTransformation,
                         eval_every: int | None = None) -> TrainResult:
  """Minimises the counterfactual cross-entropy of sigmoid(apply_fn(params, features)).

  Args:
    apply_fn: apply_fn(params, features [Q, D, F]) -> logits [Q, D] (e.g. an `MLPRanker`).
    params: initial parameters with a leading seed axis [S, ...] (or none with a single key).
    data: a `ClickRegressionData`, one per seed (leading seed axis) or shared.
    key: [S] PRNG keys (the steps are deterministic; the keys fix S).
    steps: full-batch optimizer steps.
    optimizer: an optax optimizer.
    eval_every: steps per compiled chunk (default: all of them).

  Returns:
    A `TrainResult`; predict with jax.nn.sigmoid(apply_fn(params, features)).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> apply_fn = lambda p, x: x[..., 0] * p["w"] + p["b"]
    >>> x = jnp.array([[[0.], [1.]]])
    >>> data = ClickRegressionData(x, jnp.array([[0.2, 0.8]]), jnp.ones((1, 2)), jnp.ones((1, 2)))
    >>> fit = train_reward_network(apply_fn, {"w": 0., "b": 0.}, data, key=jax.random.key(0),
    ...                            steps=500, optimizer=optax.adam(0.1))
    >>> [round(float(v), 2) for v in jax.nn.sigmoid(apply_fn(fit.params, x))[0]]
    [0.2, 0.8]
  """
  checks.check_positive_int("steps", steps)
  eval_every = steps if eval_every is None else eval_every
  driver.check_chunks("steps", steps, eval_every)
  key, params, single_seed = driver.seed_axis(key, params)
  data = ClickRegressionData(*(jnp.asarray(x) for x in data))
  per_seed = data.ips_targets.ndim == 3
  driver.check_data_seeds(data.ips_targets.shape[0] if per_seed else None, key, single_seed)
  state = TrainState(params, jax.vmap(optimizer.init)(params))
  step_fn = driver.step_function(_step, apply_fn=apply_fn, optimizer=optimizer)
  state, history, _ = driver.run(step_fn, state, data, key, num_steps=steps,
                                 eval_every=eval_every, fingerprint=None,
                                 data_axes=0 if per_seed else None,
                                 description="train_reward_network")
  return driver.finish(state.params, history, single_seed)
