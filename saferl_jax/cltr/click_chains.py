"""Click models beyond affine: cascade, DCM and DBN as one chain model (floor 1).

The user scans the displayed top K from rank 0 down. An examined document d at
rank k is clicked with its attractiveness, the relevance probability R_d = y_d / 4.
After a click the user is satisfied with probability s R_d and stops; an
unsatisfied clicker goes on to rank k + 1 with probability c_k
(`continue_after_click`), and a user who examined k without clicking goes on with
probability g_k (`continue_after_skip`). Rank 0 is always examined. With
E_k the event that rank k is examined,

  P(E_0) = 1,   P(click_k) = P(E_k) R_k,
  P(E_{k+1}) = P(E_k) [R_k (1 - s R_k) c_k + (1 - R_k) g_k],

because whether the user reaches k + 1 depends only on reaching k and on what
happens at k. The three models of [CM] are special cases (`cascade`, `dcm`,
`dbn`). Unlike the affine `ClickModel` of `saferl_jax.cltr.clicks`, a click
depends on the documents above it, so the affine estimators are misspecified
under these users: that is what they are for.

A rank masked out by `where` (False: no document shown there) is never clicked,
and the user passes over it: whoever examined it examines the next rank, as if
the empty slot were not there (no chance of stopping).

`chain_click_probabilities` and `simulate_chain_clicks` take the relevance of one
displayed list, [K], or any leading batch, [..., K]; they are jittable and
vmappable. `saferl_jax.cltr.clicks.simulate_sessions` accepts a `ChainClickModel`
too, for logs of many sessions sharded over devices.

References:
  [CM] Chuklin, Markov, de Rijke. Click Models for Web Search. Morgan & Claypool, 2015.
  https://doi.org/10.2200/S00654ED1V01Y201507ICR043
  Craswell, Zoeter, Taylor, Ramsey. An Experimental Comparison of Click Position-Bias Models.
  WSDM 2008 (cascade). https://doi.org/10.1145/1341531.1341545
  Guo, Liu, Wang. Efficient Multiple-Click Models in Web Search. WSDM 2009 (DCM).
  https://doi.org/10.1145/1498759.1498818
  Chapelle, Zhang. A Dynamic Bayesian Network Click Model for Web Search Ranking. WWW 2009
  (DBN). https://doi.org/10.1145/1526709.1526711
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks

# Defaults of the constructors. Both are this library's choice, not values from the papers:
# Guo et al. and Chapelle & Zhang estimate these parameters from a search engine's logs.
DCM_CONTINUE_AFTER_CLICK = 0.5  # lam_k: half the clickers come back for more, at every rank
DBN_GAMMA = 0.9                 # the perseverance of an unsatisfied user
DBN_SATISFACTION = 1.0          # P(satisfied | click on d) = R_d: a perfect document satisfies


class ChainClickModel(NamedTuple):
  """A cascade-style click model: the user scans ranks 0, 1, ... and may stop after each.

  Attributes:
    continue_after_click: [K] c_k, P(go on to rank k + 1 | clicked at k, not satisfied).
    continue_after_skip: [K] g_k, P(go on to rank k + 1 | examined k, did not click).
    satisfaction: scalar s in [0, 1]; a click on d satisfies the user (who then stops)
      with probability s R_d (DBN); 0 for cascade and DCM.
  """
  continue_after_click: jax.Array
  continue_after_skip: jax.Array
  satisfaction: jax.Array | float = 0.0


def _check_k(k) -> None:
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise ValueError(f"k: must be a positive int (the number of displayed ranks), got {k!r}")


def _per_rank(name: str, value, k: int) -> jax.Array:
  """A scalar or [K] probability option as a [K] float array, checked on concrete values."""
  array = checks.as_float(name, value)
  if array.ndim == 0:
    array = jnp.full((k,), array)
  if array.shape != (k,):
    raise ValueError(f"{name}: expected a scalar or a [K] array with K = {k}, got shape "
                     f"{tuple(array.shape)}")
  _check_probabilities(name, array)
  return array


def _check_probabilities(name: str, array) -> None:
  if checks.is_concrete(array):
    values = np.asarray(array, np.float64)
    bad = ~((values >= 0) & (values <= 1))  # NaN is bad too
    if np.any(bad):
      raise ValueError(f"{name}: must be probabilities in [0, 1], found {int(bad.sum())} outside "
                       f"(e.g. {values[bad].ravel()[0]})")


def check_chain_click_model(model: ChainClickModel, *, name: str = "model") -> None:
  """Raises a ValueError unless both continuation arrays are [K] and every probability is in [0, 1].

  Shapes are always checked; values only when the model is concrete (not traced). Messages name
  `name` (the caller's argument, e.g. "click_model").

  Example:
    >>> check_chain_click_model(cascade(3))
    >>> try:
    ...   check_chain_click_model(cascade(3)._replace(satisfaction=2.0), name="user")
    ... except ValueError as err:
    ...   print(err)
    user.satisfaction: must be a scalar in [0, 1], got 2.0
  """
  if not isinstance(model, ChainClickModel):
    raise ValueError(f"{name}: must be a ChainClickModel, got {type(model).__name__}")
  after_click = jnp.asarray(model.continue_after_click)
  after_skip = jnp.asarray(model.continue_after_skip)
  if after_click.ndim != 1 or after_click.shape[0] == 0:
    raise ValueError(f"{name}.continue_after_click: expected a non-empty [K] array, got shape "
                     f"{tuple(after_click.shape)}")
  if after_skip.shape != after_click.shape:
    raise ValueError(f"{name}.continue_after_skip: expected shape {tuple(after_click.shape)} like "
                     f"{name}.continue_after_click, got {tuple(after_skip.shape)}")
  if jnp.ndim(model.satisfaction) != 0:
    raise ValueError(f"{name}.satisfaction: must be a scalar, got shape "
                     f"{tuple(jnp.shape(model.satisfaction))}")
  _check_probabilities(f"{name}.continue_after_click", after_click)
  _check_probabilities(f"{name}.continue_after_skip", after_skip)
  if checks.is_concrete(model.satisfaction):
    s = float(np.asarray(model.satisfaction, np.float64))
    if not 0 <= s <= 1:
      raise ValueError(f"{name}.satisfaction: must be a scalar in [0, 1], got {model.satisfaction!r}")


def _satisfaction(value) -> jax.Array | float:
  if checks.is_concrete(value):
    checks.check_real("satisfaction", value, low=0.0, high=1.0)
  return value


def chain_click_model(continue_after_click: ArrayLike, continue_after_skip: ArrayLike, *,
                      satisfaction: float = 0.0) -> ChainClickModel:
  """A checked `ChainClickModel` from c [K], g [K] and the satisfaction scale s.

  Args:
    continue_after_click: [K] P(go on | clicked, not satisfied) per rank.
    continue_after_skip: [K] P(go on | examined, not clicked) per rank.
    satisfaction: scalar s; P(satisfied | click on d) = s R_d.

  Returns:
    A `ChainClickModel`.

  Example:
    >>> model = chain_click_model([0.5, 0.5], [1.0, 1.0])
    >>> model.continue_after_click.shape
    (2,)
  """
  after_click = checks.as_float("continue_after_click", continue_after_click)
  if after_click.ndim != 1 or after_click.shape[0] == 0:
    raise ValueError(f"continue_after_click: expected a non-empty [K] array, got shape "
                     f"{tuple(after_click.shape)}")
  k = after_click.shape[0]
  model = ChainClickModel(_per_rank("continue_after_click", after_click, k),
                          _per_rank("continue_after_skip", continue_after_skip, k),
                          _satisfaction(satisfaction))
  check_chain_click_model(model)
  return model


def cascade(k: int = 5) -> ChainClickModel:
  """The cascade model (Craswell et al. 2008): scan down, click the first attractive document, stop.

  c_k = 0, g_k = 1, s = 0: P(click_k) = R_k prod_{j<k} (1 - R_j), and at most one click
  per session.

  Args:
    k: number of displayed ranks K.

  Returns:
    A `ChainClickModel` with [K] continuation probabilities.

  Example:
    >>> [round(float(p), 3) for p in chain_click_probabilities(cascade(3), [0.5, 0.5, 1.0])]
    [0.5, 0.25, 0.25]
  """
  _check_k(k)
  dtype = jnp.result_type(float)
  return ChainClickModel(jnp.zeros(k, dtype), jnp.ones(k, dtype), 0.0)


def dcm(k: int = 5, *, continue_after_click: ArrayLike = DCM_CONTINUE_AFTER_CLICK) -> ChainClickModel:
  """The dependent click model (Guo, Liu, Wang 2009): a cascade in which clickers may go on.

  c_k = lam_k, g_k = 1, s = 0. lam = 0 is the cascade model; lam = 1 makes every rank
  examined, so clicks are independent with P(click_k) = R_k (the affine model with
  alpha = 1, beta = 0).

  Args:
    k: number of displayed ranks K.
    continue_after_click: lam_k, a scalar or [K], in [0, 1]. The default 0.5 at every rank
      is this library's choice (the paper estimates lam_k from a search engine's logs).

  Returns:
    A `ChainClickModel`.

  Example:
    >>> [round(float(p), 3) for p in chain_click_probabilities(dcm(2), [1.0, 1.0])]
    [1.0, 0.5]
  """
  _check_k(k)
  return ChainClickModel(_per_rank("continue_after_click", continue_after_click, k),
                         jnp.ones(k, jnp.result_type(float)), 0.0)


def dbn(k: int = 5, *, gamma: ArrayLike = DBN_GAMMA,
        satisfaction: float = DBN_SATISFACTION) -> ChainClickModel:
  """The dynamic Bayesian network model (Chapelle, Zhang 2009), attractiveness = R_d.

  After a click on d the user is satisfied with probability s R_d and stops; otherwise (or
  after a skip) the user examines the next rank with probability gamma: c_k = g_k = gamma.
  With gamma = 1 and s = 1 this is the user model behind ERR (stop at d w.p. R_d once clicked).

  Args:
    k: number of displayed ranks K.
    gamma: perseverance, a scalar or [K], in [0, 1]; default 0.9 (this library's choice: the
      paper fits gamma to logs).
    satisfaction: s in [0, 1]; P(satisfied | click on d) = s R_d. Default 1 (our choice).

  Returns:
    A `ChainClickModel`.

  Example:
    >>> [round(float(p), 3) for p in chain_click_probabilities(dbn(2, gamma=0.5), [0.5, 1.0])]
    [0.5, 0.375]
  """
  _check_k(k)
  gamma = _per_rank("gamma", gamma, k)
  return ChainClickModel(gamma, gamma, _satisfaction(satisfaction))


def relevance_of_ranks(relevance_at_ranks, num_ranks: int) -> jax.Array:
  """relevance_at_ranks as floats, checked: shape [..., K] for a model of K ranks, values in
  [0, 1] (on concrete input). Every click model's functions take it this way."""
  relevance = checks.as_float("relevance_at_ranks", relevance_at_ranks)
  if relevance.ndim == 0 or relevance.shape[-1] != num_ranks:
    raise ValueError(
        f"relevance_at_ranks: expected shape [..., K] with K = {num_ranks} ranks of the model, "
        f"got {tuple(relevance.shape)} (take the top K: relevance[..., :K])")
  if checks.is_concrete(relevance):
    values = np.asarray(relevance)
    bad = ~((values >= 0) & (values <= 1))
    if np.any(bad):
      raise ValueError(f"relevance_at_ranks: relevance probabilities must be in [0, 1], found "
                       f"{int(bad.sum())} outside (e.g. {values[bad].ravel()[0]})")
  return relevance


