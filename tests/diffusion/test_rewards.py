"""Rewards: the digit classifier's held-out accuracy and cache, prompt alignment as a log-softmax,
the quality (nearest-image) distance, the host-side compressibility under jit and vmap, the tilt
(one direction or one per sample), and several rewards combined with weights."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.data import digits
from saferl_jax.diffusion import rewards
from saferl_jax.training import classifier as classifier_training


@pytest.fixture(scope="module")
def data():
  return digits.split(digits.load_digits(), (0.8, 0.2), key=jax.random.key(0))


@pytest.fixture(scope="module")
def classifier(data, tmp_path_factory):
  train, _ = data
  path = tmp_path_factory.mktemp("classifier") / "classifier"
  trained = classifier_training.train_classifier(train.images, train.labels, key=jax.random.key(1),
                                                 steps=500, checkpoint_path=path)
  return trained, path


@pytest.mark.slow
def test_classifier_held_out_accuracy(data, classifier):
  _, test = data
  trained, _ = classifier
  assert not trained.from_cache and trained.losses.shape == (500,)
  predictions = jnp.argmax(trained.apply_fn(trained.params, test.images), axis=-1)
  accuracy = float(jnp.mean(predictions == test.labels))
  assert accuracy > 0.95  # measured 0.986 on the 359 held-out digits


@pytest.mark.slow
def test_classifier_checkpoint(data, classifier, monkeypatch):
  train, _ = data
  trained, path = classifier
  with monkeypatch.context() as patch:
    patch.setattr(classifier_training.driver, "_compiled_chunk",
                  lambda *a, **k: pytest.fail("trained again"))
    again = classifier_training.train_classifier(train.images, train.labels, key=jax.random.key(1),
                                                 steps=500, checkpoint_path=path)
  assert again.from_cache
  for a, b in zip(jax.tree_util.tree_leaves(trained.params), jax.tree_util.tree_leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  for change, field in ((dict(steps=20), "num_steps"), (dict(learning_rate=1e-3), "learning_rate")):
    with pytest.raises(ValueError, match=field):
      classifier_training.train_classifier(train.images, train.labels, key=jax.random.key(1),
                                           checkpoint_path=path, **(dict(steps=500) | change))


@pytest.mark.slow
def test_train_classifier_checks(data):
  train, _ = data
  with pytest.raises(ValueError, match="steps:"):
    classifier_training.train_classifier(train.images, train.labels, key=jax.random.key(0), steps=0)
  with pytest.raises(ValueError, match="labels:"):
    classifier_training.train_classifier(train.images, train.labels + 1, key=jax.random.key(0), steps=5)
  with pytest.raises(ValueError, match="batch_size:"):
    classifier_training.train_classifier(train.images[:10], train.labels[:10], key=jax.random.key(0), steps=5)


@pytest.mark.slow
def test_prompt_alignment_is_the_log_softmax(data, classifier):
  _, test = data
  trained, _ = classifier
  x = test.images[:16]
  logits = np.asarray(trained.apply_fn(trained.params, x), np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - logits.max(1, keepdims=True)
  per_prompt = np.stack([rewards.prompt_alignment_reward(trained.apply_fn, trained.params, x,
                                                         jnp.full(16, c, jnp.int32)) for c in range(10)], 1)
  np.testing.assert_allclose(per_prompt, log_probs, atol=1e-4)
  np.testing.assert_allclose(np.exp(per_prompt).sum(1), 1.0, atol=1e-5)
  # The true labels are the likely prompts of real digits.
  true = rewards.prompt_alignment_reward(trained.apply_fn, trained.params, x, test.labels[:16])
  assert float(jnp.mean(true)) > np.log(0.9)
  jitted = jax.jit(rewards.prompt_alignment_reward, static_argnums=0)(trained.apply_fn, trained.params, x,
                                                                      test.labels[:16])
  np.testing.assert_allclose(jitted, true, atol=1e-5)
  with pytest.raises(ValueError, match="prompts:"):
    rewards.prompt_alignment_reward(trained.apply_fn, trained.params, x, jnp.full(16, 10, jnp.int32))
  with pytest.raises(ValueError, match="prompts:"):
    rewards.prompt_alignment_reward(trained.apply_fn, trained.params, x, jnp.zeros(3, jnp.int32))


@pytest.mark.slow
def test_quality_reward(data):
  train, test = data
  references = train.images
  # A training image scores 0; shifting every pixel of the first image by 0.05 (toward 0) scores -0.05
  # when that image stays the nearest (checked by brute force below).
  x = jnp.stack([references[3], references[0] * 0.95])
  value = rewards.quality_reward(x, references)
  distances = np.sqrt(((np.asarray(references) - np.asarray(x[1])) ** 2).reshape(len(references), -1).mean(1))
  np.testing.assert_allclose(value, [0.0, -distances.min()], atol=1e-4)
  # Held-out digits lie nearer the data than noise does.
  noise = jax.random.uniform(jax.random.key(0), (64, 8, 8, 1), minval=-1, maxval=1)
  digits_score = rewards.quality_reward(test.images[:64], references)
  noise_score = rewards.quality_reward(noise, references)
  assert float(digits_score.max()) < 0 and float(jnp.max(noise_score)) < float(jnp.min(digits_score))
  np.testing.assert_allclose(jax.jit(rewards.quality_reward)(noise, references), noise_score, atol=1e-5)
  with pytest.raises(ValueError, match="reference_images:"):
    rewards.quality_reward(noise, references[:, :4])


def _expected_compressibility(images):
  pixels = np.round((np.clip(np.asarray(images), -1, 1) + 1) * 127.5).astype(np.uint8)
  return np.array([-len(zlib.compress(p.tobytes(), 9, wbits=-15)) / p.size for p in pixels], np.float32)


@pytest.mark.slow
def test_compressibility_reward_eager_jit_and_vmap(data):
  _, test = data
  x = test.images[:12]
  eager = rewards.compressibility_reward(x)
  np.testing.assert_array_equal(eager, _expected_compressibility(x))
  np.testing.assert_array_equal(jax.jit(rewards.compressibility_reward)(x), eager)
  batches = x.reshape(3, 4, 8, 8, 1)
  looped = np.stack([rewards.compressibility_reward(b) for b in batches])
  np.testing.assert_array_equal(jax.vmap(rewards.compressibility_reward)(batches), looped)
  np.testing.assert_array_equal(jax.jit(jax.vmap(rewards.compressibility_reward))(batches), looped)
  np.testing.assert_array_equal(jax.vmap(jax.vmap(lambda b: rewards.compressibility_reward(b[None])[0]))(batches),
                                looped)


@pytest.mark.slow
def test_constant_images_compress_better_than_noise():
  constant = jnp.full((4, 8, 8, 1), 0.3)
  noise = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)
  constant_score = rewards.compressibility_reward(constant)
  noise_score = rewards.compressibility_reward(noise)
  np.testing.assert_allclose(constant_score, -6 / 64)  # 64 equal bytes: a 6-byte DEFLATE stream
  assert float(jnp.max(noise_score)) < -1.0  # incompressible: 64 bytes plus a stored block's header
  with pytest.raises(ValueError, match="level:"):
    rewards.compressibility_reward(constant, level=10)


@pytest.mark.slow
def test_tilt_reward():
  x = jax.random.normal(jax.random.key(0), (5, 3, 2))
  a = jnp.array([0.5, -2.0])
  expected = np.asarray(x)[..., 0] * 0.5 - 2.0 * np.asarray(x)[..., 1]
  np.testing.assert_allclose(rewards.tilt_reward(x, a), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(rewards.tilt_reward, in_axes=(0, None))(x, a), expected, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="direction:"):
    rewards.tilt_reward(x, jnp.ones(3))


def test_tilt_reward_per_sample_directions():
  x = jax.random.normal(jax.random.key(1), (6, 2))
  u = jax.random.normal(jax.random.key(2), (6, 2))
  expected = np.sum(np.asarray(x, np.float64) * np.asarray(u, np.float64), -1)
  # float32 products and one sum of 2 terms: a few ulps of |x| |u|.
  atol = 4 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(x)) * jnp.max(jnp.abs(u)))
  np.testing.assert_allclose(rewards.tilt_reward(x, u), expected, rtol=0, atol=atol)
  np.testing.assert_allclose(jax.jit(rewards.tilt_reward)(x, u), expected, rtol=0, atol=atol)
  np.testing.assert_allclose(jax.vmap(rewards.tilt_reward)(x, u), expected, rtol=0, atol=atol)
  with pytest.raises(ValueError, match="direction:"):
    rewards.tilt_reward(x, u[:3])


@pytest.mark.slow
def test_combine_rewards_closed_form_components_jit_and_vmap():
  # The many-prompt 2-D task's reward u . x, a penalty on |x|^2 that ignores the conditions, and the
  # host-side (pure_callback) compressibility of x read as a 1x2 image.
  tilt = lambda x0, u: rewards.tilt_reward(x0, u)
  norm = lambda x0, u: -jnp.sum(jnp.square(x0), -1)
  deflate = lambda x0, u: rewards.compressibility_reward(x0[:, None, :])
  x = jax.random.normal(jax.random.key(0), (5, 2))
  u = jax.random.normal(jax.random.key(1), (5, 2))
  parts = {"tilt": tilt(x, u), "norm": norm(x, u), "deflate": deflate(x, u)}
  combined = rewards.combine_rewards({"tilt": tilt, "norm": norm, "deflate": deflate},
                                     {"tilt": 2.0, "norm": 0.5, "deflate": -1.0})
  expected = 2.0 * parts["tilt"] + 0.5 * parts["norm"] - parts["deflate"]
  np.testing.assert_allclose(combined(x, u), expected, rtol=1e-6)
  out = combined.components(x, u)
  assert isinstance(out, rewards.RewardComponents) and list(out.by_name) == ["tilt", "norm", "deflate"]
  for name, value in parts.items():
    np.testing.assert_array_equal(out.by_name[name], value)  # unweighted
  np.testing.assert_array_equal(out.total, combined(x, u))
  # A sequence of rewards gets names reward_0, reward_1, ...; the same total.
  listed = rewards.combine_rewards([tilt, norm, deflate], [2.0, 0.5, -1.0])
  assert listed.names == ("reward_0", "reward_1", "reward_2")
  np.testing.assert_array_equal(listed(x, u), combined(x, u))
  # jit equals eager; vmap over seeds equals a loop.
  np.testing.assert_allclose(jax.jit(combined)(x, u), expected, rtol=1e-6)
  jitted = jax.jit(combined.components)(x, u)
  np.testing.assert_allclose(jitted.by_name["tilt"], parts["tilt"], rtol=1e-6)
  xs, us = jnp.stack([x, -x]), jnp.stack([u, 2 * u])
  looped = np.stack([combined(a, b) for a, b in zip(xs, us)])
  np.testing.assert_allclose(jax.vmap(combined)(xs, us), looped, rtol=1e-6)


def test_combine_rewards_bad_arguments():
  one = lambda x0, c: x0[:, 0]
  with pytest.raises(ValueError, match="^weights:"):
    rewards.combine_rewards({"a": one}, {"b": 1.0})
  with pytest.raises(TypeError, match="^weights:"):
    rewards.combine_rewards({"a": one}, [1.0])
  with pytest.raises(ValueError, match="^weights:"):
    rewards.combine_rewards([one, one], [1.0])
  with pytest.raises(ValueError, match=r"^weights\['a'\]:"):
    rewards.combine_rewards({"a": one}, {"a": float("nan")})
  with pytest.raises(TypeError, match=r"^weights\['reward_0'\]:"):
    rewards.combine_rewards([one], ["1"])
  with pytest.raises(TypeError, match=r"^reward_fns\['a'\]:"):
    rewards.combine_rewards({"a": 3.0}, {"a": 1.0})
  with pytest.raises(ValueError, match="^reward_fns:"):
    rewards.combine_rewards([], [])
  with pytest.raises(TypeError, match="^reward_fns:"):
    rewards.combine_rewards(one, 1.0)
  # A reward that returns one value per batch, not per sample, is refused when called.
  wrong = rewards.combine_rewards({"mean": lambda x0, c: jnp.mean(x0)}, {"mean": 1.0})
  with pytest.raises(ValueError, match=r"^reward_fns\['mean'\]:"):
    wrong(jnp.ones((3, 2)), None)
