"""Reward fine-tuning loops: they raise the reward, the KL term holds the model back, resuming is exact."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from saferl_jax.models.denoisers import MLPDenoiser
from saferl_jax.training import driver
from saferl_jax.training.finetuning import METHODS, Sampling, finetune
from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.models.functional import as_functional



@functools.cache
def _denoiser():
  """(apply_fn, params), built on first use, not when xdist's workers import the file."""
  return as_functional(MLPDenoiser(2, num_classes=2, hidden=(16, 16), rngs=nnx.Rngs(0)))


def apply_fn(params, *inputs):
  return _denoiser()[0](params, *inputs)


def initial_params():
  return _denoiser()[1]


SCHEDULE = linear_schedule(100)
SAMPLING = Sampling(shape=(2,), num_classes=2, prompts_per_round=4, samples_per_prompt=4, num_steps=8)
OPTIMIZER = optax.adam(3e-3)


def tilt(x0, conditions):
  """a^T x: the reward of the 2-D task (the same direction for both prompts)."""
  del conditions
  return x0 @ jnp.array([1.0, 0.5])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_raises_the_reward(method):
  result = finetune(apply_fn, initial_params(), tilt, key=jax.random.key(0), method=method, rounds=30,
                    schedule=SCHEDULE, sampling=SAMPLING, optimizer=OPTIMIZER, eval_every=10)
  rewards = result.history["reward"]
  assert rewards.shape == (30,)
  first, last = rewards[:5], rewards[-5:]
  # The batch mean has a standard error of about 1 / sqrt(16); demand a gain of several.
  assert last.mean() - first.mean() > 1.0, (method, first, last)
  np.testing.assert_array_equal(result.history["reward_queries"], 16 * np.arange(1, 31))
  if method in ("reinforce", "draft"):  # one on-policy step per round: no ratio, nothing to report
    assert not np.any(result.history["approx_kl"]) and not np.any(result.history["clip_fraction"])
  else:
    # The round's first minibatch sees ratio 1 (KL 0); the later ones follow moved parameters,
    # so the round's mean KL is positive in every round.
    assert np.all(result.history["approx_kl"] > 0), result.history["approx_kl"]


@pytest.mark.slow
def test_the_clipped_methods_and_clip_ranges_share_one_compiled_round():
  """PPO, GRPO and LOOP with the same other options (and any clip range) run one compiled
  round: the method's advantages and the clip range are data. The runs still differ."""
  compiled = driver._compiled_chunk
  runs = {}
  for method, clip_range in (("ppo", 0.2), ("grpo", 0.1), ("loop", 0.3)):
    before = compiled.cache_info()
    runs[method] = finetune(apply_fn, initial_params(), tilt, key=jax.random.key(0), method=method,
                            rounds=2, schedule=SCHEDULE, sampling=SAMPLING, optimizer=OPTIMIZER,
                            clip_range=clip_range, eval_every=2).history["reward"]
    if method != "ppo":
      assert compiled.cache_info().misses == before.misses, method
  # The first round samples from the same parameters; the second follows each method's update.
  assert runs["ppo"][0] == runs["grpo"][0] == runs["loop"][0]
  assert len({runs[method][1] for method in runs}) == 3


@pytest.mark.slow
def test_a_black_box_reward_on_the_host_is_raised_for_every_seed():
  # The reward runs in numpy through jax.pure_callback: no gradient exists, only its values (as
  # compressibility_reward). Two seeds exercise the callback under the seed vmap.
  def host_tilt(x0):
    return (np.asarray(x0) @ np.array([1.0, 0.5])).astype(np.float32)

  def black_box(x0, conditions):
    del conditions
    shape = jax.ShapeDtypeStruct(x0.shape[:-1], jnp.float32)
    return jax.pure_callback(host_tilt, shape, x0, vmap_method="expand_dims")

  params = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), initial_params())
  result = finetune(apply_fn, params, black_box, key=jax.random.split(jax.random.key(3), 2),
                    method="loop", rounds=30, schedule=SCHEDULE, sampling=SAMPLING,
                    optimizer=OPTIMIZER, eval_every=10)
  rewards = result.history["reward"]  # [rounds, seeds]
  assert np.all(rewards[-5:].mean(0) - rewards[:5].mean(0) > 1.0), rewards


