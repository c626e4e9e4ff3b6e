"""finetune(batch_devices=...): one run's B = P K samples split over 8 forced CPU devices equals the
unsharded run, and the batch arrays really are split.

Why the runs differ at all, and by how much they may: the sharded run adds its batch sums
(gradients, reward means) in another order, a relative change of about B eps per sum (B = 16
samples). Fine-tuning then amplifies it: a step's log-density moves by |x - mu| / sigma_t^2 per
unit change of its mean mu, about 1 / sigma_t relative to the mean's own scale, and the last DDPM
step of linear_schedule(100) in 8 steps has sigma_min = 0.0087. So the runs may differ by about
kappa eps relative, kappa = B / sigma_min ~ 1.8e3, i.e. 2.2e-4 in float32 (measured here: 90 eps
for loop, 420 eps for ppo). A sharding error (other noise on a shard, a gradient not reduced over
the batch devices) moves rewards and parameters by 1e-2 or more. The same comparison run in
float64 (not in this test, to keep it short) agreed to 1e-13 in every parameter but the class
embedding table, whose gradient the model rounds to float32 (it differed by one float32 ulp):
the float32 differences are rounding, not sharding.
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.models.denoisers import MLPDenoiser
from saferl_jax.models.functional import as_functional
from saferl_jax.training.finetuning import Sampling, finetune

SCRIPT = textwrap.dedent("""
    import json, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from saferl_jax.diffusion.sampler import sample, trajectory_transitions
    from saferl_jax.diffusion.schedules import linear_schedule
    from saferl_jax.models.denoisers import MLPDenoiser
    from saferl_jax.models.functional import as_functional
    from saferl_jax.training.finetuning import Sampling, finetune

    APPLY_FN, PARAMS = as_functional(MLPDenoiser(2, num_classes=2, hidden=(16, 16), rngs=nnx.Rngs(0)))
    SCHEDULE = linear_schedule(100)
    SAMPLING = Sampling(shape=(2,), num_classes=2, prompts_per_round=4, samples_per_prompt=4,
                        num_steps=8)
    OPTIMIZER = optax.adam(3e-4)  # approx KL ~ 1e-3 per round: inside PPO's trust region
    shardings = []  # (where, run, fully replicated, devices, spec) seen while compiling

    def record(where, run):
      def callback(sharding):
        shardings.append([where, run, sharding.is_fully_replicated, len(sharding.device_set),
                          str(sharding.spec)])
      return callback

    def inspected_apply(run):
      def apply_fn(params, x, t, c):
        jax.debug.inspect_array_sharding(x, callback=record("network input", run))
        return APPLY_FN(params, x, t, c)
      return apply_fn

    def inspected_tilt(run):
      def tilt(x0, conditions):
        jax.debug.inspect_array_sharding(x0, callback=record("reward input", run))
        return x0 @ jnp.array([1.0, 0.5], x0.dtype)
      return tilt

    def relative_difference(a, b):
      # The largest difference over each array's scale, the worst array of the tree.
      return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                       / max(float(np.max(np.abs(np.asarray(x, np.float64)))), 1e-30))
                 for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    def compare(method, seeds, batch_devices, dtype):
      params = jax.tree_util.tree_map(lambda x: jnp.stack([x.astype(dtype)] * seeds), PARAMS)
      key = jax.random.split(jax.random.key(0), seeds)
      results, seconds = {}, {}
      for devices in (None, batch_devices):
        run = f"{method}/{jnp.dtype(dtype).name}/{devices}"
        start = time.perf_counter()
        results[devices] = finetune(inspected_apply(run), params, inspected_tilt(run), key=key,
                                    method=method, rounds=3, eval_every=3, schedule=SCHEDULE,
                                    sampling=SAMPLING, optimizer=OPTIMIZER,
                                    batch_devices=devices)
        seconds[devices] = time.perf_counter() - start
      plain, sharded = results[None], results[batch_devices]
      history = {name: relative_difference(plain.history[name], sharded.history[name])
                 for name in plain.history}
      return {"params": relative_difference(plain.params, sharded.params), "history": history,
              "dtype": str(jax.tree_util.tree_leaves(sharded.params)[0].dtype),
              "reward": np.asarray(plain.history["reward"]).tolist(),
              "seconds": [seconds[None], seconds[batch_devices]]}

    def error(**options):
      try:
        finetune(APPLY_FN, PARAMS, inspected_tilt("error"), key=jax.random.key(0), rounds=1,
                 eval_every=1, schedule=SCHEDULE, optimizer=OPTIMIZER,
                 **{"method": "loop", "sampling": SAMPLING, **options})
      except (ValueError, TypeError) as caught:
        return f"{type(caught).__name__}: {caught}"
      return None

    trajectory = sample(lambda p, x, t, c: 0 * x, None, jnp.array([0]), key=jax.random.key(0),
                        schedule=SCHEDULE, num_steps=8, eta=1.0, shape=(2,))
    stds = trajectory_transitions(lambda p, x, t, c: 0 * x, None, trajectory, schedule=SCHEDULE,
                                  eta=1.0).stds
    result = {
        "devices": jax.device_count(),
        "sigma_min": float(jnp.min(stds)),
        # One seed, its batch over all 8 devices; two seeds over 2 x 4 (seeds x batch) devices.
        "loop": compare("loop", 1, "all", jnp.float32),
        "ppo": compare("ppo", 2, 4, jnp.float32),
    }
    result["errors"] = {
        "round": error(sampling=Sampling(shape=(2,), num_classes=2, prompts_per_round=3,
                                         samples_per_prompt=2, num_steps=8), batch_devices="all"),
        "minibatch": error(minibatches=4, batch_devices=8),
        "mesh": error(batch_devices=3),
        "word": error(batch_devices="many"),
        "type": error(batch_devices=2.0),
    }
    result["shardings"] = shardings
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def eight_devices(run_on_cpu_devices):
  return run_on_cpu_devices(SCRIPT)


