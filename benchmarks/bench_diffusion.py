"""Benchmark: diffusion sampling with log-probs and a LOOP update, saferl_jax against torch + diffusers.

    python benchmarks/bench_diffusion.py [--quick] [--cases mlp conv ...] [--batches 32 256]
                                         [--repeats N] [--no-torch]

Each case runs one network on both sides, the PyTorch module (benchmarks/torch_diffusion_side.py)
with the JAX weights copied in and its output checked against JAX's. Timings do not depend on the
weights' values. B samples = P prompts x K = 4, S = 20 steps, log-probs summed over dimensions
(saferl_jax's reduce="sum"), rewards the mean of x_0.

Cases (independent functions, `--cases` picks them):
- mlp: `MLPDenoiser(2, num_classes=10, hidden=(128, 128, 128))`, the 2-D task's network (105k
  parameters, briefly pretrained on the 2-D mixture so that the states keep the task's scale):
  per-operation overhead dominates. Goal: sampling and the LOOP update >= 5x PyTorch on CPU.
- conv: `ConvDenoiser` (8x8x1 digits, a two-level U-Net of GroupNorm, SiLU and 3x3
  convolutions, 32 and 64 channels, 199k parameters, random weights): the arithmetic dominates.
  Goal: parity on CPU.
- flow_mlp, flow_conv: the same networks as velocity networks of a rectified flow: saferl_jax's
  `sample` with a `FlowSchedule` (Flow-GRPO's SDE step, a = 0.7, t from 0.97 to 0) against a
  Python loop over diffusers' FlowMatchEulerDiscreteScheduler (given the same times) calling the
  torch network and Flow-GRPO's `sde_step_with_logprob`; log-probs checked as for DDIM.
- lora_mlp, lora_conv (saferl_jax only): XLA's memory analysis and the time of one LOOP update
  training all weights or rank-4 LoRA adapters (`add_lora`, `lora_functional`), without and with
  a KL term to the reference (a second copy of the weights, or for LoRA the adapters disabled).
The flow and LoRA cases are skipped, and say so, where saferl_jax lacks their modules.

For mlp and conv, DDIM (eta = 1, T = 1000 linear schedule):
1. One forward pass of the denoiser on B samples (jitted / torch.no_grad): what the network's
   kernels cost on each side, apart from the sampler around them.
2. Sampling: saferl_jax `sample` (one jitted lax.scan, compiled by a warm-up call; also timed
   inside an outer jax.jit, as in a jitted training round) against the DDPO pipeline: a Python
   loop over the timesteps of diffusers' DDIMScheduler ("leading" spacing, steps_offset=1,
   set_alpha_to_one=False; the same timesteps as `sampling_timesteps`, checked), calling the torch
   denoiser and DDPO's `ddim_step_with_logprob` under torch.no_grad(), keeping every state and
   log-prob.
3. One LOOP update on the stored trajectory of all B samples and S steps: log-probs recomputed
   under the parameters, LOOP (leave-one-out) advantages of fixed rewards, PPO's clipped loss
   (clip 0.2), backward, one Adam step. saferl_jax: one jitted function (`trajectory_log_probs`,
   `loop_advantages`, `ppo_loss`, `stepwise_value_and_grad`, optax.adam), and for comparison
   jax.value_and_grad of the whole S-step recomputation. PyTorch: autograd and
   torch.optim.Adam, two ways: DDPO's loop (forward and backward per timestep, gradients
   accumulated) and all S steps stacked into one forward of S*B samples.
4. Memory: the stored trajectory's bytes; XLA's memory analysis of each compiled JAX function
   (arguments, outputs, temporaries); for torch the bytes autograd saves for backward (a
   saved-tensors hook, distinct storages); and, unless --quick, the peak resident memory
   (VmHWM, Linux) of a fresh process per side: after its imports, after setup (for JAX including
   the compilation), and while running both cases once (the peak reset first).
5. Arithmetic rate: XLA's FLOP count of one forward pass, divided into the timings (an update
   counted as three forward passes per step), beside a 1024 x 1024 matmul's rate in each framework:
   how close each side runs to what the machine can do.

Agreement checks: eps of the two networks on random inputs; torch's DDPO formula re-evaluating
the log-probs saferl_jax recorded while sampling (same states and timesteps), both also against
float64; the update's loss and gradient at the same parameters (with diffusers' alphas_cumprod and
with saferl_jax's).

Timings are medians of up to `--repeats` calls after a warm-up (JAX compilation excluded, and
reported apart); a case stops repeating after 5 s once it has 3 calls. PyTorch is timed with
torch.set_num_threads(os.cpu_count()) and with 1 thread, and compared at the faster: on a machine
shared with other jobs, torch's OpenMP threads wait on each other, and all-core torch can be 10 to
100 times slower than one thread on these small tensors. XLA uses its default thread pool. The
load average is recorded before and after. Medians still move by tens of percent between runs on a
busy machine. On a GPU, JAX runs there and torch uses CUDA when its build has it (synchronised
before each clock read). Results go to benchmarks/results/diffusion_<platform>.json and .md
(diffusion_quick_<platform>.* with --quick). PyTorch and diffusers are needed only here
(`pip install torch diffusers`; neither is a saferl_jax dependency). With `--no-torch` (no PyTorch
installed) only the saferl_jax side runs, torch and diffusers are never imported, and the results
(timings, the log-probs against float64, XLA's memory analysis, the JAX peak RSS) go to
diffusion[_quick]_jax_only_<platform>.json and .md, the comparison left out and the file saying so.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax.data import mixture2d
from saferl_jax.diffusion.losses import loop_advantages, ppo_loss
from saferl_jax.diffusion.sampler import sample, stepwise_value_and_grad, trajectory_log_probs
from saferl_jax.diffusion.schedules import linear_schedule, sampling_timesteps
from saferl_jax.models.denoisers import ConvDenoiser, MLPDenoiser
from saferl_jax.models.functional import as_functional
from saferl_jax.training.pretraining import pretrain
from timing import platform_description, write_results

T, STEPS, ETA, K, CLIP, LEARNING_RATE, NUM_CLASSES = 1000, 20, 1.0, 4, 0.2, 1e-4, 10
HIDDEN, CHANNELS = (128, 128, 128), 32
FLOW_ETA = 0.7  # Flow-GRPO's noise level a
LORA_RANK, LORA_KL_WEIGHT = 4, 0.1
TORCH = True  # False with --no-torch: the saferl_jax side only, torch never imported


class Model(NamedTuple):
  """One network on both sides: how to build it, and one sample's shape in each layout."""
  description: str
  shape: tuple               # one sample, JAX layout
  torch_shape: tuple         # one sample, torch layout
  make_jax: Callable         # seed -> nnx.Module, randomly initialised
  make_torch: Callable       # () -> torch.nn.Module (torch's own initialisation)
  trained_state: Callable | None = None  # seed -> nnx.State of trained weights (None: keep random)


def jax_model(name: str, seed: int = 0, *, trained: bool = True):
  """The JAX network of case `name`, with its trained weights where the case has them."""
  spec = MODELS[name]
  model = spec.make_jax(seed)
  if trained and spec.trained_state is not None:
    nnx.update(model, spec.trained_state(seed))
  return model


def _torch_mlp():
  import torch_diffusion_side as ts
  return ts.MLPDenoiser(2, NUM_CLASSES, HIDDEN).to(ts.device())


