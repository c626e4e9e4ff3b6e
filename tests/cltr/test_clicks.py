"""Click models: SPEC constants, click frequencies, adversarial flips, misspecification,
jit and vmap, session simulation and its sharding over devices, bad inputs."""

import textwrap

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from saferl_jax import cltr


def test_trust_bias_constants_match_the_spec():
  model = cltr.trust_bias(5)
  np.testing.assert_allclose(model.alpha, [0.35, 0.532, 0.547, 0.537, 0.520], atol=5e-4)
  np.testing.assert_allclose(model.beta, [0.65, 0.258, 0.153, 0.106, 0.080], atol=5e-4)
  assert float(model.flip_probability) == 0.0


def test_position_based_closed_form():
  model = cltr.position_based(4, eta=2.0)
  np.testing.assert_allclose(model.alpha, [1.0, 1 / 4, 1 / 9, 1 / 16], rtol=1e-6)
  np.testing.assert_array_equal(model.beta, np.zeros(4))
  np.testing.assert_allclose(cltr.position_based(3, eta=0.0).alpha, np.ones(3))


def test_click_probabilities_closed_form():
  model = cltr.trust_bias(3)
  relevance = np.array([0.25, 1.0, 0.0])
  expected = np.asarray(model.alpha) * relevance + np.asarray(model.beta)
  np.testing.assert_allclose(cltr.click_probabilities(model, relevance), expected, rtol=1e-6)
  masked = cltr.click_probabilities(model, relevance, where=np.array([True, False, True]))
  np.testing.assert_allclose(masked, expected * [1, 0, 1], rtol=1e-6)


def test_adversarial_flip():
  base = cltr.trust_bias(5)
  relevance = jnp.array([0.0, 0.25, 0.5, 0.75, 1.0])
  p = cltr.click_probabilities(base, relevance)
  np.testing.assert_allclose(cltr.click_probabilities(cltr.adversarial(base), relevance), 1 - p, atol=1e-6)
  eps = 0.3
  mixed = cltr.click_probabilities(cltr.adversarial(base, eps), relevance)
  np.testing.assert_allclose(mixed, (1 - eps) * p + eps * (1 - p), atol=1e-6)
  np.testing.assert_allclose(cltr.click_probabilities(cltr.adversarial(base, 0.0), relevance), p)


def test_misspecified_interpolates_to_the_mean():
  base = cltr.trust_bias(5)
  same = cltr.misspecified(base, 0.0)
  np.testing.assert_allclose(same.alpha, base.alpha, rtol=1e-6)
  np.testing.assert_allclose(same.beta, base.beta, rtol=1e-6)
  flat = cltr.misspecified(base, 1.0)
  np.testing.assert_allclose(flat.alpha, np.full(5, np.mean(base.alpha)), rtol=1e-6)
  np.testing.assert_allclose(flat.beta, np.full(5, np.mean(base.beta)), rtol=1e-6)
  half = cltr.misspecified(base, 0.5)
  np.testing.assert_allclose(half.alpha, (np.asarray(base.alpha) + np.mean(base.alpha)) / 2, rtol=1e-6)
  cltr.check_click_model(half)  # still valid probabilities