def kappa(result) -> float:
  """The run's amplification of rounding (module docstring): B / sigma_min."""
  return 16 / result["sigma_min"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["loop", "ppo"])
def test_sharded_batch_equals_the_unsharded_run(eight_devices, case):
  result = eight_devices[case]
  assert eight_devices["devices"] == 8
  eps = float(jnp.finfo(result["dtype"]).eps)
  tolerance = kappa(eight_devices) * eps
  assert result["params"] <= tolerance, (result["params"], tolerance)
  for name, difference in result["history"].items():
    assert difference <= tolerance, (name, difference, tolerance)
  # Training happened: the rewards move (a run that changed nothing would compare equal trivially).
  assert np.ptp(np.asarray(result["reward"])) > 0.1


@pytest.mark.slow
def test_the_batch_arrays_really_are_split(eight_devices):
  by_run = {}
  for where, run, replicated, devices, spec in eight_devices["shardings"]:
    by_run.setdefault(run, set()).add((where, replicated, devices, spec))
  for run, seen in by_run.items():
    assert {where for where, *_ in seen} == {"network input", "reward input"}, run
    if run.endswith("/None"):  # unsharded: every device holds the whole batch
      assert all(replicated for _, replicated, *_ in seen), (run, seen)
    else:
      assert all(not replicated and devices == 8 and "batch" in spec
                 for _, replicated, devices, spec in seen), (run, seen)
  # The two-seed runs put the seeds on the mesh's other axis.
  assert any("seeds" in spec for _, run, _, _, spec in eight_devices["shardings"]
             if run.startswith("ppo/") and not run.endswith("/None"))


@pytest.mark.slow
def test_indivisible_batches_are_named(eight_devices):
  errors = eight_devices["errors"]
  assert errors["round"].startswith("ValueError: batch_devices: the B = P K samples of a round, 6")
  assert errors["minibatch"].startswith("ValueError: batch_devices: each minibatch")
  assert errors["mesh"].startswith("ValueError: batch_devices: must be >= 1 and divide the 8 devices")
  assert errors["word"].startswith("ValueError: batch_devices: must be None, an int or 'all'")
  assert errors["type"].startswith("TypeError: batch_devices: must be an int")


def test_one_device_refuses_a_split_it_cannot_make():
  apply_fn, params = as_functional(MLPDenoiser(2, num_classes=2, hidden=(4,), rngs=nnx.Rngs(0)))
  sampling = Sampling(shape=(2,), num_classes=2, prompts_per_round=2, samples_per_prompt=2, num_steps=2)
  with pytest.raises(ValueError, match=f"^batch_devices: must be >= 1 and divide the {jax.device_count()}"):
    finetune(apply_fn, params, lambda x, c: jnp.sum(x, -1), key=jax.random.key(0), method="loop",
             rounds=1, eval_every=1, schedule=linear_schedule(10), sampling=sampling,
             optimizer=optax.adam(1e-3), batch_devices=jax.device_count() + 1)
