"""Why PRPO loses NDCG under adversarial clicks: how far its policy drifts, and what bounds it (floor 3).

The safe-CLTR experiment's setting (`cltr_safety.setup`) with maximally adversarial users at one
N: PRPO is trained for each (ranker, clip range, learning rate) and, every `eval_every` steps,
records the worst seed's test NDCG@5 and the share of displayed (query, document) pairs whose
exposure ratio omega / omega0 lies outside the clip range. The clip removes the gradient past the
range but adds no force back, so the share grows with steps and learning rate and the shared
ranker drags documents out of the range; `TrustRegionRanker` bounds the ratios by construction.

Run: python -m saferl_jax.experiments.prpo_drift OUT_DIR  (about 5 minutes on 2 CPU cores).
"""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from saferl_jax.cltr import adversarial, trust_bias
from saferl_jax.cltr.learning import RankingData
from saferl_jax.data.click_logs import estimated_rewards, simulate_click_log
from saferl_jax.experiments import cltr_safety
from saferl_jax.experiments.common import markdown_table, progress, write_json
from saferl_jax.models.rankers import TrustRegionRanker, trust_region_radius
from saferl_jax.ranking import exposure_from_samples, sample_rankings
from saferl_jax.training.ranker import train_ranker


@dataclasses.dataclass(frozen=True)
class Config:
  base: cltr_safety.Config = cltr_safety.QUICK
  num_sessions: int = 100_000
  rankers: tuple[str, ...] = ("linear", "mlp")
  clip_ranges: tuple[tuple[float, float], ...] = ((0.8, 1.2), (0.95, 1.05), (0.5, 2.0), (0.1, 10.0))
  learning_rates: tuple[float, ...] = (0.05, 0.005)
  steps: int = 300
  eval_every: int = 25
  exposure_samples: int = 2_000
  min_logging_exposure: float = 1e-3  # pairs the logger (almost) never shows are not counted
  trust_region: bool = True  # also PRPO inside the trust region (first clip range and lr)


def run(out: Path, config: Config = Config()) -> dict:
  out = Path(out)
  rows = {}
  for ranker in progress(config.rankers, "rankers"):
    base = dataclasses.replace(config.base, ranker=ranker, hidden=(32, 32))
    shared = cltr_safety.setup(base)
    train, k = shared.train, base.displayed
    seeds = base.num_seeds
    logs = [simulate_click_log(shared.logging_logits, train.labels, adversarial(trust_bias(k)),
                               key=jax.random.fold_in(jax.random.key(base.seed + 4), seed),
                               num_sessions=config.num_sessions, where=train.where,
                               assumed_model=trust_bias(k)) for seed in range(seeds)]
    rewards = jnp.stack([estimated_rewards(log, estimator="dr", features=train.features,
                                           where=train.where) for log in logs])
    data = RankingData(*(jnp.stack([x] * seeds) for x in (train.features, train.where)), rewards,
                       jnp.stack([log.session_counts for log in logs]),
                       jnp.stack([shared.logging_exposure] * seeds))
    shown = train.where & (shared.logging_exposure > config.min_logging_exposure)
    keys = jax.random.split(jax.random.key(base.seed + 5), seeds)
    region = TrustRegionRanker(shared.apply_fn, shared.logger, shared.apply_fn,
                               trust_region_radius(0.8, k=k))
    variants = [(clip, lr, False) for clip in config.clip_ranges for lr in config.learning_rates]
    if config.trust_region:
      variants.append((config.clip_ranges[0], config.learning_rates[0], True))
    for clip, learning_rate, trust_region in variants:
      apply = region.apply if trust_region else shared.apply_fn

      def evaluate(params, apply=apply, clip=clip):
        exposure = exposure_from_samples(
            sample_rankings(apply(params, train.features), key=jax.random.key(99), where=train.where,
                            sample_shape=config.exposure_samples, k=k),
            shared.rank_weights, train.features.shape[1], where=train.where)
        ratio = exposure / jnp.maximum(shared.logging_exposure, 1e-12)
        outside = shown & ((ratio < clip[0]) | (ratio > clip[1]))
        return {**shared.ndcg_of(apply)(params), "outside": jnp.sum(outside) / jnp.sum(shown)}

      # PRPO starts at the logger; inside the region, the inner ranker at a fresh initialisation.
      start = jax.tree_util.tree_map(lambda x: jnp.stack([x] * seeds),
                                     shared.init_params if trust_region else shared.logger)
      result = train_ranker(apply, start, data, key=keys, objective="prpo",
                            num_sessions=config.num_sessions, rank_weights=shared.rank_weights,
                            steps=config.steps, optimizer=cltr_safety._optimizer(learning_rate, 0.0),
                            num_samples=base.num_samples, clip_low=clip[0], clip_high=clip[1],
                            evaluate=evaluate, eval_every=config.eval_every)
      ndcg, outside = np.asarray(result.history["ndcg"]), np.asarray(result.history["outside"])
      name = f"{ranker} clip={list(clip)} lr={learning_rate}" + (" trust region" if trust_region else "")
      rows[name] = {"ranker": ranker, "clip_range": list(clip), "learning_rate": learning_rate,
                    "trust_region": trust_region, "logging_ndcg": shared.logging_ndcg,
                    "steps": list(range(0, config.steps + 1, config.eval_every)),
                    "worst_seed_ndcg": ndcg.min(axis=1).tolist(),
                    "mean_outside": outside.mean(axis=1).tolist(),
                    "worst_drop": shared.logging_ndcg - float(ndcg.min())}
  results = {"config": dataclasses.asdict(config), "runs": rows}
  write_json(out / "results.json", results)
  (out / "summary.md").write_text(summary(results))
  return results


def summary(results: dict) -> str:
  headers = ["ranker", "clip range", "lr", "logger", "worst seed, end", "worst drop (any step)",
             "share outside range, start -> end"]
  table = [[r["ranker"] + (" + trust region" if r["trust_region"] else ""), str(r["clip_range"]),
            str(r["learning_rate"]), f"{r['logging_ndcg']:.3f}", f"{r['worst_seed_ndcg'][-1]:.3f}",
            f"{r['worst_drop']:+.3f}",
            f"{r['mean_outside'][0]:.2f} -> {r['mean_outside'][-1]:.2f}"]
           for r in results["runs"].values()]
  return ("## PRPO under adversarial clicks: drift against steps\n\n"
          + markdown_table(headers, table) + "\n")


if __name__ == "__main__":
  print(summary(run(Path(sys.argv[1]))))
