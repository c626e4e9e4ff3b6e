"""Benchmark: per-epoch off-policy training time, saferl_jax against the same thing in PyTorch.

    python benchmarks/bench_opl.py [--quick] [--no-torch]

Both train the same softmax policy (linear, and an MLP with one hidden layer of 64) on the same
logged data (n = 10,000 rounds, d = 5, A = 100), with Adam and mini-batches of 250, for two
estimators. "ips" uses plain autodiff. "beta_grad" computes per-example gradients of the
importance weights (jax.vmap(jax.grad) against torch.func.vmap(torch.func.grad)), forms the
gradient-variance-optimal baseline from their norms, then the corrected gradient by one backward
pass (the same algorithm on both sides). The JAX time per epoch is that of
a 20-epoch `opl.train` call divided by 20, after a first call has compiled it. PyTorch
(2.13, CPU, all cores) runs a Python loop over mini-batches, as its users would write it. Results
go to benchmarks/results/opl_<platform>.json and .md. PyTorch is needed only here:
`pip install torch` (it is not a saferl_jax dependency). With `--no-torch` (no PyTorch installed)
only the saferl_jax side runs, torch is never imported, and the results go to
opl_jax_only_<platform>.json and .md (the comparison left out, and the file saying so).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax import data, opl
from timing import platform_description, write_results

N, DIM, N_ACTIONS, BATCH, HIDDEN, LEARNING_RATE = 10_000, 5, 100, 250, 64, 0.05


def logged_data():
  problem = data.make_problem(jax.random.key(0), num_actions=N_ACTIONS, dim_context=DIM,
                              logger_inverse_temperature=-1.0)
  log = data.simulate_log(problem, key=jax.random.key(1), num_rounds=N)
  return opl.logged_batch(problem.contexts[log.context_ids], log.actions, log.rewards,
                          log.logging_probs)


def jax_epoch_seconds(model_name: str, method: str, batch: opl.LoggedBatch, seeds: int = 1) -> float:
  def make(key):
    rngs = nnx.Rngs(params=key)
    model = (opl.LinearPolicy(DIM, N_ACTIONS, rngs=rngs) if model_name == "linear"
             else opl.MLPPolicy(DIM, N_ACTIONS, hidden=(HIDDEN,), rngs=rngs))
    return opl.as_functional(model)
  apply_fn, _ = make(jax.random.key(0))
  params = jax.vmap(lambda k: make(k)[1])(jax.random.split(jax.random.key(2), seeds))
  stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (seeds,) + x.shape), batch)
  keys = jax.random.split(jax.random.key(3), seeds)
  optimizer = optax.adam(LEARNING_RATE)

  def run(epochs):
    start = time.perf_counter()
    result = opl.train(apply_fn, params, stacked, key=keys, method=method, epochs=epochs,
                       batch_size=BATCH, optimizer=optimizer)
    jax.block_until_ready(result.params)
    return time.perf_counter() - start
  run(1)  # compiles; train() keeps the compiled epoch for later calls with the same setup
  return statistics.median(run(20) / 20 for _ in range(3))


def torch_epoch_seconds(model_name: str, method: str, batch: opl.LoggedBatch) -> float:
  import torch
  from torch.func import functional_call, grad, vmap

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  contexts = torch.tensor(np.asarray(batch.contexts))
  actions = torch.tensor(np.asarray(batch.actions))
  rewards = torch.tensor(np.asarray(batch.rewards))
  logging_probs = torch.tensor(np.asarray(batch.logging_probs))
  model = (torch.nn.Linear(DIM, N_ACTIONS) if model_name == "linear" else torch.nn.Sequential(
      torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, N_ACTIONS)))
  params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
  optimizer = torch.optim.Adam(params.values(), lr=LEARNING_RATE)

  def weight(p, context, action, logging_prob):
    logits = functional_call(model, p, (context[None],))
    log_prob = torch.log_softmax(logits, dim=-1)[0].gather(0, action[None])[0]
    return torch.exp(log_prob - torch.log(logging_prob))
  per_example = vmap(grad(weight), in_dims=(None, 0, 0, 0))

  def step(idx):
    x, a, r, p = contexts[idx], actions[idx], rewards[idx], logging_probs[idx]
    optimizer.zero_grad()
    beta = 0.0
    if method == "beta_grad":  # the same algorithm as saferl_jax: per-example norms, one backward
      detached = {k: v.detach() for k, v in params.items()}
      norms = sum(g.flatten(1).pow(2).sum(1) for g in per_example(detached, x, a, p).values())
      beta = (r * norms).sum() / norms.sum().clamp_min(1e-30)
    logits = functional_call(model, params, (x,))
    w = torch.exp(torch.log_softmax(logits, -1).gather(1, a[:, None])[:, 0] - torch.log(p))
    (-((r - beta) * w).mean()).backward()
    optimizer.step()

  def epoch():
    order = torch.randperm(N)
    for i in range(N // BATCH):
      step(order[i * BATCH:(i + 1) * BATCH])
  epoch()  # warm-up
  times = []
  for _ in range(5):
    start = time.perf_counter()
    epoch()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the linear model only")
  parser.add_argument("--no-torch", action="store_true",
                      help="the saferl_jax side only, without importing torch")
  args = parser.parse_args()
  batch = logged_data()
  rows = []
  for model_name in ("linear",) if args.quick else ("linear", "mlp"):
    for method in ("ips", "beta_grad"):
      row = {"model": model_name, "method": method,
             "saferl_jax_s": jax_epoch_seconds(model_name, method, batch),
             "saferl_jax_8_seeds_s": jax_epoch_seconds(model_name, method, batch, seeds=8)}
      if not args.no_torch:
        row["torch_s"] = torch_epoch_seconds(model_name, method, batch)
        row["speedup_vs_torch"] = row["torch_s"] / row["saferl_jax_s"]
        row["seeds_per_torch_epoch_time"] = 8 * row["torch_s"] / row["saferl_jax_8_seeds_s"]
      rows.append(row)
      print(json.dumps(row), flush=True)
  setup = {"n": N, "dim_context": DIM, "n_actions": N_ACTIONS, "batch_size": BATCH, "hidden": HIDDEN}
  if args.no_torch:
    write_jax_only(rows, setup)
    return
  import torch
  results = {"platform": platform_description(f", torch {torch.__version__}"), "setup": setup,
             "rows": rows}
  lines = [f"# Off-policy learning benchmark on {results['platform']}", "",
           f"Seconds per epoch (n = {N:,}, A = {N_ACTIONS}, mini-batches of {BATCH}, Adam); "
           "median over repeats:", "",
           "| model | estimator | saferl_jax | PyTorch | speed-up | saferl_jax, 8 seeds vmapped | "
           "8 seeds vs 8 PyTorch runs |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['method']} | {r['saferl_jax_s']:.4f} | {r['torch_s']:.4f} | "
                 f"{r['speedup_vs_torch']:.1f}x | {r['saferl_jax_8_seeds_s']:.4f} | "
                 f"{r['seeds_per_torch_epoch_time']:.1f}x |")
  write_results("opl", results, "\n".join(lines) + "\n")


def write_jax_only(rows: list[dict], setup: dict) -> None:
  """The saferl_jax side's table, saying that the PyTorch comparison was left out."""
  results = {"platform": platform_description(), "setup": setup, "rows": rows,
             "torch": "left out (--no-torch)"}
  lines = [f"# Off-policy learning benchmark on {results['platform']}, saferl_jax only", "",
           f"Seconds per epoch (n = {N:,}, A = {N_ACTIONS}, mini-batches of {BATCH}, Adam); "
           "median over repeats. The PyTorch comparison was left out (--no-torch: no PyTorch "
           "in this Python).", "",
           "| model | estimator | saferl_jax | saferl_jax, 8 seeds vmapped | 8 seeds / 1 seed |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['method']} | {r['saferl_jax_s']:.4f} | "
                 f"{r['saferl_jax_8_seeds_s']:.4f} | "
                 f"{r['saferl_jax_8_seeds_s'] / r['saferl_jax_s']:.1f}x |")
  write_results("opl_jax_only", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
