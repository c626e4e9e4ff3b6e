"""Safe counterfactual learning to rank from clicks, after [SAFE] and [PRPO] (floor 3).

A logging policy (a Plackett-Luce ranker fitted on the labels of a few percent of the training
queries) shows top-5 lists to simulated users. From N logged sessions, six methods learn a ranker
(each seed a fresh click log):

  ips, dr     the plain IPS or DR value estimate (clipped propensities, 10 / sqrt(N))
  safe_ips,   [SAFE]'s objective: the estimate minus lam sqrt(d2 / N), d2 the exposure divergence
  safe_dr     from the logging policy
  prpo        [PRPO]'s clipped surrogate of exposure ratios, on DR rewards
  prpo_trust_region
              PRPO with the ranker's logits kept within a radius of the logger's
              (`models.TrustRegionRanker`): every exposure ratio, hence NDCG, stays >= 0.8 times
              the logger's whatever the clicks (our answer to PRPO's adversarial drop)

scored by expected NDCG@5 on held-out test queries (true labels), for N from 1e2 upward.

Users: trust bias (the affine model the estimators assume), its maximally adversarial flip, and
the cascade, DCM and DBN users that scan down and stop (`cltr.click_chains`), which no affine
model describes; the estimators are always told trust bias, or (the "_estimated_bias" entries)
the alpha, beta that EM fits to each seed's own log (`cltr.estimate_bias`).

Two protocols: "default" (this library's choices: a linear ranker starting at the logger, DCG
exposure weights, delta 0.05, clip [0.8, 1.2], full-batch Adam 0.05, ridge DR model) and "paper"
(`PAPER_FULL`: the authors' choices, each cited in a comment to the file it comes from).

Claims checked, on the worst seed: with few sessions safe DR and PRPO stay at or above the
logging policy while IPS/DR can fall below it; with many sessions safe DR clearly beats the
logging policy and approaches DR; under adversarial clicks PRPO stays safe; under non-affine
users, which methods stay at or above the logging policy.

References:
  [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with
  Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
  [PRPO] Gupta, Oosterhuis, de Rijke. Practical and Robust Safety Guarantees for Advanced
  Counterfactual Learning to Rank. CIKM 2024. https://arxiv.org/abs/2407.19943
"""

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax import stats
from saferl_jax.cltr import adversarial, cascade, dbn, dcm, estimate_bias, trust_bias
from saferl_jax.cltr.learning import RankingData, relevance_data
from saferl_jax.data import ltr
from saferl_jax.data.click_logs import (estimated_rewards, ips_regression_targets,
                                        simulate_click_log, with_click_model)
from saferl_jax.experiments.common import (Checkpoint, finish, markdown_table, plot_curve,
                                           progress, pyplot)
from saferl_jax.models.functional import as_functional
from saferl_jax.models.rankers import MLPRanker, TrustRegionRanker, trust_region_radius
from saferl_jax.ranking import (LinearRanker, dcg_rank_weights, expected_metric_from_samples,
                                exposure_from_samples, sample_rankings)
from saferl_jax.training.ranker import train_ranker
from saferl_jax.training.reward_network import ClickRegressionData, train_reward_network

# method -> (reward estimator, objective)
METHODS = {"ips": ("ips", "value"), "dr": ("dr", "value"), "safe_ips": ("ips", "safe"),
           "safe_dr": ("dr", "safe"), "prpo": ("dr", "prpo"), "prpo_trust_region": ("dr", "prpo")}
LABELS = {"ips": "IPS", "dr": "DR", "safe_ips": "safe IPS", "safe_dr": "safe DR", "prpo": "PRPO",
          "prpo_trust_region": "PRPO + trust region"}
# Users: the affine trust bias the estimators assume, its maximally adversarial flip, and three
# that scan down the list and stop (not affine: the estimators are still told trust bias).
CLICK_MODELS = ("trust_bias", "adversarial", "cascade", "dcm", "dbn")
PROTOCOLS = ("default", "paper")


