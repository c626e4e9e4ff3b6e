"""map_over_seeds with batch_size: the same draws as the unbatched call, in bounded memory, sharded."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax import parallel
from saferl_jax.parallel import map_over_seeds


def _per_seed(key, scale, *, size):
  """A pytree of outputs of several ranks, from the key, a traced argument and a static option."""
  draws = jax.random.normal(key, (size, 3)) * scale
  return {"draws": draws, "total": jnp.sum(draws), "label": jax.random.randint(key, (), 0, 100)}


def _assert_trees_equal(want, got):
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("num_seeds, batch_size", [
    (12, 5), *(pytest.param(s, b, marks=pytest.mark.slow) for s, b in [(12, 4), (7, 1), (7, 3), (3, 10), (1, 1)])])
def test_batched_sweep_equals_the_unbatched_call_exactly(num_seeds, batch_size):
  # batch sizes that divide S, do not, are 1, and exceed S (the padded seeds are dropped)
  keys = jax.random.split(jax.random.key(0), num_seeds)
  want = map_over_seeds(_per_seed, keys, 2.0, size=5)
  got = map_over_seeds(_per_seed, keys, 2.0, size=5, batch_size=batch_size)
  _assert_trees_equal(want, got)
  # and each seed is fn of its own key: a batched sweep is not a reshuffle of the seeds
  np.testing.assert_array_equal(got["draws"][-1], _per_seed(keys[-1], 2.0, size=5)["draws"])


def test_batch_layout_is_balanced_and_bounded():
  # (S, devices, batch_size) -> (steps, seeds per device per step)
  assert parallel._batch_layout(1000, 1, 300) == (4, 250)  # 4 steps of 250, not 300 + ... + 100
  assert parallel._batch_layout(10, 1, 1000) == (1, 10)  # a batch never exceeds the seeds
  assert parallel._batch_layout(13, 8, 1) == (2, 1)  # 16 slots for 13 seeds on 8 devices
  for num_seeds in range(1, 40):
    for devices in (1, 2, 8):
      for batch_size in (1, 3, 7, 50):
        steps, per_step = parallel._batch_layout(num_seeds, devices, batch_size)
        padded = steps * devices * per_step
        assert per_step <= batch_size and num_seeds <= padded < num_seeds + devices * steps


@pytest.mark.slow
def test_batch_size_bounds_the_compiled_temporaries():
  # XLA's own accounting of the compiled sweep: with batch_size only batch_size seeds' [n, A]
  # intermediates are live at once, so the temporary buffers shrink by about S / batch_size.
  def gather_rows(key, table):
    rows = table[jax.random.randint(key, (2_000,), 0, table.shape[0])]  # [n, A] per seed
    return jnp.sum(jnp.cumsum(rows, axis=1) > 0.5)

  keys = jax.random.split(jax.random.key(0), 64)
  table = jax.random.uniform(jax.random.key(1), (50, 32))
  sharding = parallel.seed_sharding(64)

  def temp_bytes(batch_size):
    compiled = parallel._compiled(gather_rows, (), 1, sharding, batch_size)
    return compiled.lower(keys, table).compile().memory_analysis().temp_size_in_bytes

  full, batched = temp_bytes(None), temp_bytes(4)
  assert full >= 64 * 2_000 * 32 * 4  # at least one [S, n, A] float32 array
  assert batched * 8 < full


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_batch_size_raises_value_error_naming_it(bad):
  keys = jax.random.split(jax.random.key(0), 4)
  with pytest.raises(ValueError, match="batch_size"):
    map_over_seeds(_per_seed, keys, 1.0, size=2, batch_size=bad)


@pytest.mark.parametrize("bad", ["4", True])
def test_non_numeric_batch_size_raises_type_error_naming_it(bad):
  keys = jax.random.split(jax.random.key(0), 4)
  with pytest.raises(TypeError, match="batch_size"):
    map_over_seeds(_per_seed, keys, 1.0, size=2, batch_size=bad)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, re, jax, numpy as np
    from saferl_jax import parallel
    from saferl_jax.data import synthetic_bandit as sb
    problem = sb.make_problem(jax.random.key(3), num_actions=4, num_contexts=5)
    out = {"devices": jax.device_count()}
    for num_seeds, batch_size in ((32, 3), (13, 2)):
      keys = jax.random.split(jax.random.key(1), num_seeds)
      want = parallel.map_over_seeds(sb._simulate_log, keys, problem, n=32)
      got = parallel.map_over_seeds(sb._simulate_log, keys, problem, n=32, batch_size=batch_size)
      sharding = parallel.seed_sharding(num_seeds)
      hlo = parallel._compiled(sb._simulate_log, (("n", 32),), 1, sharding, batch_size).lower(
          jax.device_put(keys, sharding), problem).compile().as_text()
      out[str(num_seeds)] = {
          "equal": all(np.array_equal(a, b) for a, b in zip(want, got)),
          "shards": len(got.rewards.sharding.device_set),
          "same_sharding": got.rewards.sharding.is_equivalent_to(want.rewards.sharding, 1),
          "collectives": sorted(set(re.findall(r"all-gather|all-to-all|collective-permute", hlo))),
          # per-device shapes in the compiled loop: b seeds' [n] draws per step, not all S seeds'
          "per_device_rows": sorted({int(m) for m in re.findall(r"f32\\[(\\d+),32\\]", hlo)}),
      }
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_batched_sweep_is_sharded_over_eight_devices_and_equal(run_on_cpu_devices):
  result = run_on_cpu_devices(SHARDED_SCRIPT)
  assert result["devices"] == 8
  # 32 seeds, batch 3 on 8 devices: 2 steps of 2 seeds per device, each device its own 4 seeds,
  # the output sharded as the unbatched one and no data moved between devices.
  assert result["32"] == {"equal": True, "shards": 8, "same_sharding": True, "collectives": [],
                          "per_device_rows": [2, 4]}
  # 13 seeds (8 does not divide it): padded to 16 and sharded while computing (2 rows per device
  # in the loop), the output replicated as the unbatched call's is (gathered: [16] and [13] rows).
  assert result["13"]["equal"] and result["13"]["same_sharding"]
  assert result["13"]["per_device_rows"] == [2, 13, 16]