def _torch_conv():
  import torch_diffusion_side as ts
  return ts.ConvDenoiser(NUM_CLASSES, CHANNELS).to(ts.device())


@functools.lru_cache(maxsize=1)
def _pretrained_mlp_params(seed: int):
  """The MLP after 300 Adam steps of DDPM's loss on the 2-D mixture (classes drawn at random).

  With random weights, the first DDIM steps' x0hat = (x - sqrt(1 - a) eps) / sqrt(a) drives the
  2-D states to |x| ~ 1e3, where float32's spacing over the last step's sigma (0.007) alone
  moves a log-density by ~0.1: the agreement checks would measure that, not the formulas. A
  briefly trained network keeps |x| of the task's order (~4). Timings do not depend on it.
  """
  model = MODELS["mlp"].make_jax(seed)
  key = jax.random.key(seed)
  points = mixture2d.sample_mixture(mixture2d.default_mixture(), key=key, num_samples=4096)
  classes = jax.random.randint(jax.random.fold_in(key, 1), (4096,), 0, NUM_CLASSES)
  pretrain(model, points, classes, key=jax.random.fold_in(key, 2),
           alphas_cumprod=linear_schedule(T).alphas_cumprod, steps=300, batch_size=256,
           learning_rate=2e-3)
  return nnx.state(model, nnx.Param)


MODELS = {
    "mlp": Model(f"MLPDenoiser (2-D, hidden {HIDDEN}, 300 pretraining steps on the 2-D mixture)",
                 (2,), (2,), lambda seed: MLPDenoiser(2, num_classes=NUM_CLASSES, hidden=HIDDEN,
                                                      rngs=nnx.Rngs(seed)),
                 _torch_mlp, _pretrained_mlp_params),
    "conv": Model(f"ConvDenoiser (8x8x1, {CHANNELS} and {2 * CHANNELS} channels, random weights)",
                  (8, 8, 1), (1, 8, 8),
                  lambda seed: ConvDenoiser(num_classes=NUM_CLASSES, channels=CHANNELS,
                                            rngs=nnx.Rngs(seed)), _torch_conv)}


def to_torch_layout(a, shape: tuple) -> np.ndarray:
  """[..., *shape] in torch's layout: images [..., H, W, C] -> [..., C, H, W]; vectors unchanged."""
  a = np.asarray(a)
  return np.moveaxis(a, -1, -3).copy() if len(shape) == 3 else a.copy()


def to_torch(a, dtype=None):
  import torch_diffusion_side as ts
  return ts.tensor(a, dtype)


def by_path(tree) -> dict[str, np.ndarray]:
  """A parameter pytree as {"block_down.conv1.kernel": array}, the names torch_diffusion_side uses."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    out[".".join(keys)] = np.asarray(leaf)
  return out


def torch_from_jax(name: str, model):
  """The torch network of case `name` with the JAX model's weights."""
  import torch_diffusion_side as ts
  return ts.set_weights(MODELS[name].make_torch(), by_path(nnx.state(model, nnx.Param)))


def rss_mb() -> float:
  """Peak resident memory of this process so far, in MB.

  Linux: VmHWM of /proc/self/status, the high-water mark of this program's memory (ru_maxrss would
  carry the parent's peak across fork and exec). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
  """
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 2**10
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def load_average() -> list[float] | None:
  """The 1, 5 and 15 minute load averages (as `uptime` prints them)."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


# The JAX side.


def jax_prompts(batch: int, seed: int = 1) -> jax.Array:
  if batch % K:
    raise ValueError(f"batch: must be a multiple of K = {K}, got {batch}")
  return jax.random.randint(jax.random.key(seed), (batch // K,), 0, NUM_CLASSES)


def jax_sampler(apply_fn, schedule, shape):
  def run(params, prompts, key):
    return sample(apply_fn, params, prompts, key=key, schedule=schedule, num_steps=STEPS, eta=ETA,
                  samples_per_condition=K, shape=shape)
  return run


def jax_updater(apply_fn, schedule, optimizer, *, stepwise: bool = True):
  """(loss_fn, update): the LOOP loss over all steps, and one jitted Adam step on it.

  With stepwise=True (as `finetune` does) the gradient is summed step by step
  (`stepwise_value_and_grad`, DDPO's backward per step); otherwise it is the gradient of the whole
  S-step recomputation, which keeps every step's activations.
  """
  def loss_fn(params, trajectory, rewards):
    log_probs = trajectory_log_probs(apply_fn, params, trajectory, schedule=schedule, eta=ETA)
    advantages = loop_advantages(rewards, samples_per_condition=K)
    return ppo_loss(log_probs, trajectory.log_probs, advantages, clip_range=CLIP).loss

  def value_and_grad(params, trajectory, rewards):
    if not stepwise:
      return jax.value_and_grad(loss_fn)(params, trajectory, rewards)
    advantages = loop_advantages(rewards, samples_per_condition=K)

    def step_loss(params, step):  # PPO's loss averages the steps
      log_probs = trajectory_log_probs(apply_fn, params, step, schedule=schedule, eta=ETA)
      return ppo_loss(log_probs, step.log_probs, advantages, clip_range=CLIP).loss / STEPS, None

    (loss, _), grads = stepwise_value_and_grad(step_loss, params, trajectory)
    return loss, grads

  @jax.jit
  def update(params, opt_state, trajectory, rewards):
    loss, grads = value_and_grad(params, trajectory, rewards)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return loss_fn, update


def forward_flops(apply_fn, params, batch: int, shape: tuple) -> float | None:
  """XLA's count of floating-point operations in one forward pass of the denoiser on B samples."""
  x = jnp.zeros((batch,) + shape)
  t = c = jnp.zeros((batch,), jnp.int32)
  analysis = jax.jit(apply_fn).lower(params, x, t, c).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def matmul_gflops(repeats: int, n: int = 1024) -> dict:
  """The machine's reference rate: an n x n float32 matrix product, in XLA and in torch (best threads)."""
  a = jax.random.normal(jax.random.key(0), (n, n))
  product = jax.jit(lambda a: a @ a)
  jax.block_until_ready(product(a))
  rates = {"jax": 2 * n**3 / median_seconds(lambda: jax.block_until_ready(product(a)), repeats) / 1e9}
  if not TORCH:
    return rates
  import torch
  import torch_diffusion_side as ts
  b = torch.randn(n, n, device=ts.device())
  torch_rates = []
  for threads in ts.thread_counts():
    torch.set_num_threads(threads)
    torch_rates.append(2 * n**3 / median_seconds(lambda: b @ b, repeats, ts.sync) / 1e9)
  torch.set_num_threads(os.cpu_count() or 1)
  rates["torch"] = max(torch_rates)
  return rates


def rewards_of(x0) -> jax.Array:
  """A fixed, cheap reward (the mean of x_0): the update's cost does not depend on it."""
  return jnp.mean(x0, axis=tuple(range(1, x0.ndim)))


def memory_analysis(compiled) -> dict | None:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # not every backend has it
    return None
  if analysis is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


# Timing.


def time_sampling(row: dict, run_sample, params, prompts, repeats: int):
  """Times run_sample(params, prompts, key) eagerly (its first call: the compilation) and inside
  jax.jit (as in a jitted training round: no Python-side checks per call); returns its output."""
  key = jax.random.key(3)
  start = time.perf_counter()
  trajectory = jax.block_until_ready(run_sample(params, prompts, key))
  row["jax_sample_compile_s"] = time.perf_counter() - start
  row["jax_sample_s"] = median_seconds(
      lambda: jax.block_until_ready(run_sample(params, prompts, key)), repeats)
  in_jit = jax.jit(run_sample)
  row["jax_sample_in_jit_s"] = median_seconds(
      lambda: jax.block_until_ready(in_jit(params, prompts, key)), repeats)
  return trajectory


def median_seconds(fn, repeats: int, sync=lambda: None, budget_s: float = 5.0) -> float:
  """Median seconds of up to `repeats` calls after a warm-up; stops early (after 3) past budget_s."""
  fn()
  sync()
  times = []
  begin = time.perf_counter()
  while len(times) < repeats and (len(times) < 3 or time.perf_counter() - begin < budget_s):
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_torch(cases: dict[str, Callable], repeats: int) -> dict:
  """{threads: {case: seconds}} for torch at every thread count of `thread_counts`."""
  import torch
  import torch_diffusion_side as ts
  out = {}
  for threads in ts.thread_counts():
    torch.set_num_threads(threads)
    out[threads] = {case: median_seconds(fn, repeats, ts.sync) for case, fn in cases.items()}
  torch.set_num_threads(os.cpu_count() or 1)
  return out


def best_torch(row: dict, pairs) -> None:
  """row[torch_best_<case>], its thread count and row[speedup_<case>] for (torch case, JAX key) pairs."""
  for case, ours in pairs:
    threads = min(row["torch"], key=lambda n: row["torch"][n][case])
    row[f"torch_best_{case}"] = row["torch"][threads][case]
    row[f"torch_best_{case}_threads"] = threads
    row[f"speedup_{case}"] = row["torch"][threads][case] / row[ours]


def reference_log_probs(eps: np.ndarray, states: np.ndarray, timesteps, previous) -> np.ndarray:
  """Step log-densities in float64 (schedule and formula) for float32 eps [S, B, ...]."""
  alphas = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))
  out = []
  for j, (t, t_prev) in enumerate(zip(np.asarray(timesteps), np.asarray(previous))):
    a, a_prev = alphas[t], alphas[t_prev]
    var = ETA**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    x, e = states[j].astype(np.float64), eps[j].astype(np.float64)
    mean = np.sqrt(a_prev) * (x - np.sqrt(1 - a) * e) / np.sqrt(a) + np.sqrt(1 - a_prev - var) * e
    z2 = (states[j + 1].astype(np.float64) - mean) ** 2 / var
    out.append(np.sum(-0.5 * z2 - 0.5 * np.log(var) - 0.5 * np.log(2 * np.pi),
                      axis=tuple(range(1, x.ndim))))
  return np.stack(out)


