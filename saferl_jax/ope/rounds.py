"""Per-round quantities that every bandit estimator is built from (floor 1).

All the estimators of SPEC.md section 1 depend on a logged round only through
four numbers: the reward r_i, the importance weight w_i = pi(a_i|x_i) / p_i, the
reward model's prediction for the logged action qhat(x_i, a_i), and the direct
method term dm_i = sum_a pi(a|x_i) qhat(x_i, a). `logged_rounds` reduces the
[n, A] inputs to these four [n] arrays once; the estimators in `estimators.py`
and the bootstrap resample and combine them. Functions here act on one logged
dataset; batch several with `jax.vmap`.

Positions (Open Bandit Pipeline's convention): a log that shows L slots gives
`target_dist` (and `reward_hat`) as [n, A, L] arrays together with `positions`
[n], ints in [0, L); round i then uses target_dist[i, :, positions[i]] and
reward_hat[i, :, positions[i]]. The slot is selected in the reduction, so every
estimator applies per round unchanged, and the positions' range check fuses
into the same compiled pass as the other value checks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks


class LoggedRounds(NamedTuple):
  """The per-round terms of a logged bandit dataset, each of shape [n].

  Attributes:
    rewards: r_i, the logged reward.
    weights: w_i = pi(a_i|x_i) / pi0(a_i|x_i), the importance weight.
    reward_hat_logged: qhat(x_i, a_i), the reward model at the logged action
      (zeros when no reward model was given).
    dm: sum_a pi(a|x_i) qhat(x_i, a), the direct-method term (zeros likewise).
  """
  rewards: jax.Array
  weights: jax.Array
  reward_hat_logged: jax.Array
  dm: jax.Array


class WeightDiagnostics(NamedTuple):
  """Health of the importance weights: a mean far from 1 or a tiny ESS warns of poor overlap."""
  effective_sample_size: jax.Array
  max_weight: jax.Array
  mean_weight: jax.Array


def _logged_action_values(values: jax.Array, actions: jax.Array) -> jax.Array:
  return jnp.take_along_axis(values, actions[:, None], axis=1)[:, 0]


def _check_target_rank(target_dist: jax.Array, positions) -> None:
  """target_dist is [n, A] without positions and [n, A, L] with them."""
  shape = tuple(target_dist.shape)
  if positions is None and target_dist.ndim == 3:
    raise ValueError(
        f"positions: needed with a [n, A, L] target_dist (got shape {shape}): round i uses "
        "target_dist[i, :, positions[i]]; pass positions=[n] ints in [0, L)")
  if positions is not None and target_dist.ndim == 2:
    raise ValueError(
        f"positions: given, but target_dist is [n, A] (shape {shape}); with positions, "
        "target_dist (and reward_hat) must be [n, A, L], round i using slot positions[i]")
  if target_dist.ndim not in (2, 3):
    raise ValueError(
        f"target_dist: expected a 2-d array [n, A] (or [n, A, L] with positions) for one "
        f"dataset (batch datasets with jax.vmap), got shape {shape}")


def prepare_inputs(
    rewards: ArrayLike,
    actions: ArrayLike,
    logging_probs: ArrayLike,
    target_dist: ArrayLike,
    reward_hat: ArrayLike | None = None,
    positions: ArrayLike | None = None,
) -> tuple:
  """Converts one logged dataset to arrays and checks its shapes (no values are read).

  Returns:
    (rewards, actions, logging_probs, target_dist, reward_hat, positions), reward_hat and
    positions None when not given.
  """
  rewards = checks.as_float("rewards", rewards)
  actions = checks.as_int("actions", actions)
  logging_probs = checks.as_float("logging_probs", logging_probs)
  target_dist = checks.as_float("target_dist", target_dist)
  checks.check_ndim("rewards", rewards, 1)
  checks.check_ndim("actions", actions, 1)
  checks.check_ndim("logging_probs", logging_probs, 1)
  _check_target_rank(target_dist, positions)
  arrays = dict(rewards=rewards, actions=actions, logging_probs=logging_probs,
                target_dist=target_dist)
  if positions is not None:
    positions = checks.as_int("positions", positions)
    checks.check_ndim("positions", positions, 1)
    arrays["positions"] = positions
  if reward_hat is not None:
    reward_hat = checks.as_float("reward_hat", reward_hat)
    if reward_hat.ndim != target_dist.ndim:
      want = "[n, A, L] like target_dist (with positions)" if target_dist.ndim == 3 else "[n, A]"
      raise ValueError(
          f"reward_hat: expected a {target_dist.ndim}-d array {want}, got shape "
          f"{tuple(reward_hat.shape)}")
    arrays["reward_hat"] = reward_hat
    if reward_hat.shape[1] != target_dist.shape[1]:
      raise ValueError(
          f"reward_hat: has {reward_hat.shape[1]} actions but target_dist has "
          f"{target_dist.shape[1]}")
    if target_dist.ndim == 3 and reward_hat.shape[2] != target_dist.shape[2]:
      raise ValueError(
          f"reward_hat: has {reward_hat.shape[2]} slots (L) but target_dist has "
          f"{target_dist.shape[2]}")
  checks.check_same_length(**arrays)
  return rewards, actions, logging_probs, target_dist, reward_hat, positions


def value_checks(inputs: tuple) -> tuple[checks.ValueCheck, ...]:
  """The value checks of `prepare_inputs`' arrays, in the order their errors are reported.

  With positions, target_dist [n, A, L] must be a distribution over actions at every slot (as
  in OBP), not only at the slots the log used, and reward_hat must be finite everywhere.
  """
  target_dist = inputs[3]
  slots = target_dist.ndim == 3
  return (checks.ValueCheck("rewards", "finite"),
          checks.ValueCheck("logging_probs", "probability"),
          checks.ValueCheck("actions", "index", target_dist.shape[1], "action"),
          checks.ValueCheck("target_dist", "distribution_slots" if slots else "distribution_rows"),
          checks.ValueCheck("reward_hat", "finite"),
          checks.ValueCheck("positions", "index", target_dist.shape[2] if slots else 0,
                            "position"))


def _checked_order(inputs: tuple) -> tuple:
  """The arrays of `prepare_inputs` in the order of `value_checks`."""
  rewards, actions, logging_probs, target_dist, reward_hat, positions = inputs
  return rewards, logging_probs, actions, target_dist, reward_hat, positions


def input_flags(inputs: tuple, mask: tuple[bool, ...], rounds: LoggedRounds | None = None
                ) -> jax.Array:
  """The failed-check flags of one dataset (the checks selected by `mask`, see `checks.pending`);
  traceable, so the checks fuse into the kernel that uses the data.

  Given the `rounds` reduced from the same inputs, reward_hat is checked through their dm terms
  instead of a pass of its own: with target_dist finite (checked before reward_hat), a NaN or
  infinite qhat(x, a) makes sum_a pi(a|x) qhat(x, a) NaN or infinite (0 * inf is NaN). A finite
  reward_hat whose dm overflows sets the flag too; its host check then finds nothing to report.
  With positions the dm terms see only the logged slots, so the flag reads the per-slot sums
  sum_a pi(a|x_i, l) qhat(x_i, a, l) of every slot instead (the reduction computes the same
  [n, L] sums, which the compiler shares), as the host check reads every slot.
  """
  specs, ordered = value_checks(inputs), _checked_order(inputs)
  model_flag = rounds is not None and inputs[4] is not None and mask[4]
  own_pass = mask[:4] + (mask[4] and not model_flag,) + mask[5:]
  flags = checks.value_flags(specs, checks.only_pending(ordered, own_pass))
  if model_flag:
    target_dist, reward_hat, positions = inputs[3], inputs[4], inputs[5]
    dm_terms = rounds.dm if positions is None else jnp.sum(target_dist * reward_hat, axis=1)
    flags = flags.at[4].set(~jnp.isfinite(jnp.max(jnp.abs(dm_terms))))
  return flags


def host_input_checks(inputs: tuple) -> None:
  """The value checks on the host, each on a concrete array only (the path under jit, vmap, grad)."""
  checks.host_checks(value_checks(inputs), _checked_order(inputs))


def reduce_inputs(rewards: jax.Array, actions: jax.Array, logging_probs: jax.Array,
                  target_dist: jax.Array, reward_hat: jax.Array | None = None,
                  positions: jax.Array | None = None, *,
                  weights: jax.Array | None = None) -> LoggedRounds:
  """The per-round terms of checked arrays; no validation (traceable).

  With positions, the terms are read at the logged slots of target_dist and reward_hat
  [n, A, L]: pi(a_i|x_i) and qhat(x_i, a_i) by one gather each, and dm_i from the per-slot
  sums sum_a pi(a|x_i, l) qhat(x_i, a, l), [n, L], at l = positions[i] (one streaming pass;
  gathering the [n, A] slices first was twice as slow on CPU). `weights`, when given, are these
  inputs' importance weights from an earlier reduction (see `known_weights`), not recomputed.
  """
  if positions is not None:
    rounds = jnp.arange(rewards.shape[0])
    if weights is None:
      weights = target_dist[rounds, actions, positions] / logging_probs
    if reward_hat is None:
      zeros = jnp.zeros_like(rewards)
      return LoggedRounds(rewards, weights, zeros, zeros)
    slot_dm = jnp.sum(target_dist * reward_hat, axis=1)  # [n, L]
    return LoggedRounds(
        rewards=rewards,
        weights=weights,
        reward_hat_logged=reward_hat[rounds, actions, positions],
        dm=jnp.take_along_axis(slot_dm, positions[:, None], axis=1)[:, 0],
    )
  if weights is None:
    weights = _logged_action_values(target_dist, actions) / logging_probs
  if reward_hat is None:
    zeros = jnp.zeros_like(rewards)
    return LoggedRounds(rewards, weights, zeros, zeros)
  return LoggedRounds(
      rewards=rewards,
      weights=weights,
      reward_hat_logged=_logged_action_values(reward_hat, actions),
      dm=jnp.sum(target_dist * reward_hat, axis=1),
  )


# The importance weights w_i = pi(a_i|x_i) / p_i of logs that an eager call has validated and
# reduced, kept while the arrays they come from (actions, logging_probs, target_dist and positions)
# live. A second estimator on the same log (snips or dr after ips) then skips the gather over
# [n, A]: on 1e6 rounds x 20 actions, snips 7.7 -> 2.2 ms and dr 23 -> 17 ms (2 CPU cores).
_WEIGHTS = checks.ArrayMemo()


def _weight_sources(inputs: tuple) -> tuple:
  _, actions, logging_probs, target_dist, _, positions = inputs
  return (actions, logging_probs, target_dist) + (() if positions is None else (positions,))


def known_weights(inputs: tuple) -> jax.Array | None:
  """The importance weights of `prepare_inputs`' arrays if an earlier eager call computed them
  from these very arrays (after their checks passed), else None."""
  return _WEIGHTS.get(_weight_sources(inputs))


def remember_weights(inputs: tuple, weights: jax.Array) -> None:
  """Keeps the weights that a validated eager call computed from these arrays (see `known_weights`);
  nothing for numpy inputs, tracers, or weights traced under an outer jit."""
  if checks.is_concrete(weights):
    _WEIGHTS.put(_weight_sources(inputs), weights)


def run_validated(kernel, inputs: tuple, *args, **static):
  """Runs a compiled kernel on `prepare_inputs`' arrays with the value checks fused into it.

  `kernel(inputs, *args, check=mask, **static)` must return `(flags, result)`: flags from
  `input_flags(inputs, mask)` when mask is a tuple with a True in it, None when mask is None. On
  concrete data the checks cost one host transfer and raise (naming the argument) before the
  result is returned; jax.Arrays that already passed skip their checks (`checks.pending`). Where
  some input or option is a tracer (under jit, vmap or grad), the concrete arrays are checked on
  the host, as every check always has been, and the kernel is traced into the caller's
  computation.
  """
  specs, ordered = value_checks(inputs), _checked_order(inputs)
  if checks.is_concrete(*inputs, *jax.tree.leaves(args)):
    mask = checks.pending(specs, ordered)
    if not any(mask):
      return kernel(inputs, *args, check=None, **static)[1]
    flags, result = kernel(inputs, *args, check=mask, **static)
    if checks.is_concrete(flags):
      checks.raise_on_flags(specs, flags, ordered)
      checks.remember_passed(specs, ordered, mask)
      return result
    host_input_checks(inputs)  # concrete data captured by an outer jax.jit
    return result
  host_input_checks(inputs)
  return kernel(inputs, *args, check=None, **static)[1]


@functools.partial(jax.jit, static_argnames="check")
def _rounds_kernel(inputs: tuple, *, check: tuple[bool, ...] | None
                   ) -> tuple[jax.Array | None, LoggedRounds]:
  rounds = reduce_inputs(*inputs)
  return (None if check is None else input_flags(inputs, check, rounds)), rounds


def logged_rounds(
    rewards: ArrayLike,
    actions: ArrayLike,
    logging_probs: ArrayLike,
    target_dist: ArrayLike,
    reward_hat: ArrayLike | None = None,
    *,
    positions: ArrayLike | None = None,
) -> LoggedRounds:
  """Validates one logged dataset and reduces it to its per-round terms.

  Args:
    rewards: [n] float rewards.
    actions: [n] int logged actions in [0, A).
    logging_probs: [n] probability of the logged action under the logging
      policy, in (0, 1].
    target_dist: [n, A] the target policy's distribution over actions per round,
      or [n, A, L] with `positions` (one distribution per slot).
    reward_hat: optional [n, A] reward model predictions ([n, A, L] with
      `positions`).
    positions: optional [n] ints in [0, L), the slot each round was shown in
      (OBP's `position`); round i uses target_dist[i, :, positions[i]] and
      reward_hat[i, :, positions[i]].

  Returns:
    A `LoggedRounds` of four [n] arrays.

  Raises:
    ValueError: on mismatched shapes (also a [n, A, L] target_dist without
      positions, positions with a [n, A] one, or reward_hat with another L), and
      (for concrete inputs) on a propensity outside (0, 1], a non-finite reward,
      an action outside [0, A), a position outside [0, L), or target
      distributions that do not sum to 1. On concrete inputs the value checks
      and the reduction run as one compiled pass with one host transfer.

  Example:
    >>> import jax.numpy as jnp
    >>> rounds = logged_rounds(jnp.array([1., 0.]), jnp.array([0, 1]),
    ...                        jnp.array([0.5, 0.5]), jnp.array([[1., 0.], [1., 0.]]))
    >>> rounds.weights.tolist()
    [2.0, 0.0]
    >>> slots = jnp.array([[[1., 0.], [0., 1.]], [[1., 0.], [0., 1.]]])  # [n, A, L]
    >>> logged_rounds(jnp.array([1., 0.]), jnp.array([0, 1]), jnp.array([0.5, 0.5]),
    ...               slots, positions=jnp.array([0, 1])).weights.tolist()
    [2.0, 2.0]
  """
  inputs = prepare_inputs(rewards, actions, logging_probs, target_dist, reward_hat, positions)
  return run_validated(_rounds_kernel, inputs)


def importance_weights(
    actions: ArrayLike, logging_probs: ArrayLike, target_dist: ArrayLike, *,
    positions: ArrayLike | None = None,
) -> jax.Array:
  """w_i = pi(a_i|x_i) / pi0(a_i|x_i), shape [n]; E_pi0[w] = 1 under full support.

  target_dist is [n, A], or [n, A, L] with `positions` [n] (round i uses
  target_dist[i, :, positions[i]]), as in `logged_rounds`.
  """
  actions = checks.as_int("actions", actions)  # before any jnp.asarray: int64 ids must not wrap
  return logged_rounds(jnp.zeros(actions.shape), actions, logging_probs, target_dist,
                       positions=positions).weights


def weight_diagnostics(weights: ArrayLike) -> WeightDiagnostics:
  """Effective sample size (sum w)^2 / sum w^2, the largest weight and the mean weight.

  Example:
    >>> weight_diagnostics(jnp.array([1., 1., 1., 1.])).effective_sample_size.item()
    4.0
  """
  weights = checks.as_float("weights", weights)
  checks.check_ndim("weights", weights, 1)
  checks.check_same_length(weights=weights)
  checks.check_values((checks.ValueCheck("weights", "nonnegative"),), weights)
  sum_sq = jnp.sum(weights**2)
  safe_sum_sq = jnp.where(sum_sq > 0, sum_sq, 1.0)
  ess = jnp.where(sum_sq > 0, jnp.sum(weights)**2 / safe_sum_sq, 0.0)
  return WeightDiagnostics(ess, jnp.max(weights), jnp.mean(weights))
