"""The command line: demo writes every experiment's results and a summary."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from saferl_jax import cli
from saferl_jax.experiments import (cltr_safety, loop_finetuning, obd_evaluation, opl_learning,
                                    ope_variance)

TINY = ope_variance.Config(logger_inverse_temperatures=(-1.0,), num_actions=(5,),
                           sample_sizes=(50, 100), num_seeds=8, num_contexts=20)
TINY_OPL = opl_learning.Config(num_actions=5, num_contexts=20, num_train=200, num_validation=100,
                               epochs=2, batch_size=100, banditnet_lambdas=(0.5,), num_seeds=2)

# The non-affine users, estimated bias and the paper protocol run in tests/experiments/test_cltr_safety.py.
TINY_CLTR = cltr_safety.Config(num_queries=40, max_docs=8, min_docs=4, num_features=4,
                               logger_fraction=0.1, logger_steps=10, sessions=(100, 1000), num_seeds=2, steps=10,
                               num_samples=4, eval_samples=8, click_models=("trust_bias", "adversarial"),
                               estimated_bias=(), methods=("ips", "dr", "safe_dr", "prpo"))
# The sweep runs at the circle task's learning rate, so its cells reuse that task's compiled round
# (the clip range is data).
TINY_LOOP = loop_finetuning.Config(train_steps=100, sampling_steps=4, channels=8, pretrain_steps=20,
                                   pretrain_batch=32, classifier_steps=20, prompts_per_round=2,
                                   samples_per_prompt=2, rounds=2, eval_every=2, minibatches=1,
                                   num_seeds=2, mixture_pretrain_steps=20, mixture_rounds=2,
                                   circle_hidden=(16, 16), circle_learning_rate=5e-4,
                                   circle_eval_prompts=3, circle_eval_samples=16, sweep_methods=("loop",),
                                   sweep_clip_ranges=(0.1, 0.3), sweep_learning_rates=(5e-4,),
                                   sweep_rounds=2)

@pytest.mark.slow
def test_demo_runs_every_experiment(tmp_path, monkeypatch):
  """demo runs every experiment in quick mode into out/<name>/ and gathers their summaries.

  The loop experiment runs for real (at the TINY size): nothing else runs it. The others are
  recorded instead: each runs through its own command in this file or in tests/experiments/
  (ope-variance, opl and cltr above; obd in test_obd_evaluation.py; constrained in
  test_constrained_bandit.py), at the same sizes as the demo would run them here.
  """
  monkeypatch.setattr(loop_finetuning, "QUICK", TINY_LOOP)
  calls = []

  def recorded(name):
    def run(out, quick):
      calls.append((name, out, quick))
      return f"summary of {name}"
    return run
  for name in cli.EXPERIMENTS:
    if name != "loop":
      monkeypatch.setitem(cli.EXPERIMENTS, name, recorded(name))
  cli.main(["demo", "--out", str(tmp_path)])
  assert calls == [(name, tmp_path / name, True) for name in cli.EXPERIMENTS if name != "loop"]
  summary = (tmp_path / "summary.md").read_text()
  assert "quick mode" in summary and "Diffusion fine-tuning" in summary
  for name in cli.EXPERIMENTS:
    assert name == "loop" or f"summary of {name}" in summary
    assert f"_{name}: " in summary
  # The loop experiment's results follow issue 5's schema (checked here: it is slow to run twice).
  loop = json.loads((tmp_path / "loop" / "results.json").read_text())
  assert loop["task"] == "digits" and np.isfinite(loop["initial_reward"])
  for method in ("reinforce", "ppo", "loop"):
    curve = loop["methods"][method]
    assert curve["reward_queries"] == [4, 8]
    assert len(curve["reward_mean"]) == len(curve["reward_ci"]) == 2
  margin = loop["claims"]["loop_minus_other_last_rounds"]["ppo"]
  per_seed = {m: np.array(loop["methods"][m]["last_rounds_reward_per_seed"]) for m in ("ppo", "loop")}
  assert per_seed["loop"].shape == (2,)
  np.testing.assert_allclose(margin["mean"], np.mean(per_seed["loop"] - per_seed["ppo"]), rtol=1e-6)
  assert margin["ci"][0] <= margin["mean"] <= margin["ci"][1]
  assert set(loop["mixture2d"]["methods"]) == {"reinforce", "ppo", "loop"}
  for name in ("loop.png", "digits_samples.png"):
    assert (tmp_path / "loop" / name).exists()
  _check_many_prompts(loop, TINY_LOOP, tmp_path / "loop")


def _all_finite(tree) -> bool:
  return bool(np.all(np.isfinite(np.asarray(jax.tree_util.tree_leaves(tree), float))))


def _check_many_prompts(results: dict, config, out) -> None:
  """The loop experiment's many-prompt results (issue 13): both tasks, every method, one entry per
  round (per evaluation for the distance), finite values, and the sweep."""
  assert set(results["many_prompts"]) == {"circle", "digits_ink"}
  batch = config.prompts_per_round * config.samples_per_prompt
  for name, rounds in (("circle", config.mixture_rounds), ("digits_ink", config.rounds)):
    task = results["many_prompts"][name]
    assert np.isfinite(task["initial_reward"])
    assert set(task["methods"]) == {"reinforce", "ppo", "grpo", "loop"}
    for curve in task["methods"].values():
      assert curve["reward_queries"] == [batch * (r + 1) for r in range(rounds)]
      assert len(curve["reward_mean"]) == len(curve["reward_ci"]) == len(curve["approx_kl"]) == rounds
      assert all(lo <= mean <= hi for (lo, hi), mean in zip(curve["reward_ci"], curve["reward_mean"]))
      assert len(curve["last_rounds_reward_per_seed"]) == config.num_seeds
      assert ("distance_to_optimum" in curve) == (name == "circle")
      if name == "circle":
        assert len(curve["distance_to_optimum"]) == rounds // config.eval_every + 1
        assert all(d >= -0.05 for d in curve["distance_to_optimum"])  # an unbiased MMD^2 estimate
      assert _all_finite([curve[k] for k in curve if k != "initial_eval"])
    assert task["methods"]["reinforce"]["approx_kl"] == [0.0] * rounds  # on-policy: no ratio
  sweep = results["many_prompts_sweep"]
  assert sweep["clip_ranges"] == [0.1, 0.3] and sweep["learning_rates"] == [5e-4]
  for table in sweep["methods"].values():
    for field in ("last_rounds_reward", "approx_kl", "clip_fraction", "distance_to_optimum"):
      assert np.shape(table[field]) == (1, 2) and _all_finite(table[field])
  assert (out / "many_prompts.png").exists()
  assert "Many prompts" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_ope_variance_command(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(ope_variance, "QUICK", TINY)
  cli.main(["ope-variance", "--quick", "--out", str(tmp_path)])
  assert "MSE" in capsys.readouterr().out
  assert (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_opl_command(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(opl_learning, "QUICK", TINY_OPL)
  cli.main(["opl", "--quick", "--out", str(tmp_path)])
  assert "Off-policy learning" in capsys.readouterr().out
  assert json.loads((tmp_path / "results.json").read_text())["methods"]


@pytest.mark.slow
def test_cltr_command_on_a_letor_file(tmp_path, monkeypatch, capsys):
  """--data reads an SVMlight file; results.json has the schema of issue 4."""
  monkeypatch.setattr(cltr_safety, "QUICK", TINY_CLTR)
  rng = np.random.default_rng(0)
  lines = [f"{rng.integers(0, 5)} qid:{q} " + " ".join(f"{j + 1}:{rng.normal():.3f}" for j in range(4))
           for q in range(30) for _ in range(rng.integers(3, 8))]
  path = tmp_path / "train.txt"
  path.write_text("\n".join(lines) + "\n")
  cli.main(["cltr", "--quick", "--out", str(tmp_path / "out"), "--data", str(path)])
  assert "Safe counterfactual LTR" in capsys.readouterr().out
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  assert 0 < results["logging_ndcg"] <= 1
  for model in ("trust_bias", "adversarial"):
    cell = results["click_models"][model]
    assert cell["num_sessions"] == [100, 1000]
    assert set(cell["methods"]) == {"ips", "dr", "safe_dr", "prpo"}
    for curve in cell["methods"].values():
      assert len(curve["ndcg_mean"]) == 2
      assert all(lo <= mean <= hi for (lo, hi), mean in zip(curve["ndcg_ci"], curve["ndcg_mean"]))
  assert (tmp_path / "out" / "cltr.png").exists()


def test_obd_command_passes_its_options_to_the_study(tmp_path, monkeypatch, capsys):
  """--data, --behavior-policy, --campaign and --max-rounds reach obd_evaluation.run (the study
  itself is tested in tests/experiments/test_obd_evaluation.py)."""
  calls = []
  monkeypatch.setattr(obd_evaluation, "run", lambda out, **options: calls.append((out, options)))
  monkeypatch.setattr(obd_evaluation, "summary", lambda results: "obd summary")
  cli.main(["obd", "--out", str(tmp_path), "--data", "/data/obd", "--behavior-policy", "random",
            "--campaign", "men", "--max-rounds", "1000"])
  assert calls == [(tmp_path, {"root": Path("/data/obd"), "behavior_policy": "random",
                               "campaign": "men", "max_rounds": 1000})]
  assert "obd summary" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    cli.main(["obd", "--out", str(tmp_path), "--campaign", "kids"])


def test_unknown_command_exits_with_usage():
  with pytest.raises(SystemExit):
    cli.main(["frobnicate"])