def grad_rel_diff(jax_grads, net) -> float:
  """|g_jax - g_torch| / |g_jax| over all parameters, torch's .grad mapped to JAX's layout."""
  import torch_diffusion_side as ts
  ours = by_path(jax_grads)
  theirs = ts.grads_by_jax_path(net, {path: g.shape for path, g in ours.items()})
  a = np.concatenate([np.ravel(ours[p]) for p in ours])
  b = np.concatenate([np.ravel(theirs[p]) for p in ours])
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


# Case: DDIM sampling and a LOOP update, for either network.


def ddim_case(name: str, batch: int, repeats: int) -> dict:
  spec = MODELS[name]
  shape = spec.shape
  layout = lambda a: to_torch_layout(a, shape)
  model = jax_model(name)
  schedule = linear_schedule(T)
  apply_fn, params = as_functional(model)
  prompts = jax_prompts(batch)
  options = dict(eta=ETA, samples_per_prompt=K, clip_range=CLIP)
  row = {"batch": batch, "prompts": batch // K, "samples_per_prompt": K, "steps": STEPS,
         "repeats": repeats, "denoiser_parameters": int(sum(
             np.size(p) for p in jax.tree_util.tree_leaves(params)))}
  keys = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(keys[0], (batch,) + shape)
  t = jax.random.randint(keys[1], (batch,), 0, T)
  c = jax.random.randint(keys[2], (batch,), 0, NUM_CLASSES + 1)
  apply = jax.jit(apply_fn)
  eps_jax = np.asarray(apply(params, x, t, c))
  row["eps_scale"] = float(np.max(np.abs(eps_jax)))

  if TORCH:  # Agreement: the timesteps, the schedules, eps.
    import torch
    import torch_diffusion_side as ts
    torch.manual_seed(0)
    net = torch_from_jax(name, model)
    scheduler = ts.ddim_scheduler(T, STEPS)
    ours = sampling_timesteps(T, STEPS)
    theirs = scheduler.timesteps.cpu().numpy()
    theirs_prev = np.clip(theirs - T // STEPS, 0, T - 1)
    row["timesteps_equal"] = bool(np.array_equal(np.asarray(ours.timesteps), theirs)
                                  and np.array_equal(np.asarray(ours.previous), theirs_prev))
    row["alphas_cumprod_max_abs_diff"] = float(np.max(np.abs(
        np.asarray(schedule.alphas_cumprod, np.float64) - scheduler.alphas_cumprod.numpy())))
    x_torch, t_torch, c_torch = to_torch(layout(x)), to_torch(t).long(), to_torch(c).long()
    with torch.no_grad():
      eps_torch = net(x_torch, t_torch, c_torch).cpu().numpy()
    row["eps_max_abs_diff"] = float(np.max(np.abs(layout(eps_jax) - eps_torch)))
    if not row["eps_max_abs_diff"] <= 1e-4 * max(1.0, row["eps_scale"]):
      raise AssertionError(f"{name}: the torch network disagrees with JAX's: eps differs by "
                           f"{row['eps_max_abs_diff']:.2e}")

  # 1. One forward pass.
  row["jax_forward_s"] = median_seconds(lambda: jax.block_until_ready(apply(params, x, t, c)), repeats)

  # 2. Sampling.
  run_sample = jax_sampler(apply_fn, schedule, shape)
  trajectory = time_sampling(row, run_sample, params, prompts, repeats)

  # The log-probs saferl_jax recorded against float64; with torch, its DDPO formula on the same
  # states (teacher forcing).
  jax_lp = np.asarray(trajectory.log_probs)
  eps_steps = np.stack([np.asarray(apply(params, trajectory.states[j], jnp.full((batch,), tj),
                                         trajectory.conditions))
                        for j, tj in enumerate(np.asarray(trajectory.timesteps))])
  exact = reference_log_probs(eps_steps, np.asarray(trajectory.states), trajectory.timesteps,
                              trajectory.previous_timesteps)
  row["log_prob_jax_vs_float64"] = float(np.max(np.abs(jax_lp - exact)))
  row["log_prob_range"] = [float(jax_lp.min()), float(jax_lp.max())]
  if TORCH:
    states = to_torch(layout(trajectory.states))
    conditions = to_torch(trajectory.conditions).long()
    torch_lp = ts.ddim_teacher_forced(net, scheduler, states, conditions, ETA)
    torch_lp_np = torch_lp.cpu().numpy()
    row["log_prob_max_abs_diff"] = float(np.max(np.abs(torch_lp_np - jax_lp)))
    row["log_prob_max_rel_diff"] = float(np.max(np.abs(torch_lp_np - jax_lp) / np.abs(jax_lp)))
    row["log_prob_torch_vs_float64"] = float(np.max(np.abs(torch_lp_np - exact)))

  # 3. One LOOP update.
  optimizer = optax.adam(LEARNING_RATE)
  opt_state = optimizer.init(params)
  rewards = rewards_of(trajectory.x0)
  loss_fn, update = jax_updater(apply_fn, schedule, optimizer)
  start = time.perf_counter()
  jax.block_until_ready(update(params, opt_state, trajectory, rewards))
  row["jax_update_compile_s"] = time.perf_counter() - start
  row["jax_update_s"] = median_seconds(
      lambda: jax.block_until_ready(update(params, opt_state, trajectory, rewards)), repeats)
  _, update_whole = jax_updater(apply_fn, schedule, optimizer, stepwise=False)
  jax.block_until_ready(update_whole(params, opt_state, trajectory, rewards))
  row["jax_update_whole_s"] = median_seconds(
      lambda: jax.block_until_ready(update_whole(params, opt_state, trajectory, rewards)), repeats)
  row["forward_flops"] = forward_flops(apply_fn, params, batch, shape)

  if TORCH:
    old_log_probs, rewards_torch = to_torch(trajectory.log_probs), to_torch(rewards)
    args = (scheduler, states, old_log_probs, conditions, rewards_torch)
    # The loss and gradient at the same parameters, before torch's optimiser moves them. Each
    # side's old log-probs are its own evaluation of the stored steps (ratio 1 exactly), so the
    # check is of the two gradients, not of the float32 rounding of the log-probs themselves.
    jax_loss, jax_grads = jax.jit(jax.value_and_grad(loss_fn))(params, trajectory, rewards)
    net.zero_grad()
    torch_loss = ts.ddim_stacked_loss(net, scheduler, states, torch_lp, conditions, rewards_torch,
                                      **options)
    torch_loss.backward()
    row["loss_jax"], row["loss_torch"] = float(jax_loss), float(torch_loss.detach())
    row["grad_rel_diff"] = grad_rel_diff(jax_grads, net)
    # The same with diffusers' alphas_cumprod replaced by saferl_jax's (float64-computed, then
    # float32): what is left is the two formulas' float32 rounding.
    scheduler_ours = ts.ddim_scheduler(T, STEPS)
    scheduler_ours.alphas_cumprod = torch.tensor(np.asarray(schedule.alphas_cumprod))
    scheduler_ours.final_alpha_cumprod = scheduler_ours.alphas_cumprod[0]
    torch_lp_ours = ts.ddim_teacher_forced(net, scheduler_ours, states, conditions, ETA)
    row["log_prob_max_abs_diff_same_alphas"] = float(np.max(np.abs(torch_lp_ours.numpy() - jax_lp)))
    net.zero_grad()
    ts.ddim_stacked_loss(net, scheduler_ours, states, torch_lp_ours, conditions, rewards_torch,
                         **options).backward()
    row["grad_rel_diff_same_alphas"] = grad_rel_diff(jax_grads, net)

    # Torch's timings, with all cores and with one thread.
    prompts_torch = to_torch(prompts).long()
    generator = torch.Generator(device=ts.device()).manual_seed(0)
    torch_optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)

    def forward():
      with torch.no_grad():
        return net(x_torch, t_torch, c_torch)

    row["torch"] = time_torch({
        "forward_s": forward,
        "sample_s": lambda: ts.ddim_sample(net, scheduler, prompts_torch, shape=spec.torch_shape,
                                           samples_per_prompt=K, eta=ETA, generator=generator),
        "update_s": lambda: ts.ddim_update_per_step(net, torch_optimizer, *args, **options),
        "stacked_update_s": lambda: ts.update_stacked(ts.ddim_stacked_loss, net, torch_optimizer,
                                                      *args, **options)}, repeats)
    best_torch(row, (("forward_s", "jax_forward_s"), ("sample_s", "jax_sample_s"),
                     ("update_s", "jax_update_s"), ("stacked_update_s", "jax_update_s")))

  # 4. Memory.
  row["trajectory_bytes"] = int(sum(np.asarray(a).nbytes for a in trajectory))
  row["param_bytes"] = int(sum(np.asarray(p).nbytes for p in jax.tree_util.tree_leaves(params)))
  row["jax_sample_memory"] = memory_analysis(
      jax.jit(run_sample).lower(params, prompts, jax.random.key(3)).compile())
  row["jax_update_memory"] = memory_analysis(
      update.lower(params, opt_state, trajectory, rewards).compile())
  row["jax_update_whole_memory"] = memory_analysis(
      update_whole.lower(params, opt_state, trajectory, rewards).compile())
  if TORCH:
    row["torch_saved_for_backward_bytes"] = saved_tensor_bytes(
        lambda: ts.ddim_stacked_loss(net, *args, **options))
    row["torch_saved_for_backward_per_step_bytes"] = saved_tensor_bytes(
        lambda: ts.ddim_first_step_loss(net, *args, **options))
  return row