def _inputs(model: ChainClickModel, relevance_at_ranks, where):
  """Checks the model, the relevance [..., K] and the mask; returns them as arrays."""
  check_chain_click_model(model)
  relevance = relevance_of_ranks(relevance_at_ranks, jnp.shape(model.continue_after_click)[0])
  if where is None:
    where = jnp.ones(relevance.shape, bool)
  else:
    where = jnp.asarray(where)
    if where.dtype != bool:
      raise ValueError(f"where: must be a bool mask (True = a document is shown), got dtype "
                       f"{where.dtype}")
    try:
      broadcasts = jnp.broadcast_shapes(where.shape, relevance.shape) == relevance.shape
    except ValueError:
      broadcasts = False
    if not broadcasts:
      raise ValueError(f"where: shape {tuple(where.shape)} does not broadcast to "
                       f"{tuple(relevance.shape)}")
    where = jnp.broadcast_to(where, relevance.shape)
  dtype = relevance.dtype
  model = ChainClickModel(jnp.asarray(model.continue_after_click, dtype),
                          jnp.asarray(model.continue_after_skip, dtype),
                          jnp.asarray(model.satisfaction, dtype))
  return model, relevance, where


def _go_on(model: ChainClickModel, relevance: jax.Array) -> jax.Array:
  """P(E_{k+1} | E_k) = R (1 - s R) c + (1 - R) g at every shown rank."""
  c, g, s = model
  return relevance * (1 - s * relevance) * c + (1 - relevance) * g


