"""Agreement with rax: DCG, NDCG, MRR and precision against rax's metrics on many random lists
(ties and masks included), ERR against Chapelle et al.'s cascade recursion (rax 0.4 has no ERR),
and the softmax and ListMLE losses (from rax) against this package's Plackett-Luce maths."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rax

from saferl_jax.ranking import (dcg_at_k, err_at_k, listmle_loss, mrr_at_k, ndcg_at_k,
                                precision_at_k, ranking_log_prob, softmax_loss)


def random_lists(seed, num_lists, num_items, *, ties):
  """Scores, graded labels 0..4 and masks (some lists all masked), and the rankings rax induces."""
  rng = np.random.default_rng(seed)
  if ties:  # few distinct values: many tied scores
    scores = rng.integers(-2, 3, (num_lists, num_items)).astype(np.float32)
  else:
    scores = rng.normal(size=(num_lists, num_items)).astype(np.float32)
  labels = rng.integers(0, 5, (num_lists, num_items)).astype(np.float32)
  where = rng.random((num_lists, num_items)) < 0.75
  where[:3] = False                       # all-masked lists
  where[3:6] = True                       # unmasked lists
  # Valid items first, then by descending score, ties in index order (lexsort is stable; its
  # last key is the primary one): rax's `utils.sort_by` order.
  rankings = np.stack([np.lexsort((-s, ~w)) for s, w in zip(scores, where)])
  return scores, labels, where, rankings


# (seed, D, tied scores); the first case runs in the quick suite, the others are marked slow.
CASES = [(0, 7, True)] + [pytest.param(*case, marks=pytest.mark.slow)
                          for case in [(1, 7, False), (2, 4, True), (3, 10, True)]]


@pytest.mark.parametrize("seed,num_items,ties", CASES)
def test_rankings_are_the_ones_rax_induces(seed, num_items, ties):
  scores, _, where, rankings = random_lists(seed, 200, num_items, ties=ties)
  rax_ranks = np.asarray(rax.utils.ranks(jnp.asarray(scores), where=jnp.asarray(where)))
  np.testing.assert_array_equal(rax_ranks - 1, np.argsort(rankings, axis=-1))


@pytest.mark.parametrize("seed,num_items,ties", CASES)
@pytest.mark.slow
def test_dcg_ndcg_mrr_precision_agree_with_rax(seed, num_items, ties):
  scores, labels, where, rankings = random_lists(seed, 200, num_items, ties=ties)
  s, y, w = jnp.asarray(scores), jnp.asarray(labels), jnp.asarray(where)
  pairs = [(dcg_at_k, rax.dcg_metric), (ndcg_at_k, rax.ndcg_metric),
           (mrr_at_k, rax.mrr_metric), (precision_at_k, rax.precision_metric)]
  for k in sorted({1, 3, 5, num_items} & set(range(1, num_items + 1))):
    for ours, theirs in pairs:
      expected = theirs(s, y, where=w, topn=k, reduce_fn=None)
      got = ours(labels, rankings, k=k, where=where)
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{ours.__name__} k={k}")
  # Without a mask, and without a cut-off (k = D is rax's topn=None).
  full = np.stack([np.argsort(-x, kind="stable") for x in scores])
  for ours, theirs in pairs:
    np.testing.assert_allclose(ours(labels, full, k=num_items), theirs(s, y, reduce_fn=None),
                               rtol=1e-5, atol=1e-6, err_msg=ours.__name__)


@pytest.mark.slow
def test_threshold_moves_what_counts_as_relevant():
  scores, labels, where, rankings = random_lists(4, 200, 6, ties=True)
  # rax counts label >= 1 as relevant; binarising at 3 first gives our threshold=3.
  binary = jnp.asarray((labels >= 3).astype(np.float32))
  s, w = jnp.asarray(scores), jnp.asarray(where)
  for ours, theirs in [(mrr_at_k, rax.mrr_metric), (precision_at_k, rax.precision_metric)]:
    got = ours(labels, rankings, k=4, where=where, threshold=3.0)
    np.testing.assert_allclose(got, theirs(s, binary, where=w, topn=4, reduce_fn=None),
                               rtol=1e-6)
    assert not np.allclose(got, ours(labels, rankings, k=4, where=where))  # the option matters


def reference_err(labels, ranking, valid, k, max_label):
  """Chapelle et al.'s cascade: the user stops at rank r with probability R_r."""
  err, reach = 0.0, 1.0
  for r in range(k):
    d = ranking[r]
    stop = (2.0 ** labels[d] - 1.0) / 2.0 ** max_label if valid[d] else 0.0
    err += reach * stop / (r + 1)
    reach *= 1.0 - stop
  return err


