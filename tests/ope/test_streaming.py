"""Streaming and round-sharded estimation (issue 16): equal to the in-memory estimators on the
concatenated log, masks, bounds, diagnostics, jit, bad chunks, and 8 forced CPU devices."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax import ope, parallel
from saferl_jax.data import synthetic_bandit as sb
from saferl_jax.ope import streaming as st
from saferl_jax.stats import bounds

NAMES = ("ips", "snips", "dm", "dr", "sndr", "switch_dr", "dr_os", "beta_ips", "sg_ips", "sg_dr")
OPTIONS = {"ips": {"clip": 3.0}, "switch_dr": {"tau": 5.0}, "dr_os": {"lambda_": 10.0},
           "sg_ips": {"lambda_": 0.1}, "sg_dr": {"lambda_": 0.1}}
# float32 rounding of a mean over 2e3-1e4 terms merged over a few chunks: 1e-5 relative is ~100 ulps.
RTOL = 1e-5


@pytest.fixture(scope="module")
def log_inputs():
  """A log of 2,003 rounds, A = 10, drawn with numpy (no simulator to compile): logging
  propensities of the logged actions from per-round Dirichlet rows, a Dirichlet target."""
  rng = np.random.default_rng(0)
  n, num_actions = 2003, 10
  logging = rng.dirichlet(np.ones(num_actions), size=n)
  actions = np.array([rng.choice(num_actions, p=row) for row in logging])
  inputs = (rng.binomial(1, 0.4, n).astype(np.float32), actions,
            logging[np.arange(n), actions].astype(np.float32),
            rng.dirichlet(np.ones(num_actions) * 0.5, size=n).astype(np.float32),
            rng.uniform(0.2, 0.6, (n, num_actions)).astype(np.float32))
  return sb.EstimatorInputs(*map(jnp.asarray, inputs))


def _chunks(inputs, cuts):
  return [dict(rewards=inputs.rewards[a:b], actions=inputs.actions[a:b],
               logging_probs=inputs.logging_probs[a:b], target_dist=inputs.target_dist[a:b],
               reward_hat=inputs.reward_hat[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.slow
def test_default_and_dr_streamed_estimates_equal_in_memory_ones(log_inputs):
  names = ("ips", "snips", "dr", "beta_ips")
  reference = ope.estimate_all(*log_inputs, estimators=names)
  out = st.estimate_streaming(_chunks(log_inputs, [0, 800, 1500, 2003]), estimators=names)
  for name in names:
    np.testing.assert_allclose(out[name].value, reference[name].value, rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(out[name].stderr, reference[name].stderr, rtol=RTOL, err_msg=name)


@pytest.mark.slow
def test_streamed_estimates_equal_in_memory_ones(log_inputs):
  reference = ope.estimate_all(*log_inputs, estimators=NAMES, options=OPTIONS)
  # uneven chunks, a 1-round one, and a last chunk shorter than the first (padded and masked)
  out = st.estimate_streaming(_chunks(log_inputs, [0, 800, 801, 1200, 1900, 2003]),
                              estimators=NAMES, options=OPTIONS)
  assert set(out) == set(NAMES)
  for name in NAMES:
    np.testing.assert_allclose(out[name].value, reference[name].value, rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(out[name].stderr, reference[name].stderr, rtol=RTOL, err_msg=name)
    assert out[name].per_sample is None


@pytest.mark.slow
def test_fixed_baseline_and_positions_stream_like_in_memory():
  rng = np.random.default_rng(0)
  n, num_actions, num_slots = 3001, 4, 3
  target = rng.dirichlet(np.ones(num_actions), size=(n, num_slots)).transpose(0, 2, 1)
  data = dict(rewards=rng.binomial(1, 0.3, n).astype(np.float32), actions=rng.integers(0, num_actions, n),
              logging_probs=rng.uniform(0.1, 0.9, n).astype(np.float32),
              target_dist=target.astype(np.float32), positions=rng.integers(0, num_slots, n))
  options = {"beta_ips": {"baseline": 0.25}}
  reference = ope.beta_ips(data["rewards"], data["actions"], data["logging_probs"],
                           data["target_dist"], baseline=0.25, positions=data["positions"])
  halves = [{k: v[:1500] for k, v in data.items()}, {k: v[1500:] for k, v in data.items()}]
  out = st.estimate_streaming(halves, estimators=("beta_ips",), options=options)["beta_ips"]
  np.testing.assert_allclose(out.value, reference.value, rtol=RTOL)
  np.testing.assert_allclose(out.stderr, reference.stderr, rtol=RTOL)


@pytest.mark.slow
def test_intervals_and_diagnostics_match_the_in_memory_bounds(log_inputs):
  stream = st.stream_estimators(("ips", "snips"), bounds=("normal", "t", "hoeffding", "bernstein"),
                        max_value=20.0, truncate=True, delta=0.1)
  state = stream.init()
  for chunk in _chunks(log_inputs, [0, 600, 2003]):
    state = stream.update(state, chunk)
  result = stream.finalize(state)
  per_sample = ope.ips(*log_inputs[:4]).per_sample
  for method in ("normal", "t", "hoeffding", "bernstein"):
    expected = bounds.confidence_interval(per_sample, delta=0.1, method=method, max_value=20.0,
                                          truncate=True)
    np.testing.assert_allclose(result.intervals["ips"][method], expected, rtol=RTOL, err_msg=method)
  assert set(result.intervals["snips"]) == {"normal", "t"}  # a ratio has no bounded contributions
  # Without truncation the bounds read the contributions' own column (checked to lie in range).
  untruncated = st.stream_estimators(("ips",), bounds=("bernstein",), max_value=1e4, delta=0.1)
  state = untruncated.update(untruncated.init(), _chunks(log_inputs, [0, 2003])[0])
  expected = bounds.confidence_interval(per_sample, delta=0.1, method="bernstein", max_value=1e4)
  np.testing.assert_allclose(untruncated.finalize(state).intervals["ips"]["bernstein"], expected,
                             rtol=RTOL)
  diagnostics = ope.weight_diagnostics(ope.logged_rounds(*log_inputs).weights)
  np.testing.assert_allclose(result.weight_diagnostics, diagnostics, rtol=RTOL)
  assert int(result.num_rounds) == 2003


@pytest.mark.slow
def test_where_masks_rounds_and_update_runs_under_jit(log_inputs):
  chunk = _chunks(log_inputs, [0, 64])[0]
  stream = st.stream_estimators(("snips", "dr"))
  where = jnp.arange(64) % 3 != 0
  masked = jax.jit(stream.update)(stream.init(), chunk, where=where)
  kept = stream.update(stream.init(), {k: v[np.asarray(where)] for k, v in chunk.items()})
  for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(kept)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6)
  finalized = jax.jit(stream.finalize)(masked).estimates["snips"]
  np.testing.assert_allclose(finalized.value, stream.finalize(kept).estimates["snips"].value, rtol=RTOL)


@pytest.mark.slow
def test_merge_is_the_moments_of_the_union():
  rng = np.random.default_rng(1)
  columns = (rng.normal(size=(50, 3)) * [1.0, 100.0, 0.01]).astype(np.float32)
  merged = st.merge(st._moments(jnp.asarray(columns[:7]), None), st._moments(jnp.asarray(columns[7:]), None))
  centred = columns - columns.mean(0)
  np.testing.assert_allclose(merged.means, columns.mean(0), rtol=1e-5)
  np.testing.assert_allclose(merged.comoments, centred.T @ centred, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(merged.maximum, columns.max(0))
  assert int(merged.num_rounds) == 50


def test_bad_chunks_and_options_name_the_problem(log_inputs):
  chunk = _chunks(log_inputs, [0, 10])[0]
  with pytest.raises(ValueError, match="logging_probs"):
    st.estimate_streaming([dict(chunk, logging_probs=jnp.zeros(10))], estimators=("ips",))
  with pytest.raises(ValueError, match="chunk: keys.*unknown \\['reward'\\]"):
    st.estimate_streaming([dict(chunk, reward=1)], estimators=("ips",))
  with pytest.raises(ValueError, match="cross_fit"):
    st.stream_estimators(("beta_ips",), options={"beta_ips": {"baseline": "cross_fit"}})
  with pytest.raises(ValueError, match="switch_dr needs 'tau'"):
    st.stream_estimators(("switch_dr",))
  with pytest.raises(ValueError, match="max_value"):
    st.stream_estimators(("ips",), bounds=("hoeffding",))
  # A short last chunk is padded on the host, so an int64 id past int32 is refused, not wrapped.
  host = {k: np.asarray(v) for k, v in chunk.items()}
  short = dict({k: v[:3] for k, v in host.items()}, actions=np.array([0, 1, 2**33]))
  with pytest.raises(ValueError, match="actions: values must fit in int32"):
    st.estimate_streaming([host, short], estimators=("ips",))
  with pytest.raises(ValueError, match="chunks: no rounds"):
    st.estimate_streaming([], estimators=("ips",))
  stream = st.stream_estimators(("ips",), bounds=("hoeffding",), max_value=0.5)
  with pytest.raises(ValueError, match="max_value: ips's per-round contributions span"):
    stream.finalize(stream.update(stream.init(), chunk))
  with pytest.raises(ValueError, match="where: must be a bool array"):
    stream.update(stream.init(), chunk, where=jnp.ones(3, bool))


SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from saferl_jax import ope, parallel
    from saferl_jax.data import synthetic_bandit as sb
    from saferl_jax.ope import streaming as st
    problem = sb.make_problem(jax.random.key(0), num_actions=10, num_contexts=100)
    inputs = sb.estimator_inputs(problem, sb.simulate_log(problem, key=jax.random.key(1), num_rounds=10_007))
    names = ("ips", "snips", "dr", "sndr", "beta_ips")
    reference = ope.estimate_all(*inputs, estimators=names)
    sharded = parallel.shard_rounds(dict(inputs._asdict()))
    stream = st.stream_estimators(names)
    state = jax.jit(stream.update)(stream.init(), sharded.data, where=sharded.where)
    out = stream.finalize(state).estimates
    print(json.dumps({
        "devices": len(jax.devices()),
        "shards": len(sharded.data["target_dist"].sharding.device_set),
        "padded": int(sharded.where.shape[0]), "rounds": int(state.num_rounds),
        "streamed": {k: [float(v.value), float(v.stderr)] for k, v in out.items()},
        "in_memory": {k: [float(reference[k].value), float(reference[k].stderr)] for k in names}}))
""")


@pytest.mark.slow
def test_rounds_sharded_over_8_devices_equal_one_device(run_on_cpu_devices):
  result = run_on_cpu_devices(SHARDED_SCRIPT)
  assert result["devices"] == 8 and result["shards"] == 8
  assert result["padded"] == 10_008 and result["rounds"] == 10_007  # one masked copy of the last round
  for name, expected in result["in_memory"].items():
    np.testing.assert_allclose(result["streamed"][name], expected, rtol=RTOL, err_msg=name)


def test_shard_rounds_pads_with_masked_copies_on_one_device():
  sharded = parallel.shard_rounds({"x": jnp.arange(5.0)}, mesh=None)
  size = -(-5 // jax.device_count()) * jax.device_count()
  assert sharded.data["x"].shape == (size,) and int(sharded.where.sum()) == 5
  with pytest.raises(ValueError, match="same number of rounds"):
    parallel.shard_rounds({"x": jnp.ones(3), "y": jnp.ones(4)})
