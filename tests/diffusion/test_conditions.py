"""Conditions of any structure: checks, repetition, selection, the null condition and dropout."""

import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.diffusion import conditions


def test_pytrees_are_repeated_taken_and_dropped_leaf_by_leaf():
  c = {"u": jnp.arange(6.0).reshape(3, 2), "id": jnp.array([4, 5, 6])}
  assert conditions.batch_size("c", c) == 3
  repeated = conditions.repeat(c, 2)
  assert repeated["id"].tolist() == [4, 4, 5, 5, 6, 6]
  np.testing.assert_array_equal(repeated["u"][1], c["u"][0])
  taken = conditions.take(c, jnp.array([2, 0]))
  assert taken["id"].tolist() == [6, 4] and taken["u"].tolist() == [[4.0, 5.0], [0.0, 1.0]]
  null = conditions.check_null("null", {"u": jnp.zeros(2), "id": 9}, c)
  dropped = conditions.drop(c, null, jnp.array([True, False, True]))
  assert dropped["id"].tolist() == [9, 5, 9]
  assert dropped["u"].tolist() == [[0.0, 0.0], [2.0, 3.0], [0.0, 0.0]]
  both = conditions.concatenate(conditions.broadcast_null(null, 3), c)
  assert both["id"].tolist() == [9, 9, 9, 4, 5, 6]


@pytest.mark.parametrize("bad, error, match", [
    (jnp.array(3), ValueError, "leading batch axis"),
    ({"a": jnp.zeros(2), "b": jnp.zeros(3)}, ValueError, "same leading batch size"),
    (jnp.zeros((0, 2)), ValueError, "non-empty"),
    (jnp.array([0.0, jnp.inf]), ValueError, "finite"),
    (jnp.array([True]), TypeError, "integer or float"),
    (np.array(["a", "b"]), TypeError, "integer or float"),
    ({}, ValueError, "empty structure"),
    (np.array([2**40]), ValueError, "int32"),
])
def test_bad_conditions_are_named(bad, error, match):
  with pytest.raises(error, match=rf"^conditions: .*{match}"):
    conditions.check("conditions", bad)


def test_the_null_condition_must_match_one_condition():
  c = {"u": jnp.zeros((3, 2)), "id": jnp.array([1, 2, 3])}
  with pytest.raises(ValueError, match="^null: classifier-free"):
    conditions.check_null("null", None, c)
  with pytest.raises(ValueError, match="^null: must have the structure"):
    conditions.check_null("null", {"u": jnp.zeros(2)}, c)
  with pytest.raises(ValueError, match=r"^null: a leaf has shape \(3,\)"):
    conditions.check_null("null", {"u": jnp.zeros(3), "id": 0}, c)
  with pytest.raises(ValueError, match="^null: a leaf has dtype"):
    conditions.check_null("null", {"u": jnp.zeros(2), "id": 0.5}, c)