def distance_moved(kl_weight):
  result = finetune(apply_fn, initial_params(), tilt, key=jax.random.key(1), method="loop", rounds=10,
                    schedule=SCHEDULE, sampling=SAMPLING, optimizer=OPTIMIZER, kl_weight=kl_weight,
                    eval_every=10)
  return float(jnp.linalg.norm(ravel_pytree(result.params)[0] - ravel_pytree(initial_params())[0]))


@pytest.mark.slow
def test_normalized_advantages_make_the_update_invariant_to_the_reward_scale():
  # Under plain SGD the step is proportional to the advantages, so only normalised advantages
  # give the same run for rewards scaled by 10. (REINFORCE takes its advantages from the same line.)
  method = "loop"
  def run(scale, normalize):
    result = finetune(apply_fn, initial_params(), lambda x, c: scale * tilt(x, c), key=jax.random.key(2),
                      method=method, rounds=2, schedule=SCHEDULE, sampling=SAMPLING,
                      optimizer=optax.sgd(1e-3), normalize_advantages=normalize, eval_every=2)
    return ravel_pytree(result.params)[0]

  np.testing.assert_allclose(run(10.0, True), run(1.0, True), rtol=1e-4, atol=1e-6)
  assert not np.allclose(run(10.0, False), run(1.0, False), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_kl_term_keeps_the_model_near_the_reference():
  assert distance_moved(10.0) < 0.5 * distance_moved(0.0)


@pytest.mark.slow
def test_resume_after_an_interrupt_equals_the_uninterrupted_run(tmp_path, interrupt_checkpoints):
  options = dict(key=jax.random.split(jax.random.key(2), 2), method="ppo", rounds=6,
                 schedule=SCHEDULE, sampling=SAMPLING, optimizer=OPTIMIZER, eval_every=2,
                 evaluate=lambda p: {"norm": jnp.linalg.norm(ravel_pytree(p)[0])})
  params = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), initial_params())
  reference = finetune(apply_fn, params, tilt, **options)
  path = tmp_path / "run"
  interrupt_checkpoints.at = 4
  saved = interrupt_checkpoints.saved
  with pytest.raises(KeyboardInterrupt):
    finetune(apply_fn, params, tilt, checkpoint_path=path, **options)
  resumed = finetune(apply_fn, params, tilt, checkpoint_path=path, **options)
  assert saved == [2, 4, 6]
  np.testing.assert_array_equal(ravel_pytree(resumed.params)[0], ravel_pytree(reference.params)[0])
  for name in ("reward", "approx_kl", "clip_fraction", "norm"):
    np.testing.assert_array_equal(resumed.history[name], reference.history[name])
  assert resumed.history["reward"].shape == (6, 2)
  # Another reward (a changed constant in the closure: same name) or learning rate is refused.
  with pytest.raises(ValueError, match="reward"):
    finetune(apply_fn, params, lambda x0, c: 2 * tilt(x0, c), checkpoint_path=path, **options)
  with pytest.raises(ValueError, match="optimizer"):
    finetune(apply_fn, params, tilt, checkpoint_path=path, **(options | dict(optimizer=optax.adam(1e-7))))
  assert saved == [2, 4, 6]


def test_bad_options_are_named():
  options = dict(key=jax.random.key(0), schedule=SCHEDULE, sampling=SAMPLING, rounds=2, eval_every=2,
                 optimizer=OPTIMIZER)
  with pytest.raises(ValueError, match="method"):
    finetune(apply_fn, initial_params(), tilt, method="ddpo", **options)
  with pytest.raises(ValueError, match="rounds"):
    finetune(apply_fn, initial_params(), tilt, method="loop", **{**options, "rounds": 3})
  with pytest.raises(ValueError, match="minibatches"):
    finetune(apply_fn, initial_params(), tilt, method="loop", minibatches=3, **options)
  with pytest.raises(ValueError, match="samples_per_prompt"):
    finetune(apply_fn, initial_params(), tilt, method="loop",
             **{**options, "sampling": Sampling(shape=(2,), num_classes=2, prompts_per_round=4,
                                                samples_per_prompt=1)})
  with pytest.raises(ValueError, match="clip_range"):
    finetune(apply_fn, initial_params(), tilt, method="ppo", clip_range=0.0, **options)
  with pytest.raises(ValueError, match="^normalize_advantages: only reinforce and loop"):
    finetune(apply_fn, initial_params(), tilt, method="ppo", normalize_advantages=True, **options)