def _log(num_sessions, num_queries=6, num_docs=7, seed=0):
  """Labels [Q, D], and sessions: a query id and a random permutation of its documents each."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, (num_queries, num_docs)).astype(np.int32)
  query_ids = rng.integers(0, num_queries, num_sessions).astype(np.int32)
  rankings = np.argsort(rng.random((num_sessions, num_docs)), axis=1).astype(np.int32)
  return jnp.asarray(query_ids), jnp.asarray(rankings), jnp.asarray(labels)


@pytest.mark.parametrize("model", [cltr.trust_bias(5), cltr.adversarial(cltr.position_based(5), 0.4)],
                         ids=["trust_bias", "adversarial_pbm"])
@pytest.mark.slow
def test_click_frequencies_match_probabilities(model):
  n = 200_000
  query_ids, rankings, labels = _log(n, num_queries=3, num_docs=5, seed=1)
  clicks_ = np.asarray(cltr.simulate_sessions(model, query_ids, rankings, labels,
                                              key=jax.random.key(7)))
  relevance = cltr.relevance_at_ranks(query_ids, rankings[:, :5], labels)
  p = np.asarray(cltr.click_probabilities(model, relevance), np.float64)
  # Per rank: the click count is a sum of independent Bernoullis, mean sum p, variance sum p (1 - p).
  observed = clicks_.sum(0)
  expected = p.sum(0)
  se = np.sqrt((p * (1 - p)).sum(0))
  np.testing.assert_array_less(np.abs(observed - expected), 5 * se)
  # Per (rank, label) cell, where the probability is a constant: frequency within 5 binomial SEs.
  labels_shown = np.asarray(labels)[np.asarray(query_ids)[:, None], np.asarray(rankings)[:, :5]]
  for rank in range(5):
    for label in range(5):
      cell = labels_shown[:, rank] == label
      count = cell.sum()
      if count < 1000:
        continue
      q = p[cell, rank][0]
      freq = clicks_[cell, rank].mean()
      assert abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / count) + 1e-12, (rank, label, freq, q)


@pytest.mark.slow
def test_deterministic_cells_give_exact_clicks():
  # PBM at rank 0 with label 4 clicks with probability 1, label 0 never.
  model = cltr.position_based(2)
  clicks_ = cltr.simulate_sessions(model, jnp.zeros(100, jnp.int32),
                                   jnp.tile(jnp.array([[0, 1]]), (100, 1)), jnp.array([[4, 0]]),
                                   key=jax.random.key(0))
  np.testing.assert_array_equal(clicks_, np.tile([[1.0, 0.0]], (100, 1)))


@pytest.mark.slow
def test_sessions_equal_simulate_clicks_on_gathered_relevance():
  model = cltr.trust_bias(3)
  query_ids, rankings, labels = _log(64)
  key = jax.random.key(3)
  by_sessions = cltr.simulate_sessions(model, query_ids, rankings, labels, key=key, k=3)
  relevance = np.asarray(labels)[np.asarray(query_ids)[:, None], np.asarray(rankings)[:, :3]] / 4
  np.testing.assert_array_equal(by_sessions, cltr.simulate_clicks(model, relevance, key=key))


@pytest.mark.slow
def test_k_smaller_than_the_model_uses_its_first_ranks():
  model = cltr.trust_bias(5)
  query_ids, rankings, labels = _log(32)
  key = jax.random.key(4)
  top3 = cltr.simulate_sessions(model, query_ids, rankings, labels, key=key, k=3)
  small = cltr.simulate_sessions(cltr.trust_bias(3), query_ids, rankings, labels, key=key)
  assert top3.shape == (32, 3)
  np.testing.assert_array_equal(top3, small)


@pytest.mark.slow
def test_padded_documents_are_never_clicked():
  model = cltr.adversarial(cltr.trust_bias(4), 0.5)  # every real document has P(click) > 0
  labels = jnp.array([[0, 4, 2, 0, 0]])
  mask = jnp.array([[True, True, True, False, False]])
  n = 2000
  rankings = jnp.tile(jnp.array([[1, 3, 0, 4, 2]]), (n, 1))
  clicks_ = np.asarray(cltr.simulate_sessions(model, jnp.zeros(n, jnp.int32), rankings, labels,
                                              key=jax.random.key(0), where=mask))
  assert clicks_[:, [1, 3]].sum() == 0
  assert clicks_[:, [0, 2]].mean() > 0.2


@pytest.mark.slow
def test_jit_equals_eager():
  model = cltr.trust_bias(5)
  relevance = jnp.asarray(np.random.default_rng(0).random((10, 5)), jnp.float32)
  key = jax.random.key(1)
  np.testing.assert_allclose(jax.jit(cltr.click_probabilities)(model, relevance),
                             cltr.click_probabilities(model, relevance), rtol=1e-6)
  np.testing.assert_array_equal(jax.jit(lambda k, m, r: cltr.simulate_clicks(m, r, key=k))(
                                    key, model, relevance),
                                cltr.simulate_clicks(model, relevance, key=key))
  query_ids, rankings, labels = _log(40)
  jitted = jax.jit(cltr.simulate_sessions, static_argnames=("k",))
  np.testing.assert_array_equal(jitted(model, query_ids, rankings, labels, key=key, k=5),
                                cltr.simulate_sessions(model, query_ids, rankings, labels, key=key,
                                                       k=5))
  # A model whose fields are traced (vmapped over flip probabilities) works too.
  flips = jnp.array([0.0, 1.0])
  probs = jax.vmap(lambda e: cltr.click_probabilities(cltr.adversarial(model, e), relevance[0]))(flips)
  np.testing.assert_allclose(probs[1], 1 - probs[0], atol=1e-6)


@pytest.mark.slow
def test_vmap_equals_loop():
  model = cltr.adversarial(cltr.trust_bias(5), 0.2)
  relevance = jnp.asarray(np.random.default_rng(0).random((6, 5)), jnp.float32)
  keys = jax.random.split(jax.random.key(1), 6)
  batched = jax.vmap(lambda k, m, r: cltr.simulate_clicks(m, r, key=k), in_axes=(0, None, 0))(
      keys, model, relevance)
  probs = jax.vmap(cltr.click_probabilities, in_axes=(None, 0))(model, relevance)
  for i in range(6):
    np.testing.assert_array_equal(batched[i], cltr.simulate_clicks(model, relevance[i], key=keys[i]))
    np.testing.assert_allclose(probs[i], cltr.click_probabilities(model, relevance[i]), rtol=1e-6)


@pytest.mark.slow
def test_same_key_same_clicks():
  model = cltr.trust_bias()
  query_ids, rankings, labels = _log(50)
  a = cltr.simulate_sessions(model, query_ids, rankings, labels, key=jax.random.key(5))
  b = cltr.simulate_sessions(model, query_ids, rankings, labels, key=jax.random.key(5))
  c = cltr.simulate_sessions(model, query_ids, rankings, labels, key=jax.random.key(6))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.slow
def test_bad_inputs_raise():
  model = cltr.trust_bias(5)
  query_ids, rankings, labels = _log(8)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="labels"):
    cltr.simulate_sessions(model, query_ids, rankings, labels.at[0, 0].set(5), key=key)
  with pytest.raises(ValueError, match="labels"):
    cltr.simulate_sessions(model, query_ids, rankings, labels.at[0, 0].set(-1), key=key)
  with pytest.raises(ValueError, match="k"):
    cltr.simulate_sessions(model, query_ids, rankings[:, :3], labels, key=key)
  with pytest.raises(ValueError, match="k"):
    cltr.simulate_sessions(cltr.trust_bias(3), query_ids, rankings, labels, key=key, k=4)
  with pytest.raises(ValueError, match="query_ids"):
    cltr.simulate_sessions(model, query_ids.at[0].set(6), rankings, labels, key=key)
  with pytest.raises(ValueError, match="rankings"):
    cltr.simulate_sessions(model, query_ids, rankings.at[0, 0].set(7), labels, key=key)
  with pytest.raises(ValueError, match="rankings"):
    cltr.simulate_sessions(model, query_ids[:4], rankings, labels, key=key)
  with pytest.raises(ValueError, match="labels"):
    cltr.simulate_sessions(model, query_ids, rankings, labels.astype(jnp.float32), key=key)
  with pytest.raises(ValueError, match="where"):
    cltr.simulate_sessions(model, query_ids, rankings, labels, key=key,
                           where=jnp.ones((2, 2), bool))
  for eps in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="flip_probability"):
      cltr.adversarial(model, eps)
    with pytest.raises(ValueError, match="flip_probability"):
      cltr.click_probabilities(model._replace(flip_probability=eps), jnp.zeros(5))
  with pytest.raises(ValueError, match="amount"):
    cltr.misspecified(model, 1.2)
  with pytest.raises(ValueError, match="relevance_at_ranks"):
    cltr.click_probabilities(model, jnp.zeros(4))
  with pytest.raises(ValueError, match="relevance_at_ranks"):
    cltr.click_probabilities(model, jnp.full(5, 1.5))
  with pytest.raises(ValueError, match="model"):
    cltr.click_model([0.8, 0.5], [0.3, 0.1])  # alpha + beta > 1 at rank 0
  with pytest.raises(ValueError, match="model.beta"):
    cltr.click_model([0.5, 0.5], [0.1])
  with pytest.raises(ValueError, match="k"):
    cltr.position_based(0)
  with pytest.raises(ValueError, match="eta"):
    cltr.position_based(5, eta=-1.0)


@settings(max_examples=15)
@given(k=st.integers(1, 6), eta=st.floats(0.0, 3.0), eps=st.floats(0.0, 1.0),
       amount=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_probabilities_stay_in_the_unit_interval(k, eta, eps, amount, seed):
  for base in (cltr.position_based(k, eta=eta), cltr.trust_bias(k)):
    model = cltr.misspecified(cltr.adversarial(base, eps), amount)
    relevance = np.random.default_rng(seed).random((3, k))
    p = np.asarray(cltr.click_probabilities(model, relevance))
    assert p.shape == (3, k)
    assert np.all((p >= 0) & (p <= 1))


SESSIONS = """
rng = np.random.default_rng(0)
labels = rng.integers(0, 5, (6, 7)).astype(np.int32)
query_ids = rng.integers(0, 6, 64).astype(np.int32)
rankings = np.argsort(rng.random((64, 7)), axis=1).astype(np.int32)
clicks = cltr.simulate_sessions(cltr.trust_bias(5), query_ids, rankings, labels, key=jax.random.key(9))
"""

IMPORTS = "import json, jax, numpy as np\nfrom saferl_jax import cltr\n"
SHARDING_SCRIPT = IMPORTS + SESSIONS + textwrap.dedent("""
    print(json.dumps({
        "devices": jax.device_count(),
        "shards": len(clicks.sharding.device_set),
        "shard_rows": [shard.data.shape[0] for shard in clicks.addressable_shards],
        "clicks": np.asarray(clicks).astype(int).tolist(),
    }))
""")


@pytest.mark.slow
def test_session_axis_is_sharded_over_eight_devices(run_on_cpu_devices):
  result = run_on_cpu_devices(SHARDING_SCRIPT)
  assert result["devices"] == 8 and result["shards"] == 8
  assert result["shard_rows"] == [8] * 8  # split along the session axis, not replicated
  # The same clicks as on this process's devices: they depend on the key, not the device count.
  local = {"jax": jax, "np": np, "cltr": cltr}
  exec(SESSIONS, local)
  np.testing.assert_array_equal(np.asarray(result["clicks"]), np.asarray(local["clicks"]).astype(int))
