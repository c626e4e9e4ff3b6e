"""The DDIM sampler on a linear-Gaussian model, where everything is exact.

Data of condition c is N(m_c, s_c^2 I). The optimal noise predictor is linear,
eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) m_c) / (abar_t s_c^2 + 1 - abar_t), so each DDIM
step is x_t' = A_i x_t + B_i m_c + sigma_i z and the sampler's marginal is the Gaussian of a scalar
recursion (mean' = A mean + B m, var' = A^2 var + sigma^2), computed here in float64 from the
paper's formulas, with Cov(x_T, x_0) = prod_i A_i. The sampler must match them within standard
errors (the covariance matters: it depends on eta, which the marginals barely do). That chain is
not exactly the data distribution: each step plugs in the posterior mean of x_0 and drops its
posterior variance, a first-order discretisation error that the recursion measures (the variance is
7-21% low at S = 50 and 0.4-1.5% at S = 999 for these s_c and eta, roughly halving when S doubles)
and that is checked to vanish like 1/S.
Also: log-probs recomputed under the sampling parameters, classifier-free guidance, jit, minibatches,
and the score-function gradient of E[sum x_0] through `trajectory_log_probs` against its exact value.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.diffusion.losses import loop_advantages, ppo_loss, reinforce_loss
from saferl_jax.diffusion.sampler import (Trajectory, generate, sample, select_samples, select_step,
                                          stepwise_value_and_grad, trajectory_log_probs,
                                          trajectory_transitions)
from saferl_jax.diffusion.schedules import linear_schedule, sampling_timesteps
from saferl_jax.diffusion.step import step_kl

T = 1000
SCHEDULE = linear_schedule(T)
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))  # float64, independent of the library
MEANS = np.array([[2.0, -1.0], [-0.5, 0.75], [0.0, 0.0]])  # m_c, [C, d]; 2 is the null condition
STDS = np.array([0.5, 1.5, 1.0])  # s_c
NULL = 2
D = MEANS.shape[1]


def optimal_eps(x, t, mean, std):
  a = SCHEDULE.alphas_cumprod[t][:, None]
  return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mean) / (a * jnp.square(std) + 1 - a)


def gaussian_apply_fn(params, x, t, c):
  """apply_fn for the model with params = (means [C, d], stds [C])."""
  means, stds = params
  return optimal_eps(x, t, means[c], stds[c][:, None])


PARAMS = (jnp.asarray(MEANS, jnp.float32), jnp.asarray(STDS, jnp.float32))


def exact_chain(num_steps, eta, m, s, *, with_cov=False):
  """Mean and variance (per dimension) of the discrete DDIM chain, float64, and d mean / d m;
  with_cov adds Cov(x_T, x_0) = prod_i A_i."""
  t, prev = (np.asarray(v) for v in sampling_timesteps(T, num_steps))
  mean, var, dmean_dm, cov = 0.0, 1.0, 0.0, 1.0
  for ti, pi in zip(t, prev):
    a, a_prev = ABAR[ti], ABAR[pi]
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)

    def mu(x, m_):
      eps = np.sqrt(1 - a) * (x - np.sqrt(a) * m_) / (a * s**2 + 1 - a)
      x0hat = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
      return np.sqrt(a_prev) * x0hat + np.sqrt(1 - a_prev - sigma**2) * eps

    A, B = mu(1.0, 0.0), mu(0.0, 1.0)
    mean, var, dmean_dm, cov = A * mean + B * m, A**2 * var + sigma**2, A * dmean_dm + B, A * cov
  return (mean, var, dmean_dm, cov) if with_cov else (mean, var, dmean_dm)


def target(m, s):
  """The data distribution seen at the chain's last noise level alphabar_0."""
  return np.sqrt(ABAR[0]) * m, ABAR[0] * s**2 + 1 - ABAR[0]