@pytest.mark.parametrize("seed,num_items,ties", [(0, 7, True), (1, 7, False)])
@pytest.mark.slow
def test_err_matches_the_cascade_recursion(seed, num_items, ties):
  _, labels, where, rankings = random_lists(seed, 100, num_items, ties=ties)
  for k in (1, 3, num_items):
    expected = [reference_err(y, r, w, k, 4.0) for y, r, w in zip(labels, rankings, where)]
    np.testing.assert_allclose(err_at_k(labels, rankings, k=k, max_label=4, where=where),
                               expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_metric_closed_forms_and_checks():
  labels = np.array([0.0, 3.0, 1.0, 0.0])
  ranking = np.array([3, 0, 2, 1])
  assert float(mrr_at_k(labels, ranking, k=4)) == pytest.approx(1 / 3)
  assert float(mrr_at_k(labels, ranking, k=2)) == 0.0
  assert float(precision_at_k(labels, ranking, k=4)) == pytest.approx(0.5)
  # Padding shown in the top k is not counted in precision's denominator.
  where = np.array([False, True, True, True])
  assert float(precision_at_k(labels, ranking, k=3, where=where)) == pytest.approx(0.5)
  # ERR with max_label 3: stop probabilities 0, 0, 1/8, 7/8 at ranks 0..3.
  expected = (1 / 8) / 3 + (7 / 8) * (7 / 8) / 4
  assert float(err_at_k(labels, ranking, k=4, max_label=3)) == pytest.approx(expected, rel=1e-6)
  with pytest.raises(ValueError, match="labels"):
    err_at_k(labels, ranking, k=4, max_label=2)
  with pytest.raises(ValueError, match="max_label"):
    err_at_k(labels, ranking, k=4, max_label=0)
  with pytest.raises(ValueError, match="threshold"):
    mrr_at_k(labels, ranking, k=2, threshold=float("nan"))
  with pytest.raises(ValueError, match="k"):
    precision_at_k(labels, ranking, k=5)


@pytest.mark.slow
def test_new_metrics_jit_and_vmap():
  _, labels, where, rankings = random_lists(5, 8, 5, ties=True)
  for fn, extra in [(mrr_at_k, {}), (precision_at_k, {}), (err_at_k, {"max_label": 4})]:
    batch = fn(labels, rankings, k=3, where=where, **extra)
    jitted = jax.jit(lambda y, r, w, fn=fn, extra=extra: fn(y, r, k=3, where=w, **extra))
    np.testing.assert_allclose(jitted(labels, rankings, where), batch, rtol=1e-6)
    loop = [fn(y, r, k=3, where=w, **extra) for y, r, w in zip(labels, rankings, where)]
    np.testing.assert_allclose(batch, loop, rtol=1e-6)


# Losses from rax.


@pytest.mark.slow
def test_listmle_is_minus_the_pl_log_prob_of_the_label_order():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(50, 6)).astype(np.float32)
  labels = rng.integers(0, 3, (50, 6)).astype(np.float32)   # ties among labels
  where = rng.random((50, 6)) < 0.8
  where[0] = True
  order = np.stack([np.lexsort((-y, ~w)) for y, w in zip(labels, where)])
  expected = -ranking_log_prob(logits, order, where=where)
  np.testing.assert_allclose(listmle_loss(logits, labels, where=where), expected, rtol=1e-5,
                             atol=1e-5)
  # Padding values do not matter.
  noisy = np.where(where, logits, 1e3)
  np.testing.assert_allclose(listmle_loss(noisy, labels, where=where), expected, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.slow
def test_listmle_random_ties_pick_a_label_consistent_order():
  logits = np.array([0.3, -1.0, 2.0])
  labels = np.ones(3)
  values = {round(-float(ranking_log_prob(logits, np.array(p))), 4)
            for p in itertools.permutations(range(3))}
  seen = {round(float(listmle_loss(logits, labels, key=jax.random.key(i))), 4) for i in range(8)}
  assert seen <= values and len(seen) > 1


@pytest.mark.slow
def test_softmax_loss_closed_form_and_masks():
  logits = np.array([[1.0, 0.0, -1.0, 5.0], [0.5, 0.5, 0.0, 0.0]], np.float32)
  labels = np.array([[2.0, 1.0, 0.0, 4.0], [1.0, 0.0, 3.0, 0.0]], np.float32)
  where = np.array([[True, True, True, False], [True, True, True, True]])
  log_p0 = jax.nn.log_softmax(logits[0, :3])
  expected0 = -float(jnp.sum(labels[0, :3] * log_p0))
  expected1 = -float(jnp.sum(labels[1] * jax.nn.log_softmax(logits[1])))
  np.testing.assert_allclose(softmax_loss(logits, labels, where=where), [expected0, expected1],
                             rtol=1e-5)
  normalized = softmax_loss(logits, labels, where=where, normalize=True)
  np.testing.assert_allclose(normalized[0], -float(jnp.sum(labels[0, :3] / 3 * log_p0)),
                             rtol=1e-5)


@pytest.mark.parametrize("loss", [softmax_loss, listmle_loss])
@pytest.mark.slow
def test_all_masked_list_has_zero_loss_and_finite_gradient(loss):
  logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
  labels = jnp.array([[1.0, 0.0, 2.0], [2.0, 1.0, 0.0]])
  where = jnp.array([[False, False, False], [True, True, False]])
  value, grad = jax.value_and_grad(lambda m: jnp.sum(loss(m, labels, where=where)))(logits)
  assert float(loss(logits, labels, where=where)[0]) == 0.0
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[0], 0.0)
  np.testing.assert_array_equal(grad[1, 2], 0.0)
  assert np.any(grad[1] != 0.0)


def test_loss_input_checks():
  with pytest.raises(ValueError, match="labels"):
    softmax_loss(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="where"):
    listmle_loss(np.zeros(3), np.zeros(3), where=np.ones(3))
  with pytest.raises(ValueError, match="logits"):
    listmle_loss(np.array([0.0, np.nan]), np.zeros(2))
  with pytest.raises(ValueError, match="key"):
    listmle_loss(np.zeros(3), np.zeros(3), key=jax.random.PRNGKey(0))