@dataclasses.dataclass(frozen=True)
class Config:
  num_queries: int = 500          # synthetic queries, split 60/20/20 into train/validation/test
  max_docs: int = 20
  min_docs: int = 10
  num_features: int = 16
  displayed: int = 5              # K: the top-K shown to users, and NDCG@K
  logger_fraction: float = 0.03   # share of training queries whose labels fit the logging policy
  logger_steps: int = 100
  sessions: tuple[int, ...] = (100, 1_000, 10_000, 100_000)
  num_seeds: int = 3
  steps: int = 100
  learning_rate: float = 0.05
  num_samples: int = 16           # rankings per query and step for PL-Rank
  delta: float = 0.05
  clip_range: tuple[float, float] = (0.8, 1.2)
  eval_samples: int = 64
  seed: int = 0
  protocol: str = "default"
  click_models: tuple[str, ...] = CLICK_MODELS
  # Click models also run with alpha, beta estimated by EM from each seed's log (`estimate_bias`)
  # instead of the true trust-bias ones; recorded as "<name>_estimated_bias".
  estimated_bias: tuple[str, ...] = ("trust_bias", "cascade")
  methods: tuple[str, ...] = tuple(METHODS)
  trust_region_min_ratio: float = 0.8  # the exposure-ratio bound of "prpo_trust_region"
  ranker: str = "linear"           # "linear" or "mlp"
  hidden: tuple[int, ...] = (150, 75)
  start: str = "logger"            # the learned ranker starts at the logging policy, or "random"
  exposure_weights: str = "dcg"    # rank weights of exposures: DCG's, or "click_model" (alpha + beta)
  learning_rates: tuple[float, ...] = ()  # one per entry of `sessions` (else learning_rate)
  weight_decay: float = 0.0
  batch_queries: int | None = None  # queries per step (None: all)
  epochs: int | None = None        # given: steps = epochs x ceil(logged queries / batch_queries)
  patience: int | None = None      # early stopping on held-out logged queries, in epochs
  validation_fraction: float = 0.0  # share of logged training queries held out for it
  logger_learning_rate: float | None = None
  logger_epochs: int | None = None
  dr_model: str = "ridge"          # "ridge" (closed form) or "network" (MLP, counterfactual loss)
  dr_steps: int = 300
  gain: str = "exponential"        # NDCG's gains: 2^y - 1, or "linear" (y)
  drop_irrelevant_test_queries: bool = True


QUICK = Config()
FULL = Config(num_queries=5_000, sessions=(100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000),
              num_seeds=10, steps=300, num_samples=32, logger_steps=300)

# The authors' protocol, each choice from shashankg7/cikm-safeultr (commit f60ee84; C: below) or
# HarrieO/2022-doubly-robust-LTR (D:). Deviations are ours because of 2 CPU cores and synthetic
# data (no MSLR/Yahoo/Istella here): 1,000 synthetic queries, N up to 1e6 (they go to 1e9), 32
# rather than 1000 sampled rankings per query and step, a fixed number of logger epochs (they stop
# early on validation DCG), 100 full-batch steps for the DR network (they stop early), the
# affine users only (the non-affine users and estimated bias run in the default protocol) and
# their four methods (not safe IPS, nor our trust region): what 2 CPU cores run in half an hour.
PAPER_FULL = Config(
    num_queries=1_000,
    # C:src/utils/click_simulation.py:54-57 logspace(2, 9, 25); we take every decade up to 1e6.
    sessions=(100, 1_000, 10_000, 100_000, 1_000_000),
    num_seeds=10,                    # they run 5 repetitions (C:config/global_config.yaml:10)
    protocol="paper",
    logger_fraction=0.03,            # C:README "--fraction 0.03" (strong logger; 0.01 weak)
    ranker="mlp", hidden=(150, 75),  # C:src/models/nnmodel.py:117-127 DocScorer, config.yaml:9-11
    start="random",                  # C:src/utils/click_trainer.py:1000-1003: a fresh model
    exposure_weights="click_model",  # C:click_trainer.py:306-308: weights_per_rank = alpha + beta
    delta=0.01,                      # C:click_trainer.py:20 divergence_weight = 0.01
    clip_range=(0.1, 10.0),          # C:click_trainer.py:330-341 clip_val 0.1: ratios in [0.1, 10]
    # C:results/hp_dict_risk.json: 1e-3 for N = 1e2, 1e3 and 1e-4 from 1e4 on.
    learning_rates=(1e-3, 1e-3, 1e-4, 1e-4, 1e-4),
    weight_decay=1e-5,               # C:click_trainer.py:1023 Adam(weight_decay=1e-5)
    batch_queries=4,                 # C:config.yaml:13
    epochs=10, patience=3,           # C:click_trainer.py:993, 1028, 1069-1080
    validation_fraction=0.15,        # C:logging_policy.py:285 15% of logged queries
    num_samples=32,                  # C:config.yaml:20 uses 1000
    logger_learning_rate=1e-3, logger_epochs=10,  # C:config.yaml:15, logging_policy.py:213-219
    dr_model="network",              # C:click_trainer.py:1574-1713 trainer_regression, :1647 loss
    gain="linear",                   # C:click_trainer.py:107-118 NDCG@5 with gains label / 4
    drop_irrelevant_test_queries=False,  # C:src/data/data_loader.py:34-37 they count as 0
    eval_samples=100,
    click_models=("trust_bias", "adversarial"), estimated_bias=(), dr_steps=100,
    methods=("ips", "dr", "safe_dr", "prpo"),
)
PAPER_QUICK = dataclasses.replace(PAPER_FULL, num_queries=500, sessions=(100, 1_000, 10_000, 100_000),
                                  learning_rates=(1e-3, 1e-3, 1e-4, 1e-4), num_seeds=3, epochs=5,
                                  num_samples=32)