def saved_tensor_bytes(fn) -> int:
  """Bytes of the distinct storages autograd saves for backward while fn() builds its graph(s)."""
  import torch
  seen = {}

  def pack(tensor):
    storage = tensor.untyped_storage()
    seen[storage.data_ptr()] = storage.nbytes()
    return tensor

  with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    fn()
  return sum(seen.values())


# Case: rectified-flow sampling with Flow-GRPO's SDE step, for either network.


def flow_reference_log_probs(velocity: np.ndarray, states: np.ndarray, times, previous) -> np.ndarray:
  """Flow-GRPO step log-densities in float64 for float32 velocities [S, B, ...] and times [S]."""
  out = []
  for j, (t, t_prev) in enumerate(zip(np.asarray(times, np.float64), np.asarray(previous, np.float64))):
    h = t - t_prev
    var = FLOW_ETA**2 * t / (1 - t) * h
    x, v = states[j].astype(np.float64), velocity[j].astype(np.float64)
    mean = x - h * (v + FLOW_ETA**2 / (2 * (1 - t)) * (x + (1 - t) * v))
    z2 = (states[j + 1].astype(np.float64) - mean) ** 2 / var
    out.append(np.sum(-0.5 * z2 - 0.5 * np.log(var) - 0.5 * np.log(2 * np.pi),
                      axis=tuple(range(1, x.ndim))))
  return np.stack(out)