def check_moments(x0, mean, var, k):
  """Sample mean and variance of k draws against (mean, var), within 4 standard errors."""
  x0 = np.asarray(x0, np.float64)
  assert abs(x0.mean() - mean) < 4 * np.sqrt(var / k), (x0.mean(), mean)
  assert abs(x0.var(ddof=1) - var) < 4 * var * np.sqrt(2 / (k - 1)), (x0.var(ddof=1), var)


K = 4000


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.slow
def test_marginal_matches_the_exact_discrete_chain(eta):
  traj = sample(gaussian_apply_fn, PARAMS, jnp.array([0, 1]), key=jax.random.key(0),
                schedule=SCHEDULE, num_steps=50, eta=eta, samples_per_condition=K, shape=(D,))
  for c in range(2):
    x0 = np.asarray(traj.x0[c * K:(c + 1) * K], np.float64)
    x_T = np.asarray(traj.states[0, c * K:(c + 1) * K], np.float64)
    for j in range(D):
      mean, var, _, cov = exact_chain(50, eta, MEANS[c, j], STDS[c], with_cov=True)
      check_moments(x0[:, j], mean, var, K)
      # How much of x_T survives into x_0 depends on eta (the marginals barely do): the covariance,
      # with the standard error of a Gaussian sample covariance.
      sample_cov = np.cov(x_T[:, j], x0[:, j])[0, 1]
      assert abs(sample_cov - cov) < 4 * np.sqrt((var + cov**2) / K), (sample_cov, cov)
  # The state x_T is N(0, I).
  check_moments(traj.states[0], 0.0, 1.0, traj.states[0].size)


@pytest.mark.slow
def test_generate_is_the_deterministic_chain():
  # eta = 0: x_0 is an affine function of x_T, whose mean and variance the recursion gives exactly.
  k = 4000
  x0 = generate(gaussian_apply_fn, PARAMS, jnp.array([0, 1]), key=jax.random.key(3),
                schedule=SCHEDULE, num_steps=50, samples_per_condition=k, shape=(D,))
  assert x0.shape == (2 * k, D)
  for c in range(2):
    for j in range(D):
      mean, var, _ = exact_chain(50, 0.0, MEANS[c, j], STDS[c])
      check_moments(x0[c * k:(c + 1) * k, j], mean, var, k)
  # Its only randomness is x_T: the same key gives the same samples.
  again = generate(gaussian_apply_fn, PARAMS, jnp.array([0, 1]), key=jax.random.key(3),
                   schedule=SCHEDULE, num_steps=50, samples_per_condition=k, shape=(D,))
  assert np.array_equal(np.asarray(x0), np.asarray(again))


@pytest.mark.slow
def test_conditions_of_any_structure():
  # The same model fed class ids, one-hot vectors or a dict holding both: the same trajectories,
  # with guidance by a null condition of the matching structure.
  one_hot = jnp.eye(3)

  def vector_apply_fn(params, x, t, c):
    means, stds = params
    return optimal_eps(x, t, c @ means, (c @ stds)[:, None])

  def dict_apply_fn(params, x, t, c):
    return vector_apply_fn(params, x, t, c["vector"]) + 0.0 * c["id"][:, None]

  common = dict(key=jax.random.key(5), schedule=SCHEDULE, num_steps=10, eta=1.0,
                samples_per_condition=3, shape=(D,), guidance_scale=1.5)
  by_id = sample(gaussian_apply_fn, PARAMS, jnp.array([0, 1]), null_condition=NULL, **common)
  by_vector = sample(vector_apply_fn, PARAMS, one_hot[:2], null_condition=one_hot[NULL], **common)
  by_dict = sample(dict_apply_fn, PARAMS, {"id": jnp.array([0, 1]), "vector": one_hot[:2]},
                   null_condition={"id": NULL, "vector": one_hot[NULL]}, **common)
  for other in (by_vector, by_dict):
    np.testing.assert_allclose(other.states, by_id.states, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other.log_probs, by_id.log_probs, rtol=1e-5, atol=1e-3)
  assert by_dict.conditions["vector"].shape == (6, 3)
  assert by_dict.conditions["id"].tolist() == [0, 0, 0, 1, 1, 1]
  sub = select_samples(by_dict, jnp.array([5, 0]))
  assert sub.conditions["id"].tolist() == [1, 0]
  recomputed = trajectory_log_probs(dict_apply_fn, PARAMS, by_dict, schedule=SCHEDULE, eta=1.0,
                                    guidance_scale=1.5, null_condition={"id": NULL,
                                                                        "vector": one_hot[NULL]})
  np.testing.assert_allclose(recomputed, by_dict.log_probs, rtol=1e-5, atol=1e-3)