# (protocol, quick) -> the name of its config here (looked up when used, so tests may patch it).
CONFIGS = {("default", True): "QUICK", ("default", False): "FULL",
           ("paper", True): "PAPER_QUICK", ("paper", False): "PAPER_FULL"}


def config_for(protocol: str, quick: bool) -> Config:
  """The config of `saferl-jax cltr [--quick] --protocol P`."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol: must be one of {PROTOCOLS}, got {protocol!r}")
  return globals()[CONFIGS[protocol, bool(quick)]]


def _check_config(config: Config) -> None:
  for name, value, allowed in (("protocol", config.protocol, PROTOCOLS),
                               ("ranker", config.ranker, ("linear", "mlp")),
                               ("start", config.start, ("logger", "random")),
                               ("exposure_weights", config.exposure_weights, ("dcg", "click_model")),
                               ("dr_model", config.dr_model, ("ridge", "network")),
                               ("gain", config.gain, ("exponential", "linear"))):
    if value not in allowed:
      raise ValueError(f"config.{name}: must be one of {allowed}, got {value!r}")
  for name in config.click_models + config.estimated_bias:
    if name not in CLICK_MODELS:
      raise ValueError(f"config.click_models: unknown click model {name!r}; known: {CLICK_MODELS}")
  for name in config.methods:
    if name not in METHODS:
      raise ValueError(f"config.methods: unknown method {name!r}; known: {tuple(METHODS)}")
  if config.learning_rates and len(config.learning_rates) != len(config.sessions):
    raise ValueError("config.learning_rates: needs one learning rate per entry of config.sessions")
  if config.patience is not None and not 0 < config.validation_fraction < 1:
    raise ValueError("config.validation_fraction: early stopping (patience) needs a held-out share "
                     "in (0, 1)")


def _click_model(name: str, displayed: int):
  honest = trust_bias(displayed)
  return {"trust_bias": honest, "adversarial": adversarial(honest), "cascade": cascade(displayed),
          "dcm": dcm(displayed), "dbn": dbn(displayed)}[name]


def _load(config: Config, data_path: Path | None):
  """(train, test) queries: synthetic by default, else a LETOR file split 60/20/20 by query."""
  key = jax.random.key(config.seed)
  if data_path is None:
    data = ltr.make_ltr_dataset(key, num_queries=config.num_queries, max_docs=config.max_docs,
                                min_docs=config.min_docs, num_features=config.num_features)
  else:
    data = ltr.load_letor(data_path, max_docs=config.max_docs)
  train, _, test = ltr.split(data, key=jax.random.fold_in(key, 1))
  if config.drop_irrelevant_test_queries:
    # Queries without a relevant document have no NDCG; they are left out of the test set.
    test = ltr.take_queries(test, np.flatnonzero(np.asarray(test.labels.max(axis=1)) > 0))
  if test.num_queries == 0 or not np.any(np.asarray(test.labels) > 0):
    raise ValueError("data: no test query has a relevant document")
  return train, test


def _ranker(config: Config, num_features: int, seed: int):
  if config.ranker == "linear":
    return as_functional(LinearRanker(num_features, rngs=nnx.Rngs(seed)))
  return as_functional(MLPRanker(num_features, hidden=config.hidden, rngs=nnx.Rngs(seed)))


@functools.lru_cache(maxsize=None)
def _optimizer(learning_rate: float, weight_decay: float):
  """One optax object per setting, so every cell reuses the compiled training step."""
  # PyTorch's Adam(weight_decay=w) adds w * params to the gradient (L2, not AdamW's decoupling).
  if weight_decay == 0:
    return optax.adam(learning_rate)
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


def _stack(tree, seeds: int):
  return jax.tree_util.tree_map(lambda x: jnp.stack([x] * seeds), tree)


def _early_stopped(history: dict, patience: int | None) -> np.ndarray:
  """Each seed's test NDCG where training stops: the best held-out estimate so far once
  `patience` evaluations pass without improving it (as Lightning's EarlyStopping with the best
  model kept). Later steps never change earlier ones, so this equals stopping there."""
  ndcg = np.asarray(history["ndcg"])
  if patience is None:
    return ndcg[-1]
  validation = np.asarray(history["validation"])
  chosen = np.empty(ndcg.shape[1])
  for seed in range(ndcg.shape[1]):
    best, waited = 0, 0
    for epoch in range(1, validation.shape[0]):
      if validation[epoch, seed] > validation[best, seed]:
        best, waited = epoch, 0
      else:
        waited += 1
        if waited >= patience:
          break
    chosen[seed] = ndcg[best, seed]
  return chosen


class Setup(NamedTuple):
  """What every cell shares: the data, the exposure weights and the fitted logging policy."""
  train: ltr.LTRData
  test: ltr.LTRData
  rank_weights: jax.Array
  apply_fn: Callable
  init_params: Any
  logger: Any                  # the logging policy's parameters
  logger_queries: int
  logging_ndcg: float
  logging_logits: jax.Array    # [Q, D] on the training queries
  logging_exposure: jax.Array  # [Q, D]
  ndcg_of: Callable            # apply -> evaluate(params) -> {"ndcg": test NDCG@K}


def setup(config: Config, data_path: Path | None = None) -> Setup:
  """Loads the data and fits the logging policy: supervised PL-Rank on a few training queries."""
  _check_config(config)
  train, test = _load(config, data_path)
  num_features = train.features.shape[-1]
  k = config.displayed
  honest = trust_bias(k)
  rank_weights = (dcg_rank_weights(k) if config.exposure_weights == "dcg"
                  else jnp.asarray(honest.alpha + honest.beta))
  apply_fn, init_params = _ranker(config, num_features, config.seed)
  eval_key = jax.random.key(config.seed + 1)  # common random numbers for every policy

  def ndcg_of(apply):
    def evaluate(params):
      logits = apply(params, test.features)
      ndcg = expected_metric_from_samples(logits, test.labels, key=eval_key, k=k,
                                          num_samples=config.eval_samples, where=test.where,
                                          gain=config.gain)
      return {"ndcg": jnp.mean(ndcg.value)}
    return evaluate

  evaluate = ndcg_of(apply_fn)
  n_logger = max(1, int(round(config.logger_fraction * train.num_queries)))
  supervised, n_sup = relevance_data(train.features[:n_logger], train.labels[:n_logger],
                                     train.where[:n_logger])
  logger_batch = None if config.batch_queries is None else min(config.batch_queries, n_logger)
  logger_steps = (config.logger_steps if config.logger_epochs is None
                  else config.logger_epochs * -(-n_logger // (logger_batch or n_logger)))
  logger = train_ranker(apply_fn, init_params, supervised, key=jax.random.key(config.seed + 2),
                        objective="value", num_sessions=n_sup, rank_weights=rank_weights,
                        steps=logger_steps, batch_queries=logger_batch,
                        optimizer=_optimizer(config.logger_learning_rate or config.learning_rate,
                                             config.weight_decay),
                        num_samples=config.num_samples, evaluate=evaluate,
                        eval_every=logger_steps).params
  logging_logits = apply_fn(logger, train.features)
  logging_exposure = exposure_from_samples(
      sample_rankings(logging_logits, key=jax.random.key(config.seed + 3), where=train.where,
                      sample_shape=10_000, k=k),
      rank_weights, train.features.shape[1], where=train.where)
  return Setup(train, test, rank_weights, apply_fn, init_params, logger, n_logger,
               float(evaluate(logger)["ndcg"]), logging_logits, logging_exposure, ndcg_of)


def run(out: Path, config: Config = QUICK, *, data_path: Path | None = None) -> dict:
  """Runs every (click model, N) cell, writes DIR/results.json, cltr.png and summary.md."""
  out = Path(out)
  shared = setup(config, data_path)
  train, rank_weights, apply_fn, logger = shared.train, shared.rank_weights, shared.apply_fn, shared.logger
  logging_logits, logging_exposure = shared.logging_logits, shared.logging_exposure
  logging_ndcg, n_logger = shared.logging_ndcg, shared.logger_queries
  num_features = train.features.shape[-1]
  k = config.displayed
  honest = trust_bias(k)
  evaluate = shared.ndcg_of(apply_fn)
  ndcg_of = shared.ndcg_of

  # PRPO inside a trust region around the logger: every exposure ratio >= the bound, by design.
  inner_apply, inner_init = _ranker(config, num_features, config.seed + 7)
  region = TrustRegionRanker(apply_fn, logger, inner_apply,
                             trust_region_radius(config.trust_region_min_ratio, k=k))
  region_evaluate = ndcg_of(region.apply)

  # Early stopping holds out a share of the training queries' logs (fixed over seeds).
  held_out = np.zeros(train.num_queries, bool)
  if config.patience is not None:
    order = np.random.default_rng(config.seed).permutation(train.num_queries)
    held_out[order[:int(round(config.validation_fraction * train.num_queries))]] = True
  held_out = jnp.asarray(held_out)

  seeds = config.num_seeds
  seed_keys = jax.random.split(jax.random.key(config.seed + 6), seeds)
  start_params = (_stack(logger, seeds) if config.start == "logger"
                  else _fresh_params(config, num_features, seeds, offset=100))
  region_params = _stack(inner_init, seeds)
  # DR's network relevance model (one architecture for every cell: its training compiles once).
  network_apply = as_functional(MLPRanker(num_features, hidden=config.hidden,
                                    rngs=nnx.Rngs(config.seed + 50))).apply_fn
  checkpoint = Checkpoint(out, {**dataclasses.asdict(config), "data": str(data_path)})
  runs = [(m, False) for m in config.click_models] + [(m, True) for m in config.estimated_bias]
  cells = [(m, estimated, i) for m, estimated in runs for i in range(len(config.sessions))]
  bias_fits = {}
  for model_name, estimated, index in progress(cells, "cltr cells"):
    num_sessions = config.sessions[index]
    name = _entry(model_name, estimated)
    cell = f"{name}/{num_sessions}"
    if cell in checkpoint:
      continue
    click_model = _click_model(model_name, k)
    log_key = jax.random.fold_in(jax.random.key(config.seed + 4), num_sessions)
    # The estimators believe in trust bias (true or estimated); the users may differ.
    logs = [simulate_click_log(logging_logits, train.labels, click_model,
                               key=jax.random.fold_in(log_key, seed), num_sessions=num_sessions,
                               where=train.where, assumed_model=honest, rank_counts=estimated)
            for seed in range(seeds)]
    if estimated:
      fits = [estimate_bias(log.rank_counts, where=train.where) for log in logs]
      logs = [with_click_model(log, logging_logits, fit.click_model,
                               key=jax.random.fold_in(log_key, 1_000 + seed), where=train.where)
              for seed, (log, fit) in enumerate(zip(logs, fits))]
      bias_fits[cell] = {"alpha": [np.asarray(f.alpha).tolist() for f in fits],
                         "beta": [np.asarray(f.beta).tolist() for f in fits]}
    rewards = {estimator: _rewards(config, logs, estimator, train, network_apply)
               for estimator in ("ips", "dr")}
    counts = jnp.stack([log.session_counts for log in logs])
    learning_rate = config.learning_rates[index] if config.learning_rates else config.learning_rate
    optimizer = _optimizer(learning_rate, config.weight_decay)
    finals = {}
    for method in config.methods:
      estimator, objective = METHODS[method]
      data = RankingData(_stack(train.features, seeds), _stack(train.where, seeds),
                         rewards[estimator], counts, _stack(logging_exposure, seeds))
      options = {}
      if config.patience is not None:
        options = dict(validation=_queries(data, held_out),
                       validation_sessions=max(1, int(round(num_sessions * config.validation_fraction))))
        data = _queries(data, ~held_out)
      logged = np.sum(np.asarray(data.session_counts) > 0, axis=-1)  # [S] logged queries
      batch = None if config.batch_queries is None else min(config.batch_queries, int(logged.min()))
      if config.epochs is None:
        steps, eval_every = config.steps, config.steps
      else:  # an epoch: one pass over the (mean number of) logged queries
        eval_every = max(1, int(np.ceil(logged.mean() / (batch or logged.mean()))))
        steps = config.epochs * eval_every
      trust_region = method == "prpo_trust_region"
      result = train_ranker(
          region.apply if trust_region else apply_fn,
          region_params if trust_region else start_params, data, key=seed_keys,
          objective=objective, num_sessions=num_sessions, rank_weights=rank_weights, steps=steps,
          optimizer=optimizer, num_samples=config.num_samples, batch_queries=batch,
          delta=config.delta, clip_low=config.clip_range[0], clip_high=config.clip_range[1],
          evaluate=region_evaluate if trust_region else evaluate, eval_every=eval_every,
          **options)
      finals[method] = _early_stopped(result.history, config.patience).tolist()
    checkpoint.save(cell, {"finals": finals, "bias": bias_fits.get(cell)})

  click_models = {}
  for model_name, estimated in runs:
    name = _entry(model_name, estimated)
    methods = {}
    for method in config.methods:
      per_n = [np.asarray(checkpoint[f"{name}/{n}"]["finals"][method]) for n in config.sessions]
      intervals = [stats.confidence_interval(v, method="t") if len(v) > 1 else None for v in per_n]
      methods[method] = {
          "ndcg_mean": [float(v.mean()) for v in per_n],
          "ndcg_ci": [[float(i.lower), float(i.upper)] if i is not None else [float(v.mean())] * 2
                      for i, v in zip(intervals, per_n)],
          "ndcg_per_seed": [v.tolist() for v in per_n],
      }
    click_models[name] = {"num_sessions": list(config.sessions), "methods": methods,
                          "bias": "estimated" if estimated else "true"}
  results = {
      "config": dataclasses.asdict(config),
      "protocol": config.protocol,
      "data": "synthetic" if data_path is None else str(data_path),
      "logging_ndcg": logging_ndcg,
      "logger_queries": n_logger,
      "click_models": click_models,
      "trust_region_bound": config.trust_region_min_ratio * logging_ndcg,
  }
  if "trust_bias" in config.estimated_bias:
    fit = checkpoint[f"trust_bias_estimated_bias/{config.sessions[-1]}"]["bias"]
    results["estimated_bias"] = {
        "num_sessions": config.sessions[-1],
        "alpha": np.mean(fit["alpha"], axis=0).tolist(), "beta": np.mean(fit["beta"], axis=0).tolist(),
        "alpha_per_seed": fit["alpha"], "beta_per_seed": fit["beta"],
        "true_alpha": np.asarray(honest.alpha).tolist(), "true_beta": np.asarray(honest.beta).tolist()}
  results["claims"] = _claims(results)
  results["prpo_adversarial"] = _prpo_adversarial(results)
  return finish(out, results, _plot, summary)


def _entry(model_name: str, estimated: bool) -> str:
  return f"{model_name}_estimated_bias" if estimated else model_name


def _title(entry: str) -> str:
  """"cascade_estimated_bias" -> "cascade clicks, estimated bias"."""
  model_name, estimated = entry.split("_estimated_bias")[0], entry.endswith("_estimated_bias")
  return model_name.replace("_", " ") + " clicks" + (", estimated bias" if estimated else "")


def _fresh_params(config: Config, num_features: int, seeds: int, *, offset: int):
  """A fresh initialisation of the configured ranker per seed, [S, ...]."""
  params = [_ranker(config, num_features, config.seed + offset + s)[1] for s in range(seeds)]
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *params)


def _queries(data: RankingData, keep: jax.Array) -> RankingData:
  """The same data with the sessions and rewards of the other queries removed (they then count
  for nothing: no objective sees a query without sessions)."""
  return data._replace(rewards=jnp.where(keep[:, None], data.rewards, 0.0),
                       session_counts=jnp.where(keep, data.session_counts, 0.0))


def _rewards(config: Config, logs: list, estimator: str, train, network_apply) -> jax.Array:
  """R_q(d) [S, Q, D] from each seed's log: IPS, or DR with the ridge or the network model (the
  network is fitted for every seed at once, each from its own initialisation)."""
  if estimator == "ips" or config.dr_model == "ridge":
    return jnp.stack([estimated_rewards(log, estimator=estimator, features=train.features,
                                        where=train.where) for log in logs])
  seeds = len(logs)
  targets = [ips_regression_targets(log, where=train.where) for log in logs]
  data = ClickRegressionData(_stack(train.features, seeds),
                             *(jnp.stack(field) for field in zip(*targets)))
  params = _fresh_params(dataclasses.replace(config, ranker="mlp"), train.features.shape[-1],
                         seeds, offset=200)
  fit = train_reward_network(network_apply, params, data, key=jax.random.split(
      jax.random.key(config.seed + 51), seeds), steps=config.dr_steps,
      optimizer=_optimizer(1e-3, config.weight_decay))
  reward_hat = jax.vmap(lambda p: jnp.where(
      train.where, jax.nn.sigmoid(network_apply(p, train.features)), 0.0))(fit.params)
  return jnp.stack([estimated_rewards(log, estimator="dr", where=train.where, reward_hat=r)
                    for log, r in zip(logs, reward_hat)])


NON_AFFINE = ("cascade", "dcm", "dbn")


def _claims(results: dict) -> dict:
  """The papers' claims, judged per seed (the worst one: safety is about every deployment) and
  on the means and CIs."""
  logging = results["logging_ndcg"]
  models = results["click_models"]
  claims = {}

  def worst(methods, method, index):
    return min(methods[method]["ndcg_per_seed"][index])

  def worst_drops(methods):
    """logging - the worst seed's NDCG at any N, per method (> 0: below the logging policy)."""
    return {m: logging - min(min(seeds) for seeds in methods[m]["ndcg_per_seed"]) for m in methods}

  few, many = 0, -1
  if "trust_bias" in models:
    trust = models["trust_bias"]["methods"]
    claims["few_sessions_worst_seed"] = {m: worst(trust, m, few) for m in trust}
    if {"safe_dr", "prpo", "ips", "dr"} <= set(trust):
      claims["few_sessions_safe_dr_and_prpo_not_below_logging"] = (
          min(worst(trust, "safe_dr", few), worst(trust, "prpo", few)) >= logging)
      claims["few_sessions_ips_or_dr_below_logging"] = (
          min(worst(trust, "ips", few), worst(trust, "dr", few)) < logging)
      claims["many_sessions_safe_dr_ci_above_logging"] = trust["safe_dr"]["ndcg_ci"][many][0] > logging
      claims["many_sessions_safe_dr_minus_dr"] = (
          trust["safe_dr"]["ndcg_mean"][many] - trust["dr"]["ndcg_mean"][many])
  if "adversarial" in models:
    claims["adversarial_worst_drop"] = worst_drops(models["adversarial"]["methods"])
  # Users the affine estimators cannot model: which methods stay at or above the logger?
  for name, cell in models.items():
    if name.split("_estimated_bias")[0] in NON_AFFINE or name.endswith("_estimated_bias"):
      drops = worst_drops(cell["methods"])
      claims[f"{name}_worst_drop"] = drops
      claims[f"{name}_never_below_logging"] = sorted(m for m, d in drops.items() if d <= 0)
  return claims


