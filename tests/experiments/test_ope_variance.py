"""The ope-variance study: result schema, the claim's bookkeeping, resuming from a checkpoint."""

import json

import jax
import numpy as np
import pytest

from saferl_jax.experiments import ope_variance

TINY = ope_variance.Config(logger_inverse_temperatures=(-1.0, 1.0), num_actions=(5,),
                           sample_sizes=(50, 200), num_seeds=16, num_contexts=50)


@pytest.mark.slow
def test_results_file_has_the_documented_schema(tmp_path):
  ope_variance.run(tmp_path, TINY)
  results = json.loads((tmp_path / "results.json").read_text())
  assert len(results["settings"]) == 2
  for setting in results["settings"]:
    assert setting["n"] == [50, 200]
    assert {"logger_inverse_temperature", "num_actions", "true_value", "estimators"} <= set(setting)
    for name in ("ips", "snips", "dm", "dr", "sndr", "switch_dr", "dr_os", "beta_ips"):
      stats = setting["estimators"][name]
      assert len(stats["mse"]) == 2
      # MSE = bias^2 + variance (population variance over seeds).
      np.testing.assert_allclose(stats["mse"], np.square(stats["bias"]) + np.asarray(stats["variance"]),
                                 rtol=1e-6)
  claim = results["claims"]["beta_ips_lowest_mse"]
  # The claim's count, recomputed from the MSEs in the file: beta*-IPS within 5% of the best of
  # IPS, SNIPS and beta*-IPS, per (setting, n) cell.
  held = sum(int(np.sum(np.asarray(s["estimators"]["beta_ips"]["mse"]) <= 1.05 * np.min(
      [s["estimators"][e]["mse"] for e in ("ips", "snips", "beta_ips")], axis=0))) for s in results["settings"])
  assert claim["cells"] == 4 and claim["cells_where_it_holds"] == held
  assert claim["holds_in_most_cells"] == (held > 2)
  assert (tmp_path / "mse.png").stat().st_size > 0
  assert (tmp_path / "mse_beta0_-1_A5.png").exists()
  assert "MSE" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_an_interrupted_run_resumes_without_redoing_cells(tmp_path, monkeypatch):
  real_cell = ope_variance._cell
  calls = []

  def failing_after_two(*args):
    if len(calls) == 2:
      raise KeyboardInterrupt
    calls.append(args[1])
    return real_cell(*args)

  monkeypatch.setattr(ope_variance, "_cell", failing_after_two)
  with pytest.raises(KeyboardInterrupt):
    ope_variance.run(tmp_path, TINY)
  assert len(calls) == 2

  resumed = []
  monkeypatch.setattr(ope_variance, "_cell", lambda *a: resumed.append(a[1]) or real_cell(*a))
  results = ope_variance.run(tmp_path, TINY)
  assert len(resumed) == 2  # only the two cells that had not finished

  fresh = ope_variance.run(tmp_path / "fresh", TINY)
  assert results["settings"] == fresh["settings"]  # resuming loses nothing and changes nothing


@pytest.mark.slow
def test_a_checkpoint_from_another_config_is_not_reused(tmp_path, monkeypatch):
  ope_variance.run(tmp_path, TINY)
  calls = []
  real_cell = ope_variance._cell
  monkeypatch.setattr(ope_variance, "_cell", lambda *a: calls.append(1) or real_cell(*a))
  other = ope_variance.Config(**{**TINY.__dict__, "seed": 1})
  ope_variance.run(tmp_path, other)
  assert len(calls) == 4


@pytest.mark.slow
def test_cell_statistics_are_the_shared_scores_in_float64(monkeypatch):
  # _cell scores through ope.report.score_estimators; its numbers are the float64 formulas
  # the study always used (bias and MSE of the errors, population variance, SE of the MSE).
  from saferl_jax.data import synthetic_bandit as sb
  seen = []
  real = ope_variance.score_estimators
  monkeypatch.setattr(ope_variance, "score_estimators",
                      lambda values, truth: seen.append((np.asarray(values), truth)) or real(values, truth))
  problem = sb.make_problem(jax.random.key(3), num_actions=5, dim_context=5, num_contexts=50,
                            logger_inverse_temperature=-1.0, target_inverse_temperature=10.0,
                            reward_model_noise=0.1)
  cell = ope_variance._cell(problem, 50, 16, jax.random.key(0))
  (values, truth), = seen
  assert values.dtype == np.float64 and values.shape == (16, len(ope_variance.ESTIMATORS))
  for i, name in enumerate(ope_variance.ESTIMATORS):
    errors = values[:, i] - truth
    expected = {"bias": errors.mean(), "variance": values[:, i].var(), "mse": (errors**2).mean(),
                "mse_stderr": (errors**2).std(ddof=1) / np.sqrt(16)}
    for stat, want in expected.items():
      np.testing.assert_allclose(cell[name][stat], want, rtol=1e-12, err_msg=f"{name} {stat}")


@pytest.mark.slow
def test_estimates_per_seed_equal_the_gathered_inputs_path():
  # _estimates_for_seed reads the rounds from per-context arrays (sb.logged_rounds); the
  # estimators' values match the [n, A] route (ope.logged_rounds of estimator_inputs) to float32
  # rounding: only the dm sums over A are added in another order.
  from saferl_jax import ope
  from saferl_jax.data import synthetic_bandit as sb
  problem = sb.make_problem(jax.random.key(3), num_actions=5, num_contexts=50,
                            logger_inverse_temperature=-1.0)
  key = jax.random.key(7)
  got = ope_variance._estimates_for_seed(key, problem, 300)
  rounds = ope.logged_rounds(*sb.estimator_inputs(problem, sb.simulate_log(problem, key=key,
                                                                           num_rounds=300)))
  for name, options in ope_variance.ESTIMATORS.items():
    want = ope.FROM_ROUNDS["beta_ips" if name.startswith("beta_ips") else name](rounds, **options)
    np.testing.assert_allclose(got[name], want.value, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_cell_is_the_same_whatever_the_seed_batch(monkeypatch):
  # The cell's seeds run in batches of MAX_ROWS_PER_BATCH // n seeds; the batching changes the
  # memory, never the numbers (3 batches of 6, one a padding seed, versus all 17 at once).
  from saferl_jax.data import synthetic_bandit as sb
  problem = sb.make_problem(jax.random.key(3), num_actions=5, num_contexts=50)
  monkeypatch.setattr(ope_variance, "MAX_ROWS_PER_BATCH", 17 * 40)
  whole = ope_variance._cell(problem, 40, 17, jax.random.key(0))
  monkeypatch.setattr(ope_variance, "MAX_ROWS_PER_BATCH", 6 * 40)
  assert ope_variance._cell(problem, 40, 17, jax.random.key(0)) == whole