def test_discrete_chain_converges_to_the_data_like_one_over_s():
  for c in range(2):
    for eta in (1.0, 0.5):
      m, s = MEANS[c, 0], STDS[c]
      gaps = {}
      for num_steps in (50, 200, 999):
        mean, var, _ = exact_chain(num_steps, eta, m, s)
        want_mean, want_var = target(m, s)
        gaps[num_steps] = abs(var / want_var - 1)
        # The mean is off only through x_T ~ N(0, 1) starting at t = 981 instead of at its exact
        # marginal (mean sqrt(abar_981) m ~ 0.008 m), an error the later steps damp.
        assert abs(mean - want_mean) < 0.008 * abs(m)
      assert gaps[50] < 0.25 and gaps[999] < 0.02
      # First order: 4 times the steps, about a quarter of the gap (the ratio is 3.1 to 3.5 here).
      assert gaps[50] / gaps[200] > 2.5


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.slow
def test_marginal_matches_the_data(eta):
  k, num_steps = 2000, 999
  traj = sample(gaussian_apply_fn, PARAMS, jnp.array([0, 1]), key=jax.random.key(1),
                schedule=SCHEDULE, num_steps=num_steps, eta=eta, samples_per_condition=k,
                shape=(D,))
  for c in range(2):
    x0 = np.asarray(traj.x0[c * k:(c + 1) * k], np.float64)
    for j in range(D):
      want_mean, want_var = target(MEANS[c, j], STDS[c])
      # Standard errors plus the discretisation gap that the exact chain measures (< 2%).
      _, chain_var, _ = exact_chain(num_steps, eta, MEANS[c, j], STDS[c])
      gap = abs(chain_var - want_var)
      assert gap < 0.02 * want_var
      assert abs(x0[:, j].mean() - want_mean) < 4 * np.sqrt(want_var / k) + 0.008 * abs(MEANS[c, j])
      assert abs(x0[:, j].var(ddof=1) - want_var) < 4 * want_var * np.sqrt(2 / (k - 1)) + gap


ETA = 0.7


@functools.cache
def small_trajectory(seed=2, reduce="sum"):
  """10 steps, 3 samples for each of conditions 1 and 0 (one compilation per reduction)."""
  return sample(gaussian_apply_fn, PARAMS, jnp.array([1, 0]), key=jax.random.key(seed),
                schedule=SCHEDULE, num_steps=10, eta=ETA, samples_per_condition=3, shape=(D,),
                reduce=reduce)