@jax.jit
def _probabilities(model, relevance, where):
  go_on = jnp.where(where, _go_on(model, relevance), 1.0)  # an empty slot is passed over
  examined = jnp.cumprod(go_on, axis=-1)
  examined = jnp.concatenate([jnp.ones_like(examined[..., :1]), examined[..., :-1]], axis=-1)
  return jnp.where(where, examined * relevance, 0.0)


def chain_click_probabilities(model: ChainClickModel, relevance_at_ranks: ArrayLike, *,
                              where: ArrayLike | None = None) -> jax.Array:
  """Exact marginal P(click at rank k) under a chain model, by the forward recursion.

  P(E_0) = 1, P(click_k) = P(E_k) R_k, P(E_{k+1}) = P(E_k) [R_k (1 - s R_k) c_k + (1 - R_k) g_k]
  (a masked rank: P(E_{k+1}) = P(E_k) and no click).

  Args:
    model: a `ChainClickModel` with K ranks.
    relevance_at_ranks: [..., K] relevance probabilities R (label / 4) in [0, 1] of the
      documents shown at ranks 0..K-1.
    where: optional [..., K] bool, False where no document is shown (never clicked; the user
      passes over the empty slot to the next rank).

  Returns:
    [..., K] click probabilities.

  Example:
    >>> [round(float(p), 3) for p in chain_click_probabilities(cascade(3), [0.5, 1.0, 1.0])]
    [0.5, 0.5, 0.0]
    >>> [round(float(p), 3) for p in chain_click_probabilities(
    ...     cascade(3), [0.5, 1.0, 1.0], where=[True, False, True])]
    [0.5, 0.0, 0.5]
  """
  model, relevance, where = _inputs(model, relevance_at_ranks, where)
  return _probabilities(model, relevance, where)


