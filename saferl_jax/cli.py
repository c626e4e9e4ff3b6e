"""The `saferl-jax` command line (floor 3).

  saferl-jax demo [--out DIR] [--full]          every experiment, quick unless --full
  saferl-jax ope-variance [--quick] --out DIR   bias/variance/MSE study of the estimators
  saferl-jax obd --out DIR [--data ROOT] [--behavior-policy bts|random] [--campaign C]
                [--max-rounds N]                one OBD logger's click rate from the other's log
  saferl-jax opl [--quick] --out DIR            off-policy learning with baseline corrections
  saferl-jax cltr [--quick] --out DIR [--data PATH] [--protocol default|paper]
                                                safe counterfactual LTR from simulated clicks
                                                (paper: the authors' ranker, weights, schedule)
  saferl-jax loop [--quick] --out DIR           diffusion fine-tuning: REINFORCE, PPO, GRPO and LOOP,
                                                also with many prompts each seen once (LOOP's regime)
  saferl-jax constrained [--quick] --out DIR [--task T ...]
                                                constrained alignment: primal-dual fine-tuning,
                                                composition of models, constrained bandits
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from saferl_jax.experiments import (cltr_safety, constrained, loop_finetuning, obd_evaluation,
                                    ope_variance, opl_learning)


def _ope_variance(out: Path, quick: bool) -> str:
  results = ope_variance.run(out, ope_variance.QUICK if quick else ope_variance.FULL)
  return ope_variance.summary(results)


def _obd(out: Path, quick: bool) -> str:
  del quick  # The sample is small: quick and full are the same run.
  return obd_evaluation.summary(obd_evaluation.run(out))


def _opl(out: Path, quick: bool) -> str:
  return opl_learning.summary(opl_learning.run(out, opl_learning.QUICK if quick else opl_learning.FULL))


def _cltr(out: Path, quick: bool, data: Path | None = None, protocol: str = "default") -> str:
  config = cltr_safety.config_for(protocol, quick)
  return cltr_safety.summary(cltr_safety.run(out, config, data_path=data))


def _loop(out: Path, quick: bool, many_prompts_only: bool = False) -> str:
  config = loop_finetuning.QUICK if quick else loop_finetuning.FULL
  if many_prompts_only:
    return loop_finetuning.many_prompts_summary(
        loop_finetuning.run(out, config, many_prompts_only=True))
  return loop_finetuning.summary(loop_finetuning.run(out, config))


def _constrained(out: Path, quick: bool, tasks: tuple[str, ...] = constrained.TASKS) -> str:
  return constrained.summary(constrained.run(out, quick, tasks=tasks))


EXPERIMENTS = {"ope-variance": _ope_variance, "obd": _obd, "opl": _opl, "cltr": _cltr,
               "loop": _loop, "constrained": _constrained}


def demo(out: Path, quick: bool = True) -> None:
  """Runs every experiment into out/<name>/ and writes out/summary.md."""
  out.mkdir(parents=True, exist_ok=True)
  parts = [f"# saferl_jax demo ({'quick' if quick else 'full'} mode)\n"]
  for name, run in EXPERIMENTS.items():
    start = time.perf_counter()
    print(f"== {name}: writing {out / name}", flush=True)
    parts.append(run(out / name, quick))
    parts.append(f"_{name}: {time.perf_counter() - start:.0f} s; files in `{name}/`._\n")
  (out / "summary.md").write_text("\n".join(parts))
  print("\n".join(parts))
  print(f"Results, plots and summary in {out.resolve()}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="saferl-jax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  demo_parser = commands.add_parser("demo", help="run every experiment (quick mode by default)")
  demo_parser.add_argument("--out", type=Path, default=Path("results"))
  demo_parser.add_argument("--full", action="store_true", help="full-size runs (hours on a CPU)")
  variance = commands.add_parser("ope-variance", help="bias, variance and MSE of the OPE estimators")
  variance.add_argument("--quick", action="store_true")
  variance.add_argument("--out", type=Path, required=True)
  obd = commands.add_parser("obd", help="estimate one Open Bandit logger's value from the other's log")
  obd.add_argument("--out", type=Path, required=True)
  obd.add_argument("--data", type=Path, default=None,
                   help="an OBD download (ROOT/<policy>/<campaign>/<campaign>.csv); default: the "
                        "shipped sample")
  obd.add_argument("--behavior-policy", choices=("bts", "random"), default="bts",
                   help="the log to evaluate from; the target is the other logger")
  obd.add_argument("--campaign", choices=("all", "men", "women"), default="all")
  obd.add_argument("--max-rounds", type=int, default=None,
                   help="keep the first N rounds of each log (memory: 8 N A L bytes)")
  learning = commands.add_parser("opl", help="off-policy learning with baseline-corrected gradients")
  learning.add_argument("--quick", action="store_true")
  learning.add_argument("--out", type=Path, required=True)
  ranking = commands.add_parser("cltr", help="safe counterfactual learning to rank from clicks")
  ranking.add_argument("--quick", action="store_true")
  ranking.add_argument("--out", type=Path, required=True)
  ranking.add_argument("--data", type=Path, default=None,
                       help="a LETOR/SVMlight file (label qid:Q f:v ...) instead of synthetic data")
  ranking.add_argument("--protocol", choices=cltr_safety.PROTOCOLS, default="default",
                       help="paper: the safe-CLTR authors' protocol (MLP ranker from scratch, "
                       "alpha+beta exposure weights, delta 0.01, PRPO clip [0.1, 10], Adam 1e-3/1e-4 "
                       "with early stopping, a network DR model); see docs/results.md")
  finetuning = commands.add_parser(
      "loop", help="diffusion fine-tuning with REINFORCE, PPO, GRPO and LOOP (digits, 2-D mixture, "
      "and the many-prompt circle and digits x ink tasks)")
  finetuning.add_argument("--quick", action="store_true",
                          help="the small run of the demo (minutes); without it, the full run")
  finetuning.add_argument("--many-prompts-only", action="store_true",
                          help="only the many-prompt tasks (circle, digits x ink) and their sweep")
  finetuning.add_argument("--out", type=Path, required=True)
  constrained_parser = commands.add_parser(
      "constrained", help="constrained alignment: the 2-D task with exact multipliers, composition "
      "of diffusion models, digits with a quality constraint, bandits with a high-confidence "
      "constraint")
  constrained_parser.add_argument("--quick", action="store_true",
                                  help="the small run of the demo; without it, the full run")
  constrained_parser.add_argument("--out", type=Path, required=True)
  constrained_parser.add_argument("--task", action="append", choices=constrained.TASKS,
                                  help="run only this task (repeatable); default: all four")
  args = parser.parse_args(argv)
  # The training driver logs "resuming from step k of n" when a run picks up its checkpoint.
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("saferl-jax: %(message)s"))
  logger = logging.getLogger("saferl_jax")
  logger.setLevel(logging.INFO)
  if not logger.handlers:
    logger.addHandler(handler)

  if args.command == "demo":
    demo(args.out, quick=not args.full)
  elif args.command == "ope-variance":
    print(_ope_variance(args.out, args.quick))
  elif args.command == "obd":
    print(obd_evaluation.summary(obd_evaluation.run(
        args.out, root=args.data, behavior_policy=args.behavior_policy, campaign=args.campaign,
        max_rounds=args.max_rounds)))
  elif args.command == "opl":
    print(_opl(args.out, args.quick))
  elif args.command == "cltr":
    print(_cltr(args.out, args.quick, args.data, args.protocol))
  elif args.command == "loop":
    print(_loop(args.out, args.quick, args.many_prompts_only))
  elif args.command == "constrained":
    print(_constrained(args.out, args.quick, tuple(args.task or constrained.TASKS)))


if __name__ == "__main__":
  main()