def flow_case(name: str, batch: int, repeats: int) -> dict:
  """saferl_jax's flow SDE sampler against diffusers' flow scheduler + Flow-GRPO's step in torch."""
  from saferl_jax.diffusion.flow import flow_schedule, flow_timesteps
  spec = MODELS[name]
  shape = spec.shape
  layout = lambda a: to_torch_layout(a, shape)
  model = jax_model(name)  # used as a velocity network: timings do not depend on the weights
  schedule = flow_schedule()
  apply_fn, params = as_functional(model)
  prompts = jax_prompts(batch)
  grid = flow_timesteps(schedule, STEPS)
  row = {"batch": batch, "prompts": batch // K, "samples_per_prompt": K, "steps": STEPS,
         "repeats": repeats, "eta": FLOW_ETA, "t_max": float(schedule.t_max),
         "t_min": float(schedule.t_min), "time_scale": float(schedule.time_scale)}

  if TORCH:  # Agreement: the times (diffusers' sigmas end with the data level 0), the network's time input.
    import torch
    import torch_diffusion_side as ts
    torch.manual_seed(0)
    net = torch_from_jax(name, model)
    scheduler = ts.flow_scheduler(np.asarray(grid.timesteps))
    ours = np.append(np.asarray(grid.timesteps), np.asarray(grid.previous)[-1])
    row["times_max_abs_diff"] = float(np.max(np.abs(ours - scheduler.sigmas.cpu().numpy())))
    row["model_times_max_abs_diff"] = float(np.max(np.abs(
        np.asarray(grid.timesteps) * float(schedule.time_scale) - scheduler.timesteps.cpu().numpy())))

  # Sampling.
  def run_sample(params, prompts, key):
    return sample(apply_fn, params, prompts, key=key, schedule=schedule, num_steps=STEPS,
                  eta=FLOW_ETA, samples_per_condition=K, shape=shape)

  trajectory = time_sampling(row, run_sample, params, prompts, repeats)
  row["max_abs_state"] = float(jnp.max(jnp.abs(trajectory.states)))

  # The recorded log-probs against float64; with torch, Flow-GRPO's formula on saferl_jax's states.
  jax_lp = np.asarray(trajectory.log_probs)
  apply = jax.jit(apply_fn)
  times = np.asarray(trajectory.timesteps)
  velocity = np.stack([np.asarray(apply(params, trajectory.states[j],
                                        jnp.full((batch,), t * schedule.time_scale),
                                        trajectory.conditions)) for j, t in enumerate(times)])
  exact = flow_reference_log_probs(velocity, np.asarray(trajectory.states), times,
                                   trajectory.previous_timesteps)
  row["log_prob_jax_vs_float64"] = float(np.max(np.abs(jax_lp - exact)))
  row["log_prob_range"] = [float(jax_lp.min()), float(jax_lp.max())]
  if TORCH:
    states = to_torch(layout(trajectory.states))
    conditions = to_torch(trajectory.conditions).long()
    torch_lp = ts.flow_teacher_forced(net, scheduler, states, conditions, FLOW_ETA).cpu().numpy()
    row["log_prob_max_abs_diff"] = float(np.max(np.abs(torch_lp - jax_lp)))
    row["log_prob_torch_vs_float64"] = float(np.max(np.abs(torch_lp - exact)))
    prompts_torch = to_torch(prompts).long()
    generator = torch.Generator(device=ts.device()).manual_seed(0)
    row["torch"] = time_torch({
        "sample_s": lambda: ts.flow_sample(net, scheduler, prompts_torch, shape=spec.torch_shape,
                                           samples_per_prompt=K, noise_level=FLOW_ETA,
                                           generator=generator)}, repeats)
    best_torch(row, (("sample_s", "jax_sample_s"),))
  row["jax_sample_memory"] = memory_analysis(
      jax.jit(run_sample).lower(params, prompts, jax.random.key(3)).compile())
  return row


# Case: the memory of a LOOP update with and without LoRA adapters (saferl_jax only).


def lora_updater(apply_fn, schedule, optimizer, *, kl_weight: float):
  """One jitted Adam step of the stepwise LOOP loss (+ kl_weight x the per-step KL to a reference).

  update(params, opt_state, frozen, reference, trajectory, rewards): the network is
  apply_fn(network(params, frozen), ...) and the reference apply_fn(network(reference, frozen)),
  where network(p, f) = p without LoRA (frozen None, the reference a second copy of the weights)
  and (p, f) with it (the reference: the adapters with B = 0, the one frozen copy of the weights).
  """
  from saferl_jax.diffusion.sampler import trajectory_transitions
  from saferl_jax.diffusion.step import step_kl
  network = lambda p, frozen: p if frozen is None else (p, frozen)

  @jax.jit
  def update(params, opt_state, frozen, reference, trajectory, rewards):
    advantages = loop_advantages(rewards, samples_per_condition=K)

    def step_loss(params, step):
      new = trajectory_transitions(apply_fn, network(params, frozen), step, schedule=schedule,
                                   eta=ETA)
      loss = ppo_loss(new.log_probs, step.log_probs, advantages, clip_range=CLIP).loss
      if kl_weight:
        ref = trajectory_transitions(apply_fn, network(reference, frozen), step, schedule=schedule,
                                     eta=ETA)
        kl = jax.vmap(lambda m, r: step_kl(m, r, new.stds[0]))(
            new.means[0], jax.lax.stop_gradient(ref.means[0]))
        loss = loss + kl_weight * jnp.mean(kl)
      return loss / STEPS, None

    (loss, _), grads = stepwise_value_and_grad(step_loss, params, trajectory)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return update


def lora_case(name: str, batch: int, repeats: int) -> dict:
  """XLA's memory analysis and the time of one LOOP update: all weights vs rank-r LoRA adapters."""
  from saferl_jax.models.lora import add_lora, disable_adapters, lora_functional
  spec = MODELS[name]
  schedule = linear_schedule(T)
  apply_fn, params = as_functional(jax_model(name))
  trajectory = jax.jit(jax_sampler(apply_fn, schedule, spec.shape))(
      params, jax_prompts(batch), jax.random.key(3))
  rewards = rewards_of(trajectory.x0)
  lora_apply, adapters, base = lora_functional(
      add_lora(jax_model(name), rank=LORA_RANK, rngs=nnx.Rngs(1)))
  count = lambda tree: int(sum(np.size(p) for p in jax.tree_util.tree_leaves(tree)))
  nbytes = lambda tree: int(sum(np.asarray(p).nbytes for p in jax.tree_util.tree_leaves(tree)))
  row = {"batch": batch, "repeats": repeats, "rank": LORA_RANK, "kl_weight": LORA_KL_WEIGHT,
         "parameters": count(params), "lora_trainable_parameters": count(adapters),
         "lora_frozen_parameters": count(base), "param_bytes": nbytes(params),
         "lora_adapter_bytes": nbytes(adapters), "trajectory_bytes": nbytes(trajectory)}
  optimizer = optax.adam(LEARNING_RATE)
  variants = {  # name: (apply_fn, trained, frozen, reference)
      "full": (apply_fn, params, None, params),
      "lora": (lora_apply, adapters, base, disable_adapters(adapters))}
  for kl_weight, suffix in ((0.0, ""), (LORA_KL_WEIGHT, "_kl")):
    for variant, (apply, trained, frozen, reference) in variants.items():
      update = lora_updater(apply, schedule, optimizer, kl_weight=kl_weight)
      opt_state = optimizer.init(trained)
      args = (trained, opt_state, frozen, reference if kl_weight else None, trajectory, rewards)
      row[f"{variant}{suffix}_memory"] = memory_analysis(update.lower(*args).compile())
      row[f"{variant}{suffix}_update_s"] = median_seconds(
          lambda: jax.block_until_ready(update(*args)), repeats)
  return row


# Peak resident memory, one fresh process per side.


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current resident size (Linux >= 4.0); False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as clear_refs:
      clear_refs.write("5")
    return True
  except OSError:
    return False