def _prpo_adversarial(results: dict) -> dict:
  """The measured answer to "does PRPO stay safe under adversarial clicks?"."""
  logging = results["logging_ndcg"]
  drops = results["claims"].get("adversarial_worst_drop", {})
  answer = {"logging_ndcg": logging, "worst_drop": drops.get("prpo")}
  if "prpo_trust_region" in drops:
    answer["trust_region_worst_drop"] = drops["prpo_trust_region"]
    answer["trust_region_guaranteed_drop"] = logging - results["trust_region_bound"]
  answer["explanation"] = (
      "PRPO clips each document's exposure ratio in its objective: past the clip range the "
      "gradient that pushed the ratio vanishes, but nothing pulls it back. The ranker's "
      "parameters are shared by all documents and a query's exposures sum to a constant, so the "
      "documents still inside the range (pushed by adversarial rewards towards irrelevant "
      "documents) drag the others out of it. experiments.prpo_drift measures it (N = 1e5, 3 "
      "seeds, 300 steps): 26-83% (linear ranker) and 16-69% (MLP) of the displayed documents end "
      "outside the range, and the worst drop grows with the learning rate and the width of the "
      "range (linear, Adam 0.05: 0.053 at [0.95, 1.05], 0.129 at [0.8, 1.2], 0.283 at [0.5, 2], "
      "0.446 at the authors' [0.1, 10]). The bound the clipping aims at, a drop of at most "
      "(1 - clip_low) x the logger's NDCG, failed in 3 of those 16 runs (all at Adam 0.05: "
      "0.053 > 0.039 and 0.065 > 0.033 at [0.95, 1.05], 0.153 > 0.130 for the MLP at [0.8, 1.2]); "
      "no step of the optimisation enforces it. Keeping the ranker's logits within a radius of the logger's (prpo_trust_region, "
      "models.TrustRegionRanker) enforces it by construction, whatever the clicks: its worst "
      "seed stays within trust_region_guaranteed_drop, at the price of gaining almost nothing "
      "from honest clicks either.")
  return answer


