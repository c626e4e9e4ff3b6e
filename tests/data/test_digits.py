"""The bundled 8x8 digits: scaling to [-1, 1], shapes and classes, and stratified splits."""

import jax
import numpy as np
import pytest
from sklearn import datasets

from saferl_jax.data import digits


@pytest.fixture(scope="module")
def data():
  return digits.load_digits()


def test_shapes_dtypes_and_range(data):
  assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.float32
  assert data.labels.shape == (1797,) and data.labels.dtype == np.int32
  assert data.num_images == 1797
  assert float(data.images.min()) == -1.0 and float(data.images.max()) == 1.0


def test_scaling_matches_scikit_learn(data):
  raw = datasets.load_digits()
  np.testing.assert_allclose(np.asarray(data.images)[..., 0], raw.images / 8.0 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(data.labels), raw.target)
  # Every class is present with its scikit-learn count (174 to 183 images each).
  counts = np.bincount(np.asarray(data.labels), minlength=10)
  assert counts.sum() == 1797 and counts.min() == 174 and counts.max() == 183


def _rows(part):
  """Each image with its label as one hashable row, for multiset comparisons."""
  images = np.asarray(part.images).reshape(part.num_images, -1)
  return sorted(map(tuple, np.concatenate([images, np.asarray(part.labels)[:, None]], axis=1)))


@pytest.mark.slow
def test_split_partitions_and_stratifies(data):
  train, test = digits.split(data, (0.8, 0.2), key=jax.random.key(0))
  assert train.num_images + test.num_images == 1797
  assert sorted(_rows(train) + _rows(test)) == _rows(data)
  counts = np.bincount(np.asarray(data.labels), minlength=10)
  np.testing.assert_array_equal(np.bincount(np.asarray(test.labels), minlength=10),
                                np.round(0.2 * counts).astype(int))


@pytest.mark.slow
def test_split_is_deterministic_and_depends_on_the_key(data):
  a, _ = digits.split(data, key=jax.random.key(3))
  b, _ = digits.split(data, key=jax.random.key(3))
  c, _ = digits.split(data, key=jax.random.key(4))
  np.testing.assert_array_equal(a.images, b.images)
  assert not np.array_equal(np.asarray(a.labels), np.asarray(c.labels))


@pytest.mark.slow
def test_three_way_split_sizes(data):
  parts = digits.split(data, (0.6, 0.2, 0.2), key=jax.random.key(0))
  assert [p.num_images for p in parts] == [1078, 360, 359]


@pytest.mark.parametrize("fractions", [(0.5, 0.6), (1.2, -0.2), (), (float("nan"), 1.0)])
def test_split_rejects_bad_fractions(data, fractions):
  with pytest.raises(ValueError, match="fractions:"):
    digits.split(data, fractions, key=jax.random.key(0))
