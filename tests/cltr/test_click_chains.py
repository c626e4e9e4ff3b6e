"""Chain click models (cascade, DCM, DBN): exact pattern probabilities by enumeration, marginals,
simulated frequencies, special cases, masks, jit and vmap, sessions, bad inputs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.cltr import click_chains as chains
from saferl_jax.cltr import clicks


def _joint(model, relevance, shown=None):
  """P(click pattern) for every pattern in {0, 1}^K, by walking the tree of the user's choices.

  Written from the model's story, independently of the library's recursion: at an examined,
  shown rank the user clicks (R) or not; a clicker is satisfied (s R) and leaves, or goes on (c);
  a non-clicker goes on (g). An empty slot is passed over.
  """
  c = np.asarray(model.continue_after_click, np.float64)
  g = np.asarray(model.continue_after_skip, np.float64)
  s = float(model.satisfaction)
  r = np.asarray(relevance, np.float64)
  k = len(r)
  shown = np.ones(k, bool) if shown is None else np.asarray(shown, bool)
  out = {pattern: 0.0 for pattern in itertools.product((0, 1), repeat=k)}

  def walk(rank, examined, pattern, mass):
    if rank == k:
      out[pattern] += mass
      return
    if not examined or not shown[rank]:
      walk(rank + 1, examined, pattern + (0,), mass)
      return
    click, satisfied = mass * r[rank], mass * r[rank] * s * r[rank]
    walk(rank + 1, False, pattern + (1,), satisfied)
    walk(rank + 1, True, pattern + (1,), (click - satisfied) * c[rank])
    walk(rank + 1, False, pattern + (1,), (click - satisfied) * (1 - c[rank]))
    walk(rank + 1, True, pattern + (0,), mass * (1 - r[rank]) * g[rank])
    walk(rank + 1, False, pattern + (0,), mass * (1 - r[rank]) * (1 - g[rank]))

  walk(0, True, (), 1.0)
  return out


def _models(k):
  rng = np.random.default_rng(k)
  return {
      "cascade": chains.cascade(k),
      "dcm": chains.dcm(k),
      "dcm_per_rank": chains.dcm(k, continue_after_click=rng.uniform(0.2, 0.9, k)),
      "dbn": chains.dbn(k),
      "dbn_per_rank": chains.dbn(k, gamma=rng.uniform(0.5, 1.0, k), satisfaction=0.6),
      "general": chains.chain_click_model(rng.uniform(0, 1, k), rng.uniform(0, 1, k),
                                          satisfaction=0.3),
  }


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_enumerated_patterns_sum_to_one_and_give_the_marginals(k):
  rng = np.random.default_rng(10 + k)
  for name, model in _models(k).items():
    for relevance in (rng.uniform(0, 1, k), rng.integers(0, 5, k) / 4):
      for shown in (None, rng.random(k) < 0.7):
        joint = _joint(model, relevance, shown)
        assert abs(sum(joint.values()) - 1) < 1e-12, name
        marginal = np.zeros(k)
        for pattern, p in joint.items():
          marginal += p * np.asarray(pattern)
        np.testing.assert_allclose(
            chains.chain_click_probabilities(model, relevance, where=shown), marginal, atol=2e-6,
            err_msg=f"{name} R={relevance} shown={shown}")


def test_closed_forms():
  r = np.array([0.5, 0.25, 1.0])
  # Cascade: P(click_k) = R_k prod_{j<k} (1 - R_j).
  np.testing.assert_allclose(chains.chain_click_probabilities(chains.cascade(3), r),
                             [0.5, 0.5 * 0.25, 0.5 * 0.75 * 1.0], rtol=1e-6)
  # DBN, two ranks: P(E_1) = gamma [R0 (1 - s R0) + (1 - R0)].
  gamma, s = 0.8, 0.6
  p = chains.chain_click_probabilities(chains.dbn(2, gamma=gamma, satisfaction=s), r[:2])
  np.testing.assert_allclose(p, [0.5, gamma * (0.5 * (1 - s * 0.5) + 0.5) * 0.25], rtol=1e-6)
  # DCM lam = 0 is the cascade model.
  np.testing.assert_allclose(chains.chain_click_probabilities(
      chains.dcm(3, continue_after_click=0.0), r), chains.chain_click_probabilities(
          chains.cascade(3), r), rtol=1e-6)


def test_dcm_with_lambda_one_is_the_affine_model_with_independent_clicks():
  k = 4
  r = np.array([0.75, 0.0, 0.5, 1.0])
  model = chains.dcm(k, continue_after_click=1.0)
  affine = clicks.click_model(np.ones(k), np.zeros(k))
  np.testing.assert_allclose(chains.chain_click_probabilities(model, r),
                             clicks.click_probabilities(affine, r), rtol=1e-6)
  for pattern, p in _joint(model, r).items():
    independent = np.prod(np.where(np.asarray(pattern) == 1, r, 1 - r))
    assert abs(p - independent) < 1e-12, pattern


def _pattern_counts(model, relevance, shown, n, key):
  """Counts of each click pattern over n sessions, each simulated by one vmapped call on [K]."""
  keys = jax.random.split(key, n)
  sim = jax.vmap(lambda key: chains.simulate_chain_clicks(model, relevance, key=key, where=shown))
  simulated = np.asarray(sim(keys)).astype(int)
  codes = simulated @ (2 ** np.arange(len(relevance)))
  return np.bincount(codes, minlength=2 ** len(relevance)), simulated


@pytest.mark.parametrize("seed,name", list(enumerate(["cascade", "dcm_per_rank", "dbn", "general"])))
def test_simulated_pattern_frequencies_match_the_enumeration(seed, name):
  k, n = 4, 20_000
  model = _models(k)[name]
  relevance = np.array([0.5, 0.25, 0.75, 1.0])
  shown = np.array([True, True, False, True]) if name == "general" else None
  counts, _ = _pattern_counts(model, relevance, shown, n, jax.random.key(seed))
  joint = _joint(model, relevance, shown)
  for pattern, p in joint.items():
    code = int(np.asarray(pattern) @ (2 ** np.arange(k)))
    freq = counts[code] / n
    if p < 1e-12:  # impossible patterns (two cascade clicks, a click on an empty slot) never occur
      assert counts[code] == 0, (pattern, counts[code])
      continue
    # The count of a pattern is Binomial(n, p): its frequency has SE sqrt(p (1 - p) / n). Five SEs
    # per cell, 16 cells: a false alarm has probability about 16 * 6e-7.
    assert abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n), (name, pattern, freq, p)


def test_cascade_gives_at_most_one_click_and_dcm_more():
  relevance = np.full(5, 0.5)
  _, simulated = _pattern_counts(chains.cascade(5), relevance, None, 4000, jax.random.key(1))
  assert simulated.sum(1).max() == 1
  # P(no click) = 0.5^5 and a click otherwise: about 97% of sessions click once.
  assert simulated.sum(1).mean() > 0.9
  _, simulated = _pattern_counts(chains.dcm(5), relevance, None, 4000, jax.random.key(1))
  assert simulated.sum(1).max() >= 2


def test_deterministic_relevance_gives_exact_clicks():
  # R = 1 is always clicked, R = 0 never; a satisfied DBN user (s = 1, R = 1) stops at once.
  r = jnp.array([0.0, 1.0, 1.0, 0.0])
  key = jax.random.key(3)
  np.testing.assert_array_equal(chains.simulate_chain_clicks(chains.cascade(4), r, key=key),
                                [0, 1, 0, 0])
  np.testing.assert_array_equal(chains.simulate_chain_clicks(chains.dcm(4, continue_after_click=1.0),
                                                             r, key=key), [0, 1, 1, 0])
  np.testing.assert_array_equal(chains.simulate_chain_clicks(chains.dbn(4, gamma=1.0), r, key=key),
                                [0, 1, 0, 0])


def test_masked_ranks_are_never_clicked_and_passed_over():
  model = chains.dbn(4, gamma=0.7, satisfaction=0.5)
  r = np.array([0.5, 0.9, 0.25, 0.75])
  shown = np.array([True, False, True, True])
  p = np.asarray(chains.chain_click_probabilities(model, r, where=shown))
  assert p[1] == 0.0
  # Passing over the empty slot: the same as the list without it (with those ranks' parameters).
  gamma = np.asarray(model.continue_after_click)
  without = chains.chain_click_model(gamma[[0, 2, 3]], gamma[[0, 2, 3]], satisfaction=0.5)
  np.testing.assert_allclose(p[[0, 2, 3]], chains.chain_click_probabilities(without, r[[0, 2, 3]]),
                             rtol=1e-6)
  _, simulated = _pattern_counts(model, r, shown, 500, jax.random.key(2))
  assert simulated[:, 1].sum() == 0 and simulated[:, 3].sum() > 0
  # A [K] mask broadcasts over a batch; an all-masked list gives zeros, no NaN.
  batch = np.tile(r, (3, 1))
  np.testing.assert_allclose(chains.chain_click_probabilities(model, batch, where=shown),
                             np.tile(p, (3, 1)), rtol=1e-6)
  none = np.zeros(4, bool)
  assert np.all(np.asarray(chains.chain_click_probabilities(model, r, where=none)) == 0)
  assert np.all(np.asarray(chains.simulate_chain_clicks(model, r, key=jax.random.key(0),
                                                        where=none)) == 0)


def test_extreme_relevance_stays_finite_and_gradients_match_finite_differences():
  model = chains.dbn(5, gamma=0.9, satisfaction=0.7)
  tiny = np.array([1e-8, 1.0, 1e-8, 0.0, 1.0])
  p = np.asarray(chains.chain_click_probabilities(model, tiny))
  assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
  r = jnp.array([0.3, 0.6, 0.2, 0.8, 0.5])
  total = lambda r: jnp.sum(chains.chain_click_probabilities(model, r))  # noqa: E731
  grad = np.asarray(jax.grad(total)(r))
  h = 1e-2  # central differences: error O(h^2) of a polynomial of degree <= 2 per coordinate
  fd = [(total(r.at[i].add(h)) - total(r.at[i].add(-h))) / (2 * h) for i in range(5)]
  np.testing.assert_allclose(grad, fd, atol=2e-3)


@pytest.mark.slow
def test_jit_equals_eager_and_vmap_equals_loop():
  model = chains.dbn(4, gamma=0.8, satisfaction=0.5)
  relevance = jnp.asarray(np.random.default_rng(0).random((6, 4)), jnp.float32)
  key = jax.random.key(1)
  np.testing.assert_allclose(jax.jit(chains.chain_click_probabilities)(model, relevance),
                             chains.chain_click_probabilities(model, relevance), rtol=1e-6)
  np.testing.assert_array_equal(
      jax.jit(lambda k, m, r: chains.simulate_chain_clicks(m, r, key=k))(key, model, relevance),
      chains.simulate_chain_clicks(model, relevance, key=key))
  keys = jax.random.split(key, 6)
  batched = jax.vmap(lambda k, r: chains.simulate_chain_clicks(model, r, key=k))(keys, relevance)
  probs = jax.vmap(lambda r: chains.chain_click_probabilities(model, r))(relevance)
  for i in range(6):
    np.testing.assert_array_equal(batched[i],
                                  chains.simulate_chain_clicks(model, relevance[i], key=keys[i]))
    np.testing.assert_allclose(probs[i], chains.chain_click_probabilities(model, relevance[i]),
                               rtol=1e-6)
  # A model with traced fields (vmapped over gamma) works too; gamma = 0 examines rank 0 only.
  gammas = jnp.array([0.0, 1.0])
  p = jax.vmap(lambda g: chains.chain_click_probabilities(chains.dbn(4, gamma=g), relevance[0]))(
      gammas)
  np.testing.assert_allclose(p[0, 1:], 0.0)
  np.testing.assert_allclose(p[1], chains.chain_click_probabilities(chains.dbn(4, gamma=1.0),
                                                                    relevance[0]), rtol=1e-6)
  # Same key, same clicks; another key, other clicks.
  big = jnp.full((200, 4), 0.5)
  a = chains.simulate_chain_clicks(model, big, key=jax.random.key(5))
  np.testing.assert_array_equal(a, chains.simulate_chain_clicks(model, big, key=jax.random.key(5)))
  assert not np.array_equal(a, chains.simulate_chain_clicks(model, big, key=jax.random.key(6)))


def _log(num_sessions, num_queries=6, num_docs=7, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, (num_queries, num_docs)).astype(np.int32)
  query_ids = rng.integers(0, num_queries, num_sessions).astype(np.int32)
  rankings = np.argsort(rng.random((num_sessions, num_docs)), axis=1).astype(np.int32)
  return jnp.asarray(query_ids), jnp.asarray(rankings), jnp.asarray(labels)


@pytest.mark.slow
def test_sessions_with_a_chain_model_equal_chain_clicks_on_gathered_relevance():
  # The chain model's class as clicks.py sees it (a doctest run may import click_chains twice).
  model = clicks.ChainClickModel(*chains.dbn(5, gamma=0.8, satisfaction=0.5))
  query_ids, rankings, labels = _log(64)
  key = jax.random.key(3)
  by_sessions = clicks.simulate_sessions(model, query_ids, rankings, labels, key=key, k=3)
  relevance = np.asarray(labels)[np.asarray(query_ids)[:, None], np.asarray(rankings)[:, :3]] / 4
  top3 = chains.ChainClickModel(model.continue_after_click[:3], model.continue_after_skip[:3], 0.5)
  np.testing.assert_array_equal(by_sessions, chains.simulate_chain_clicks(top3, relevance, key=key))
  # A document mask: padded documents are never clicked, and the same masked simulation.
  mask = jnp.asarray(np.random.default_rng(1).random(labels.shape) < 0.7)
  masked = clicks.simulate_sessions(model, query_ids, rankings, labels, key=key, k=3, where=mask)
  shown = np.asarray(mask)[np.asarray(query_ids)[:, None], np.asarray(rankings)[:, :3]]
  np.testing.assert_array_equal(masked, chains.simulate_chain_clicks(top3, relevance, key=key,
                                                                     where=shown))
  assert np.asarray(masked)[~shown].sum() == 0
  # Inside the caller's jit too.
  jitted = jax.jit(clicks.simulate_sessions, static_argnames=("k",))
  np.testing.assert_array_equal(jitted(model, query_ids, rankings, labels, key=key, k=3),
                                by_sessions)
  with pytest.raises(ValueError, match="model"):
    clicks.simulate_sessions((0.5, 0.5), query_ids, rankings, labels, key=key)
  with pytest.raises(ValueError, match="k"):
    clicks.simulate_sessions(clicks.ChainClickModel(*chains.cascade(2)), query_ids, rankings,
                             labels, key=key, k=3)


def test_bad_inputs_raise_naming_the_argument():
  r = jnp.full(3, 0.5)
  cases = [
      ("k", lambda: chains.cascade(0)),
      ("k", lambda: chains.dbn(True)),
      ("continue_after_click", lambda: chains.dcm(3, continue_after_click=1.5)),
      ("continue_after_click", lambda: chains.dcm(3, continue_after_click=[0.5, 0.5])),
      ("continue_after_click", lambda: chains.dcm(3, continue_after_click=float("nan"))),
      ("gamma", lambda: chains.dbn(3, gamma=-0.1)),
      ("satisfaction", lambda: chains.dbn(3, satisfaction=2.0)),
      ("continue_after_skip", lambda: chains.chain_click_model([0.5, 0.5], [1.0])),
      ("continue_after_skip", lambda: chains.chain_click_model([0.5, 0.5], [1.0, 1.1])),
      ("continue_after_click", lambda: chains.chain_click_model([[0.5]], [1.0])),
      ("relevance_at_ranks", lambda: chains.chain_click_probabilities(chains.cascade(3), r[:2])),
      ("relevance_at_ranks", lambda: chains.chain_click_probabilities(chains.cascade(3), r + 1)),
      ("where", lambda: chains.chain_click_probabilities(chains.cascade(3), r,
                                                         where=np.ones(2, bool))),
      ("where", lambda: chains.chain_click_probabilities(chains.cascade(3), r, where=np.ones(3))),
      ("key", lambda: chains.simulate_chain_clicks(chains.cascade(3), r,
                                                   key=jax.random.PRNGKey(0))),
      ("model.satisfaction", lambda: chains.check_chain_click_model(
          chains.cascade(3)._replace(satisfaction=np.ones(3)))),
      ("user.continue_after_skip", lambda: chains.check_chain_click_model(
          chains.cascade(3)._replace(continue_after_skip=jnp.full(3, -0.5)), name="user")),
      ("user", lambda: chains.check_chain_click_model(clicks.trust_bias(3), name="user")),
  ]
  for name, call in cases:
    with pytest.raises((ValueError, TypeError), match=name):
      call()