@jax.jit
def _simulate(model, relevance, where, key):
  c, g, s = model
  # Two uniforms per session and rank, laid out rank-major so that the scan reads whole slices.
  draws = jax.random.uniform(key, relevance.shape[-1:] + (2,) + relevance.shape[:-1],
                             relevance.dtype)

  def step(examined, rank):
    r, shown, u, c_k, g_k = rank
    attracted = u[0] < r
    # A clicker goes on unless satisfied (s R) and then only w.p. c: (1 - s R) c in all.
    go_on = u[1] < jnp.where(attracted, (1 - s * r) * c_k, g_k)
    return examined & (go_on | ~shown), examined & shown & attracted

  ranks = (jnp.moveaxis(relevance, -1, 0), jnp.moveaxis(where, -1, 0), draws, c, g)
  _, clicks = jax.lax.scan(step, jnp.ones(relevance.shape[:-1], bool), ranks)
  return jnp.moveaxis(clicks, 0, -1).astype(relevance.dtype)


def simulate_chain_clicks(model: ChainClickModel, relevance_at_ranks: ArrayLike, *,
                          key: jax.Array, where: ArrayLike | None = None) -> jax.Array:
  """Clicks of users who follow a chain model, simulated rank by rank with `lax.scan`.

  At each rank an examined, shown document is clicked w.p. R_k; a clicker is satisfied (and
  stops) w.p. s R_k, else goes on w.p. c_k; a non-clicker goes on w.p. g_k. Two uniforms
  per rank (one for the click, one for going on: w.p. (1 - s R_k) c_k after a click), drawn
  from `key` for the whole [..., K] batch at once, so the same key gives the same clicks;
  the batch is simulated in parallel.

  Args:
    model: a `ChainClickModel` with K ranks.
    relevance_at_ranks: [..., K] relevance probabilities in [0, 1].
    key: PRNG key.
    where: optional [..., K] bool, False where no document is shown (never clicked; the user
      passes over the empty slot).

  Returns:
    [..., K] clicks as floats, 0 or 1.

  Example:
    >>> import jax
    >>> clicks = simulate_chain_clicks(cascade(3), [1.0, 1.0, 0.0], key=jax.random.key(0))
    >>> clicks.tolist()
    [1.0, 0.0, 0.0]
  """
  checks.check_key("key", key)
  model, relevance, where = _inputs(model, relevance_at_ranks, where)
  return _simulate(model, relevance, where, key)