def memory_side(side: str, name: str, batch: int) -> dict:
  """Peak RSS of one side of a DDIM case in this (fresh) process: imports, setup, the run."""
  spec = MODELS[name]
  out = {"after_imports_MB": rss_mb()}
  if side == "jax":
    schedule = linear_schedule(T)
    apply_fn, params = as_functional(jax_model(name, trained=False))  # no training in the peak
    prompts, key = jax_prompts(batch), jax.random.key(3)
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(params)
    sampler = jax.jit(jax_sampler(apply_fn, schedule, spec.shape))
    _, update = jax_updater(apply_fn, schedule, optimizer)
    trajectory_shape = jax.eval_shape(sampler, params, prompts, key)
    rewards_shape = jax.ShapeDtypeStruct((batch,), jnp.float32)
    compiled_sample = sampler.lower(params, prompts, key).compile()
    compiled_update = update.lower(params, opt_state, trajectory_shape, rewards_shape).compile()
    reward_fn = jax.jit(rewards_of).lower(trajectory_shape.x0).compile()
    out["setup_peak_MB"] = rss_mb()  # the model and XLA's compilation of both functions
    if reset_peak_rss():
      trajectory = compiled_sample(params, prompts, key)
      jax.block_until_ready(compiled_update(params, opt_state, trajectory, reward_fn(trajectory.x0)))
      out["run_peak_MB"] = rss_mb()
  else:
    import torch
    import torch_diffusion_side as ts
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)  # torch's own initialisation: no JAX runtime in this process
    net = spec.make_torch()
    prompts = torch.randint(0, NUM_CLASSES, (batch // K,), device=ts.device())
    scheduler = ts.ddim_scheduler(T, STEPS)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    options = dict(eta=ETA, samples_per_prompt=K, clip_range=CLIP)
    out["setup_peak_MB"] = rss_mb()
    if reset_peak_rss():
      states, log_probs, conditions = ts.ddim_sample(net, scheduler, prompts, shape=spec.torch_shape,
                                                     samples_per_prompt=K, eta=ETA)
      rewards = states[-1].mean(dim=tuple(range(1, states.ndim - 1)))
      args = (scheduler, states, log_probs, conditions, rewards)
      ts.ddim_update_per_step(net, optimizer, *args, **options)
      out["run_peak_MB"] = rss_mb()
      reset_peak_rss()
      ts.update_stacked(ts.ddim_stacked_loss, net, optimizer, *args, **options)
      out["run_stacked_peak_MB"] = rss_mb()
  return out


def measure_memory_in_subprocess(side: str, name: str, batch: int) -> dict:
  out = subprocess.run([sys.executable, __file__, "--memory-side", side, "--cases", name,
                        "--batches", str(batch)],
                       capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
  return json.loads(out.stdout.strip().splitlines()[-1])


# Running the cases and writing the results.


CASES = {"mlp": functools.partial(ddim_case, "mlp"), "conv": functools.partial(ddim_case, "conv"),
         "flow_mlp": functools.partial(flow_case, "mlp"),
         "flow_conv": functools.partial(flow_case, "conv"),
         "lora_mlp": functools.partial(lora_case, "mlp"),
         "lora_conv": functools.partial(lora_case, "conv")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="3 repeats, B = 32 only, no peak-RSS subprocesses; results to "
                           "diffusion_quick_<platform>")
  parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES),
                      help="which cases to run (default: all)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls per case at B = 32 (default 10; scaled by 32 / B, at least 3)")
  parser.add_argument("--batches", type=int, nargs="+", default=None,
                      help="samples per batch, multiples of K = 4 (default 32 256; 32 with --quick)")
  parser.add_argument("--no-torch", action="store_true",
                      help="the saferl_jax side only, without importing torch or diffusers; "
                           "results to diffusion[_quick]_jax_only_<platform>")
  parser.add_argument("--memory-side", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  global TORCH
  TORCH = not args.no_torch
  batches = args.batches or ([32] if args.quick else [32, 256])
  if args.memory_side:  # a child process: peak RSS of one side of one case only
    if args.memory_side == "torch":  # imported before the first reading, as jax is
      for module in ("torch", "diffusers"):
        importlib.import_module(module)
    print(json.dumps(memory_side(args.memory_side, args.cases[0], batches[0])))
    return
  repeats = args.repeats or (3 if args.quick else 10)

  if TORCH:
    import diffusers
    import torch
    import torch_diffusion_side as ts
    torch.set_num_threads(os.cpu_count())
    platform = platform_description(
        f", torch {torch.__version__} ({ts.device()}; timed with "
        f"{' and '.join(map(str, ts.thread_counts()))} threads), diffusers {diffusers.__version__}")
  else:
    platform = platform_description()
  results = {
      "platform": platform, "torch": TORCH,
      "load_average_before": load_average(),
      "setup": {"num_train_timesteps": T, "steps": STEPS, "eta": ETA, "samples_per_prompt": K,
                "clip_range": CLIP, "reduce": "sum", "learning_rate": LEARNING_RATE,
                "num_classes": NUM_CLASSES, "repeats_at_32": repeats, "quick": args.quick},
      "cases": {}}
  for name in args.cases:
    rows = []
    for batch in batches:
      try:
        row = CASES[name](batch, max(3, repeats * 32 // batch))
      except ModuleNotFoundError as error:  # a case whose saferl_jax module this checkout lacks
        print(f"{name}: skipped ({error})", flush=True)
        results.setdefault("skipped", {})[name] = str(error)
        break
      if not args.quick and name in MODELS:
        row["peak_rss_jax"] = measure_memory_in_subprocess("jax", name, batch)
        if TORCH:
          row["peak_rss_torch"] = measure_memory_in_subprocess("torch", name, batch)
      rows.append(row)
      print(json.dumps({"case": name, **row}), flush=True)
    if rows:
      results["cases"][name] = rows
  results["matmul_gflops"] = matmul_gflops(repeats)
  results["load_average_after"] = load_average()
  stem = ("diffusion_quick" if args.quick else "diffusion") + ("" if TORCH else "_jax_only")
  write_results(stem, results, markdown(results))


# Markdown.


def _mb(b: float) -> str:
  return f"{b / 2**20:.2f}"


def _xla(m: dict | None) -> str:
  if not m:
    return "n/a"
  return (f"{_mb(m['argument_size_in_bytes'])} + {_mb(m['output_size_in_bytes'])} + "
          f"{_mb(m['temp_size_in_bytes'])}")


def _timing_table(rows: list[dict], cases) -> list[str]:
  """cases: (label, JAX key, torch key); one line per row and case."""
  threads = list(rows[0]["torch"])
  lines = ["| case | B | repeats (at most) | saferl_jax | " + " | ".join(
               f"PyTorch, {n} thread{'s' if int(n) > 1 else ''}" for n in threads)
           + " | speed-up vs faster PyTorch |",
           "|---|---|---|---|" + "---|" * len(threads) + "---|"]
  for r in rows:
    for label, ours, theirs in cases:
      best = min(v[theirs] for v in r["torch"].values())
      lines.append(f"| {label} | {r['batch']} | {r['repeats']} | {r[ours]:.5f} | " + " | ".join(
          f"{v[theirs]:.5f}" for v in r["torch"].values()) + f" | {best / r[ours]:.2f}x |")
  return lines


def ddim_markdown(name: str, rows: list[dict], rates: dict) -> list[str]:
  spec = MODELS[name]
  lines = [f"## {name}: {spec.description}, DDIM", "",
           f"{rows[0]['denoiser_parameters']:,} parameters (copied into an equal PyTorch module). "
           f"B = P prompts x K = {K}, S = {STEPS} DDIM steps, eta = {ETA}.", ""]
  lines += _timing_table(rows, (
      ("one forward pass of the denoiser (jitted / no_grad)", "jax_forward_s", "forward_s"),
      ("sample S steps with log-probs: `sample` / DDPO's loop", "jax_sample_s", "sample_s"),
      ("the same, `sample` inside jax.jit", "jax_sample_in_jit_s", "sample_s"),
      ("LOOP update: saferl_jax / DDPO's loop (backward per step)", "jax_update_s", "update_s"),
      ("LOOP update: saferl_jax / torch with the S steps stacked in one forward",
       "jax_update_s", "stacked_update_s"),
      ("LOOP update, gradient of the whole S-step recomputation / DDPO's loop",
       "jax_update_whole_s", "update_s")))
  lines += ["", "saferl_jax's LOOP update sums per-step gradients in a lax.scan "
            "(`stepwise_value_and_grad`, as `finetune` does); the last case differentiates the "
            "whole S-step recomputation instead. Per sampling step: " + "; ".join(
                f"B = {r['batch']}: saferl_jax {1e3 * r['jax_sample_s'] / STEPS:.3f} ms "
                f"({r['jax_sample_s'] / STEPS / r['jax_forward_s']:.2f} forward passes), PyTorch "
                f"{1e3 * r['torch_best_sample_s'] / STEPS:.3f} ms "
                f"({r['torch_best_sample_s'] / STEPS / r['torch_best_forward_s']:.2f} forward passes)"
                for r in rows) + ".", "",
            f"Arithmetic rate (XLA's FLOP count of one forward pass; an update counted as 3 forward "
            f"passes per step). Reference: a 1024 x 1024 float32 matmul runs at "
            f"{rates['jax']:.0f} GFLOP/s in XLA and {rates['torch']:.0f} GFLOP/s in torch.", "",
            "| B | MFLOP per forward pass | GFLOP/s: saferl_jax forward, PyTorch forward | "
            "saferl_jax sample, PyTorch sample | saferl_jax update, PyTorch update (DDPO's loop) |",
            "|---|---|---|---|---|"]
  for r in rows:
    if r.get("forward_flops"):
      flops = r["forward_flops"] / 1e9
      work = STEPS * flops
      lines.append(f"| {r['batch']} | {r['forward_flops'] / 1e6:.2f} | "
                   f"{flops / r['jax_forward_s']:.1f}, {flops / r['torch_best_forward_s']:.1f} | "
                   f"{work / r['jax_sample_s']:.1f}, {work / r['torch_best_sample_s']:.1f} | "
                   f"{3 * work / r['jax_update_s']:.1f}, "
                   f"{3 * work / r['torch_best_update_s']:.1f} |")
  lines += ["", "saferl_jax compilation (first call), seconds: " + ", ".join(
      f"B = {r['batch']}: sample {r['jax_sample_compile_s']:.1f}, update "
      f"{r['jax_update_compile_s']:.1f}" for r in rows) + ".", "",
            "Agreement (same weights). Log-probs: torch's DDPO formula (diffusers' float32 "
            "alphas_cumprod) re-evaluating the trajectory saferl_jax sampled, and both against "
            "float64 (schedule and formula; the same float32 eps). Loss and gradient: at the same "
            "parameters, each side's own log-probs as the old ones (ratio 1), torch's stacked "
            "form.", "",
            "| B | timesteps equal | max abs diff alphas_cumprod | eps max abs diff (max abs eps) | "
            "log-prob max abs diff saferl_jax vs torch (rel.; same alphas) | vs float64: "
            "saferl_jax, torch | loss saferl_jax / torch | gradient rel. diff (same alphas) |",
            "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['batch']} | {r['timesteps_equal']} | {r['alphas_cumprod_max_abs_diff']:.1e} | "
                 f"{r['eps_max_abs_diff']:.1e} ({r['eps_scale']:.2f}) | "
                 f"{r['log_prob_max_abs_diff']:.1e} ({r['log_prob_max_rel_diff']:.1e}; "
                 f"{r['log_prob_max_abs_diff_same_alphas']:.1e}) | "
                 f"{r['log_prob_jax_vs_float64']:.1e}, {r['log_prob_torch_vs_float64']:.1e} | "
                 f"{r['loss_jax']:.2e} / {r['loss_torch']:.2e} | {r['grad_rel_diff']:.1e} "
                 f"({r['grad_rel_diff_same_alphas']:.1e}) |")
  lines += ["", "Memory, MB. Trajectory: states, log-probs, timesteps and conditions as stored. "
            "XLA: the compiled function's memory analysis (arguments + outputs + temporaries). "
            "torch: the distinct storages autograd saves for backward (the whole stacked graph; "
            "one timestep's graph for DDPO's loop, which frees it before building the next).", "",
            "| B | trajectory | XLA sample: args + out + temp | XLA update: args + out + temp | "
            "XLA update, whole-trajectory gradient | torch saved for backward: stacked / per step |",
            "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['batch']} | {_mb(r['trajectory_bytes'])} | {_xla(r['jax_sample_memory'])} | "
        f"{_xla(r['jax_update_memory'])} | {_xla(r.get('jax_update_whole_memory'))} | "
        f"{_mb(r['torch_saved_for_backward_bytes'])} / "
        f"{_mb(r['torch_saved_for_backward_per_step_bytes'])} |")
  if any("peak_rss_jax" in r for r in rows):
    lines += ["", "Peak resident memory (VmHWM), MB, of a fresh process per side: after its imports "
              "(both import jax and numpy; the torch one also torch and diffusers, and never starts "
              "JAX's runtime), after setup (the model; for saferl_jax also XLA's compilation of "
              "both functions), and during one sampling and one update after the peak is reset to "
              "the current size (the torch process also runs the stacked update, after another "
              "reset).", "",
              "| B | saferl_jax: imports / setup / run | torch: imports / setup / run (DDPO "
              "loop) / run (stacked) |", "|---|---|---|"]
    fmt = lambda m, keys: " / ".join(f"{m[k]:.0f}" if k in m else "n/a" for k in keys)
    jax_keys = ("after_imports_MB", "setup_peak_MB", "run_peak_MB")
    torch_keys = jax_keys + ("run_stacked_peak_MB",)
    for r in rows:
      if "peak_rss_jax" in r:
        lines.append(f"| {r['batch']} | {fmt(r['peak_rss_jax'], jax_keys)} | "
                     f"{fmt(r['peak_rss_torch'], torch_keys)} |")
  return lines


def flow_markdown(rows_by_model: dict[str, list[dict]]) -> list[str]:
  first = next(iter(rows_by_model.values()))[0]
  lines = ["## Rectified flow: Flow-GRPO's SDE sampler", "",
           f"saferl_jax's `sample` with a `FlowSchedule` (t from {first['t_max']:g} down to "
           f"{first['t_min']:g} in S = {STEPS} equal steps, the network seeing t x "
           f"{first['time_scale']:g}, noise level a = {first['eta']}) against a Python loop over "
           "diffusers' FlowMatchEulerDiscreteScheduler (shift 1, given the same times as sigmas) "
           "calling the torch network and Flow-GRPO's `sde_step_with_logprob` (written out in "
           "benchmarks/torch_diffusion_side.py, log-density summed) under torch.no_grad(). "
           "The networks are the DDIM cases' (used as velocity networks; timings do not depend on "
           "the weights).", ""]
  for name, rows in rows_by_model.items():
    lines += [f"### {name}: {MODELS[name].description}", ""]
    lines += _timing_table(rows, (
        ("sample S steps with log-probs: `sample` / Flow-GRPO's loop", "jax_sample_s", "sample_s"),
        ("the same, `sample` inside jax.jit", "jax_sample_in_jit_s", "sample_s")))
    lines.append("")
  lines += ["Agreement: the times (saferl_jax's grid and its end 0 against diffusers' sigmas; the "
            "network's time input against diffusers' timesteps); Flow-GRPO's formula in torch "
            "re-evaluating the log-probs saferl_jax recorded (same states), and both against "
            "float64 (formula and times; the same float32 velocities).", "",
            "| network | B | times max abs diff (network input) | max abs state | log-prob max abs "
            "diff saferl_jax vs torch | vs float64: saferl_jax, torch | XLA sample: args + out + "
            "temp, MB |", "|---|---|---|---|---|---|---|"]
  for name, rows in rows_by_model.items():
    for r in rows:
      lines.append(f"| {name} | {r['batch']} | {r['times_max_abs_diff']:.1e} "
                   f"({r['model_times_max_abs_diff']:.1e}) | {r['max_abs_state']:.2f} | "
                   f"{r['log_prob_max_abs_diff']:.1e} | {r['log_prob_jax_vs_float64']:.1e}, "
                   f"{r['log_prob_torch_vs_float64']:.1e} | {_xla(r['jax_sample_memory'])} |")
  return lines


def lora_markdown(rows_by_model: dict[str, list[dict]]) -> list[str]:
  first = next(iter(rows_by_model.values()))[0]
  total = lambda m: sum(m[f] for f in ("argument_size_in_bytes", "output_size_in_bytes",
                                       "temp_size_in_bytes"))
  lines = ["## LoRA: the memory of a LOOP update", "",
           f"One jitted LOOP update (stepwise gradient, Adam) on a stored DDIM trajectory, training "
           f"all weights or only rank-{first['rank']} LoRA adapters (`add_lora` on every dense and "
           "im2col convolution layer, `lora_functional`: the adapters are the argument "
           "differentiated and optimised, the base weights a frozen argument). With the KL term "
           f"(weight {first['kl_weight']}), full fine-tuning passes the reference weights as a "
           "second copy; LoRA's reference is the same base with the adapters' B set to 0 "
           "(`disable_adapters`). XLA's memory analysis of the compiled update, MB: arguments "
           "(weights, Adam's moments, the trajectory) + outputs (new weights and moments) + "
           "temporaries (activations, gradients); no buffer donation. Seconds: median per call.", "",
           "| network | B | trainable parameters: all / LoRA | update: all weights | update: LoRA | "
           "total MB, LoRA / all | update + KL: all weights | update + KL: LoRA | total MB, LoRA "
           "/ all | seconds: all, LoRA, all + KL, LoRA + KL |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, rows in rows_by_model.items():
    for r in rows:
      lines.append(
          f"| {name} | {r['batch']} | {r['parameters']:,} / {r['lora_trainable_parameters']:,} | "
          f"{_xla(r['full_memory'])} | {_xla(r['lora_memory'])} | "
          f"{_mb(total(r['lora_memory']))} / {_mb(total(r['full_memory']))} | "
          f"{_xla(r['full_kl_memory'])} | {_xla(r['lora_kl_memory'])} | "
          f"{_mb(total(r['lora_kl_memory']))} / {_mb(total(r['full_kl_memory']))} | "
          f"{r['full_update_s']:.4f}, {r['lora_update_s']:.4f}, {r['full_kl_update_s']:.4f}, "
          f"{r['lora_kl_update_s']:.4f} |")
  return lines


def jax_only_markdown(results: dict) -> list[str]:
  """The saferl_jax side's tables (--no-torch): timings, agreement with float64, XLA memory."""
  lines = []
  ddim = {name: rows for name, rows in results["cases"].items() if name in MODELS}
  if ddim:
    lines += ["## DDIM: sampling and a LOOP update", "",
              f"S = {STEPS} DDIM steps, eta = {ETA}, B = P prompts x K = {K}. Seconds per call; "
              "compilation (first call) apart. Log-probs: the largest difference from a float64 "
              "evaluation of the same steps. XLA memory: arguments + outputs + temporaries, MB.", "",
              "| network | B | forward | sample | sample in jit | LOOP update | update, whole "
              "gradient | compile: sample, update | log-prob vs float64 | XLA sample | XLA update |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in ddim.items():
      for r in rows:
        lines.append(f"| {name} | {r['batch']} | {r['jax_forward_s']:.5f} | {r['jax_sample_s']:.5f} | "
                     f"{r['jax_sample_in_jit_s']:.5f} | {r['jax_update_s']:.5f} | "
                     f"{r['jax_update_whole_s']:.5f} | {r['jax_sample_compile_s']:.1f}, "
                     f"{r['jax_update_compile_s']:.1f} | {r['log_prob_jax_vs_float64']:.1e} | "
                     f"{_xla(r['jax_sample_memory'])} | {_xla(r['jax_update_memory'])} |")
    lines.append("")
  flow = {name[len("flow_"):]: rows for name, rows in results["cases"].items()
          if name.startswith("flow_")}
  if flow:
    lines += ["## Rectified flow: Flow-GRPO's SDE sampler", "",
              "| network | B | sample | sample in jit | compile | log-prob vs float64 | XLA sample |",
              "|---|---|---|---|---|---|---|"]
    for name, rows in flow.items():
      for r in rows:
        lines.append(f"| {name} | {r['batch']} | {r['jax_sample_s']:.5f} | "
                     f"{r['jax_sample_in_jit_s']:.5f} | {r['jax_sample_compile_s']:.1f} | "
                     f"{r['log_prob_jax_vs_float64']:.1e} | {_xla(r['jax_sample_memory'])} |")
    lines.append("")
  lora = {name[len("lora_"):]: rows for name, rows in results["cases"].items()
          if name.startswith("lora_")}
  if lora:
    lines += lora_markdown(lora) + [""]
  lines.append(f"Reference: a 1024 x 1024 float32 matmul runs at {results['matmul_gflops']['jax']:.0f} "
               "GFLOP/s in XLA.")
  return lines


def markdown(results: dict) -> str:
  before, after = results["load_average_before"], results["load_average_after"]
  if not results.get("torch", True):
    return "\n".join([f"# Diffusion benchmark on {results['platform']}, saferl_jax only", "",
                      "The PyTorch comparison was left out (--no-torch: no PyTorch in this "
                      f"Python). Load average (1, 5, 15 min) {before} before the run and {after} "
                      "after.", ""] + jax_only_markdown(results)) + "\n"
  lines = [f"# Diffusion benchmark on {results['platform']}", "",
           "Seconds per call, median of the given repeats after a warm-up call (JAX compilation "
           "excluded, and shown apart). Log-probs summed over dimensions; rewards fixed (the mean "
           "of x_0). PyTorch is timed with all cores (torch.set_num_threads) and with one thread; "
           "the speed-up is against the faster of the two. The machine may be shared with other "
           "jobs: load average (1, 5, 15 min) "
           f"{before} before the run and {after} after; expect tens of percent of noise.", ""]
  cases = results["cases"]
  for name, rows in cases.items():
    if name in MODELS:
      lines += ddim_markdown(name, rows, results["matmul_gflops"]) + [""]
  for prefix, section in (("flow_", flow_markdown), ("lora_", lora_markdown)):
    found = {name[len(prefix):]: rows for name, rows in cases.items() if name.startswith(prefix)}
    if found:
      lines += section(found) + [""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