@pytest.mark.slow
def test_layout_and_determinism():
  traj = small_trajectory()
  assert isinstance(traj, Trajectory)
  assert traj.x0.shape == (6, D) and traj.states.shape == (11, 6, D) and traj.log_probs.shape == (10, 6)
  np.testing.assert_array_equal(traj.conditions, [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(traj.states[-1], traj.x0)
  steps = sampling_timesteps(T, 10)
  np.testing.assert_array_equal(traj.timesteps, steps.timesteps)
  np.testing.assert_array_equal(traj.previous_timesteps, steps.previous)
  again = small_trajectory.__wrapped__()  # a fresh call, not the cached one
  for a, b in zip(traj, again):
    np.testing.assert_array_equal(a, b)
  other = small_trajectory(3)
  assert not np.allclose(other.x0, traj.x0)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.slow
def test_log_probs_are_the_step_densities(reduce):
  # Each recorded log-prob against the Gaussian density of the stored transition, float64 numpy.
  traj = small_trajectory(reduce=reduce)
  states = np.asarray(traj.states, np.float64)
  for i in range(10):
    t, tp = int(traj.timesteps[i]), int(traj.previous_timesteps[i])
    a, a_prev = ABAR[t], ABAR[tp]
    m, s = MEANS[np.asarray(traj.conditions)], STDS[np.asarray(traj.conditions)][:, None]
    eps = np.sqrt(1 - a) * (states[i] - np.sqrt(a) * m) / (a * s**2 + 1 - a)
    x0hat = (states[i] - np.sqrt(1 - a) * eps) / np.sqrt(a)
    sigma = ETA * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
    mu = np.sqrt(a_prev) * x0hat + np.sqrt(1 - a_prev - sigma**2) * eps
    density = -0.5 * ((states[i + 1] - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
    expected = density.sum(1) if reduce == "sum" else density.mean(1)
    # float32 cancellation in 1 - abar_t / abar_t' at the last, small-sigma steps moves a log-density
    # by ~1e-2 (measured against float64 in docs/benchmarks.md); the other steps agree to ~1e-4.
    np.testing.assert_allclose(traj.log_probs[i], expected, rtol=1e-3, atol=2e-2)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.slow
def test_recomputed_log_probs_equal_the_sampled_ones(reduce):
  traj = small_trajectory(reduce=reduce)
  lp = trajectory_log_probs(gaussian_apply_fn, PARAMS, traj, schedule=SCHEDULE, eta=ETA, reduce=reduce)
  np.testing.assert_allclose(lp, traj.log_probs, rtol=1e-5, atol=1e-4)
  # Other parameters give other log-probs, and the KL between the two is >= 0 and 0 only at equality.
  shifted = (PARAMS[0] + 0.3, PARAMS[1])
  new = trajectory_transitions(gaussian_apply_fn, shifted, traj, schedule=SCHEDULE, eta=ETA, reduce=reduce)
  old = trajectory_transitions(gaussian_apply_fn, PARAMS, traj, schedule=SCHEDULE, eta=ETA, reduce=reduce)
  np.testing.assert_allclose(old.log_probs, lp)
  assert not np.allclose(new.log_probs, traj.log_probs, atol=1e-2)
  kl = jax.vmap(jax.vmap(functools.partial(step_kl, reduce=reduce), (0, 0, None)))
  assert np.all(kl(new.means, old.means, new.stds) > 0)
  np.testing.assert_allclose(kl(old.means, old.means, old.stds), 0.0, atol=1e-12)
  assert new.means.shape == (10, 6, D) and new.stds.shape == (10,)


@pytest.mark.slow
def test_minibatches_and_vmap_over_samples():
  traj = small_trajectory()
  index = jnp.array([4, 0, 2])
  sub = select_samples(traj, index)
  lp = trajectory_log_probs(gaussian_apply_fn, PARAMS, sub, schedule=SCHEDULE, eta=ETA)
  np.testing.assert_allclose(lp, traj.log_probs[:, index], rtol=1e-5, atol=1e-4)
  # The same with a slice, and one sample at a time (a loop) equals the whole batch.
  full = trajectory_log_probs(gaussian_apply_fn, PARAMS, traj, schedule=SCHEDULE, eta=ETA)
  for b in range(6):
    one = trajectory_log_probs(gaussian_apply_fn, PARAMS, select_samples(traj, slice(b, b + 1)),
                               schedule=SCHEDULE, eta=ETA)
    np.testing.assert_allclose(one[:, 0], full[:, b], rtol=1e-6)


@pytest.mark.slow
def test_jit_equals_eager():
  jitted = jax.jit(functools.partial(sample, gaussian_apply_fn),
                   static_argnames=("num_steps", "samples_per_condition", "shape"))
  a = jitted(PARAMS, jnp.array([1, 0]), key=jax.random.key(2), schedule=SCHEDULE, num_steps=10,
             eta=ETA, samples_per_condition=3, shape=(D,))
  b = small_trajectory()
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  lp_jit = jax.jit(lambda p, tr: trajectory_log_probs(gaussian_apply_fn, p, tr, schedule=SCHEDULE,
                                                      eta=ETA))(PARAMS, b)
  np.testing.assert_allclose(lp_jit, b.log_probs, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_classifier_free_guidance():
  w = 3.0

  def guided_by_hand(p, x, t, c):
    eps_uncond = gaussian_apply_fn(p, x, t, jnp.full_like(c, NULL))
    return eps_uncond + w * (gaussian_apply_fn(p, x, t, c) - eps_uncond)

  options = dict(key=jax.random.key(2), schedule=SCHEDULE, num_steps=10, eta=ETA,
                 samples_per_condition=3, shape=(D,))
  guided = sample(gaussian_apply_fn, PARAMS, jnp.array([1, 0]), guidance_scale=w,
                  null_condition=NULL, **options)
  by_hand = sample(guided_by_hand, PARAMS, jnp.array([1, 0]), **options)
  for x, y in zip(guided, by_hand):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  assert not np.allclose(small_trajectory().x0, guided.x0)
  # w = 1 is the conditional model (the same compilation: the scale is not static).
  unguided = sample(gaussian_apply_fn, PARAMS, jnp.array([1, 0]), guidance_scale=1.0,
                    null_condition=NULL, **options)
  np.testing.assert_allclose(unguided.x0, small_trajectory().x0, rtol=1e-5, atol=1e-5)
  lp = trajectory_log_probs(gaussian_apply_fn, PARAMS, guided, schedule=SCHEDULE, eta=ETA,
                            guidance_scale=w, null_condition=NULL)
  np.testing.assert_allclose(lp, guided.log_probs, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_score_function_gradient_through_recomputed_log_probs():
  # d E[sum_j x0_j] / d m_c[j] = sum_i (prod_{k > i} A_k) B_i from the exact chain. Estimate it with
  # REINFORCE and LOOP advantages from per-sample copies of the means (so one backward pass gives
  # each sample's score), through trajectory_log_probs.
  k, num_steps, eta = 20000, 10, 1.0
  conditions = jnp.array([0, 1])

  def per_sample_apply_fn(params, x, t, c):
    return optimal_eps(x, t, params, PARAMS[1][c][:, None])

  per_sample_means = jnp.repeat(PARAMS[0][:2], k, axis=0)  # [P * K, d]
  traj = sample(per_sample_apply_fn, per_sample_means, conditions, key=jax.random.key(7),
                schedule=SCHEDULE, num_steps=num_steps, eta=eta, samples_per_condition=k, shape=(D,))
  advantages = loop_advantages(jnp.sum(traj.x0, axis=1), samples_per_condition=k)

  def loss(means):
    lp = trajectory_log_probs(per_sample_apply_fn, means, traj, schedule=SCHEDULE, eta=eta)
    return reinforce_loss(lp, advantages)

  # grad of -(1/B) sum_b A_b log p_b w.r.t. sample b's copy is -(1/B) A_b score_b.
  per_sample = -2 * k * np.asarray(jax.grad(loss)(per_sample_means), np.float64)
  for c in range(2):
    _, _, exact = exact_chain(num_steps, eta, MEANS[c, 0], STDS[c])
    g = per_sample[c * k:(c + 1) * k]
    stderr = g.std(0, ddof=1) / np.sqrt(k)
    assert np.all(stderr < 0.1 * exact)  # enough samples to tell a wrong gradient
    np.testing.assert_array_less(np.abs(g.mean(0) - exact), 4 * stderr)


@pytest.mark.slow
def test_stepwise_gradient_equals_the_whole_trajectory_gradient():
  # PPO's clipped loss (averaged over steps) plus a KL to the sampling parameters: the sum of
  # per-step gradients must equal the gradient of the loss over all steps at once, with the
  # diagnostics stacked per step. Parameters moved off the sampling ones so that some ratios clip.
  num_steps = 8
  traj = sample(gaussian_apply_fn, PARAMS, jnp.array([0, 1]), key=jax.random.key(3),
                schedule=SCHEDULE, num_steps=num_steps, eta=1.0, samples_per_condition=6, shape=(D,))
  advantages = loop_advantages(traj.x0[:, 0], samples_per_condition=6)
  moved = (PARAMS[0] + 0.3, PARAMS[1] * 1.2)

  def loss(params, trajectory):
    new = trajectory_transitions(gaussian_apply_fn, params, trajectory, schedule=SCHEDULE, eta=1.0)
    old = trajectory_transitions(gaussian_apply_fn, PARAMS, trajectory, schedule=SCHEDULE, eta=1.0)
    kl = jax.vmap(jax.vmap(step_kl, (0, 0, None)))(new.means, old.means, new.stds)
    out = ppo_loss(new.log_probs, trajectory.log_probs, advantages, clip_range=0.2)
    return out.loss + 0.5 * jnp.mean(kl), out.clip_fraction

  whole_loss, whole_grads = jax.value_and_grad(lambda p: loss(p, traj)[0])(moved)
  (step_sum, clip_fractions), grads = stepwise_value_and_grad(
      lambda p, step: jax.tree_util.tree_map(lambda v: v / num_steps, loss(p, step)), moved, traj)
  assert clip_fractions.shape == (num_steps,)
  np.testing.assert_allclose(float(jnp.mean(clip_fractions)) * num_steps, float(loss(moved, traj)[1]),
                             rtol=1e-5)
  assert 0 < float(loss(moved, traj)[1]) < 1
  np.testing.assert_allclose(float(step_sum), float(whole_loss), rtol=1e-4)
  for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(whole_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(whole_grads[0])).max() > 1e-3  # a gradient to compare


@pytest.mark.slow
def test_select_step():
  traj = sample(gaussian_apply_fn, PARAMS, jnp.array([0]), key=jax.random.key(1), schedule=SCHEDULE,
                num_steps=5, eta=1.0, samples_per_condition=3, shape=(D,))
  one = jax.jit(select_step)(traj, 2)
  np.testing.assert_array_equal(one.states, traj.states[2:4])
  np.testing.assert_array_equal(one.log_probs, traj.log_probs[2:3])
  assert one.timesteps.tolist() == traj.timesteps[2:3].tolist()
  assert one.previous_timesteps.tolist() == traj.previous_timesteps[2:3].tolist()
  with pytest.raises(ValueError, match="^index: must be in"):
    select_step(traj, 5)


@pytest.mark.slow
def test_bad_arguments():
  base = dict(key=jax.random.key(0), schedule=SCHEDULE, num_steps=10, eta=1.0, shape=(D,))
  conditions = jnp.array([0, 1])

  def call(**changes):
    return sample(gaussian_apply_fn, PARAMS, changes.pop("conditions", conditions), **{**base, **changes})

  with pytest.raises(ValueError, match="^eta: must be > 0"):
    call(eta=0.0)
  with pytest.raises(ValueError, match="^eta:"):
    call(eta=-1.0)
  with pytest.raises(ValueError, match="^reduce:"):
    call(reduce="avg")
  with pytest.raises(ValueError, match="^num_steps:"):
    call(num_steps=T)
  with pytest.raises(ValueError, match="^num_steps:"):
    call(num_steps=10.0)
  with pytest.raises(ValueError, match="^samples_per_condition:"):
    call(samples_per_condition=0)
  with pytest.raises(ValueError, match="^shape:"):
    call(shape=(2, 0))
  # Conditions may be any pytree of arrays with one leading axis; these have none, or two sizes.
  with pytest.raises(ValueError, match="^conditions:"):
    call(conditions=jnp.array(0))
  with pytest.raises(ValueError, match="^conditions:"):
    call(conditions={"a": jnp.zeros(2, jnp.int32), "b": jnp.zeros((3, 4))})
  with pytest.raises(ValueError, match="^conditions:"):
    call(conditions=jnp.array([0.0, jnp.nan]))
  with pytest.raises(TypeError, match="^conditions:"):
    call(conditions=jnp.array([True, False]))
  with pytest.raises(ValueError, match="^null_condition:"):
    call(guidance_scale=2.0)
  with pytest.raises(ValueError, match="^null_condition:"):  # not shaped as one condition
    call(guidance_scale=2.0, null_condition=jnp.array([2]))
  with pytest.raises(ValueError, match="^null_condition:"):  # a float null for integer ids
    call(guidance_scale=2.0, null_condition=2.0)
  with pytest.raises(ValueError, match="^schedule:"):
    call(schedule=SCHEDULE._replace(alphas_cumprod=SCHEDULE.alphas_cumprod[::-1]))
  with pytest.raises(ValueError, match="^apply_fn:"):
    sample(lambda p, x, t, c: x[:, :1], None, conditions, **base)
  traj = small_trajectory()
  with pytest.raises(ValueError, match="^eta:"):
    trajectory_log_probs(gaussian_apply_fn, PARAMS, traj, schedule=SCHEDULE, eta=0.0)
  with pytest.raises(ValueError, match="^reduce:"):
    trajectory_log_probs(gaussian_apply_fn, PARAMS, traj, schedule=SCHEDULE, eta=ETA, reduce="x")
  with pytest.raises(ValueError, match="^trajectory:"):
    trajectory_log_probs(gaussian_apply_fn, PARAMS, traj._replace(log_probs=traj.log_probs[:, :2]),
                         schedule=SCHEDULE, eta=1.0)
  with pytest.raises(ValueError, match="^trajectory:"):
    trajectory_log_probs(gaussian_apply_fn, PARAMS, traj, schedule=linear_schedule(100), eta=1.0)


@pytest.mark.slow
def test_differentiable_sample_carries_the_gradient_of_its_last_k_steps():
  from saferl_jax.diffusion.sampler import differentiable_sample

  apply_fn = lambda p, x, t, c: p * x + 0.1 * p**2  # a toy predictor, nonlinear in p
  common = dict(key=jax.random.key(7), schedule=SCHEDULE, num_steps=6, eta=1.0,
                samples_per_condition=3, shape=(D,))
  traj = sample(apply_fn, 0.3, jnp.array([0, 1]), **common)
  same = differentiable_sample(apply_fn, 0.3, jnp.array([0, 1]), backprop_steps=2, **common)
  np.testing.assert_allclose(same.states, traj.states, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(same.log_probs, traj.log_probs, rtol=1e-6, atol=1e-4)

  def mean_x0(p, k):
    return jnp.mean(differentiable_sample(apply_fn, p, jnp.array([0, 1]), backprop_steps=k,
                                          **common).x0)
  # K = S: the gradient through the whole chain.
  whole = jax.grad(lambda p: jnp.mean(sample(apply_fn, p, jnp.array([0, 1]), **common).x0))(0.3)
  np.testing.assert_allclose(jax.grad(mean_x0)(0.3, 6), whole, rtol=1e-4)
  # K = 1: x_0 = mu_theta(x_1) + sigma z with x_1 a constant, so the gradient is the last mean's.
  last = select_step(traj, 5)
  one = jax.grad(lambda p: jnp.mean(trajectory_transitions(apply_fn, p, last, schedule=SCHEDULE,
                                                           eta=1.0).means))(0.3)
  np.testing.assert_allclose(jax.grad(mean_x0)(0.3, 1), one, rtol=1e-4)
  assert abs(float(one) - float(whole)) > 1e-3  # the two differ, so the test can tell them apart
  with pytest.raises(ValueError, match="^backprop_steps:"):
    mean_x0(0.3, 7)