def _plot(results: dict, out: Path) -> None:
  plt = pyplot()
  names = list(results["click_models"])
  columns = min(len(names), 4)
  rows = -(-len(names) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.4 * rows), sharey=True,
                           squeeze=False)
  for axis, model_name in zip(axes.ravel(), names):
    cell = results["click_models"][model_name]
    sessions = cell["num_sessions"]
    for method, curve in cell["methods"].items():
      plot_curve(axis, sessions, curve["ndcg_mean"], curve["ndcg_ci"], LABELS[method], marker="o",
                 markersize=3)
    axis.axhline(results["logging_ndcg"], color="gray", linestyle="--", label="logging policy")
    axis.set_xscale("log")
    axis.set_xlabel("logged sessions N")
    axis.set_title(_title(model_name), fontsize=9)
  for axis in axes.ravel()[len(names):]:
    axis.set_visible(False)
  for row in axes:
    row[0].set_ylabel("NDCG@5 on test queries")
  axes[0, 0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(out / "cltr.png", dpi=120)
  plt.close(fig)


def summary(results: dict) -> str:
  config = results["config"]
  parts = [f"## Safe counterfactual LTR ({results.get('protocol', 'default')} protocol, "
           f"{config['num_seeds']} seeds, {results['data']} data, "
           f"logging policy fitted on {results['logger_queries']} queries)\n",
           f"Logging policy NDCG@5: {results['logging_ndcg']:.4f}.\n"]
  for model_name, cell in results["click_models"].items():
    headers = ["method"] + [f"N = {n:,}" for n in cell["num_sessions"]]
    rows = [[LABELS[m]] + [f"{v:.4f}" for v in curve["ndcg_mean"]]
            for m, curve in cell["methods"].items()]
    parts.append(f"NDCG@5 under {_title(model_name)} (mean over seeds):\n\n" +
                 markdown_table(headers, rows) + "\n")
  claims = results["claims"]
  if "few_sessions_safe_dr_and_prpo_not_below_logging" in claims:
    few = claims["few_sessions_worst_seed"]
    parts.append(
        "Claims. With the fewest sessions, the worst seed of each method scores "
        + ", ".join(f"{LABELS[m]} {v:.4f}" for m, v in few.items())
        + f": safe DR and PRPO stay at or above the logging policy in every seed: "
        f"{claims['few_sessions_safe_dr_and_prpo_not_below_logging']}; IPS or DR falls below it in "
        f"some seed: {claims['few_sessions_ips_or_dr_below_logging']}. With the most sessions safe "
        f"DR's CI lies above the logging policy: {claims['many_sessions_safe_dr_ci_above_logging']} "
        f"(safe DR - DR = {claims['many_sessions_safe_dr_minus_dr']:+.4f}).\n")
  for key, drops in claims.items():
    if key.endswith("worst_drop"):
      model_name = key[:-len("_worst_drop")]
      parts.append(f"Largest drop below the logging policy (worst seed, any N) under "
                   f"{_title(model_name)}: "
                   + ", ".join(f"{LABELS[m]} {v:+.4f}" for m, v in drops.items()) + ".\n")
  if "estimated_bias" in results:
    fit = results["estimated_bias"]
    parts.append("Trust bias estimated by EM (mean over seeds, N = "
                 f"{fit['num_sessions']:,}): alpha " + ", ".join(f"{a:.3f}" for a in fit["alpha"])
                 + " (true " + ", ".join(f"{a:.3f}" for a in fit["true_alpha"]) + "); beta "
                 + ", ".join(f"{b:.3f}" for b in fit["beta"]) + " (true "
                 + ", ".join(f"{b:.3f}" for b in fit["true_beta"]) + ").\n")
  answer = results.get("prpo_adversarial", {})
  if answer.get("worst_drop") is not None:
    parts.append(f"PRPO under adversarial clicks: worst drop {answer['worst_drop']:+.4f}"
                 + (f"; inside the trust region {answer['trust_region_worst_drop']:+.4f} (bound "
                    f"{answer['trust_region_guaranteed_drop']:.4f})"
                    if "trust_region_worst_drop" in answer else "") + ".\n")
  return "\n".join(parts)
