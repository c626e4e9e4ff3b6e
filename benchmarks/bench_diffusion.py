"""Benchmark: diffusion sampling with log-probs and a LOOP update, saferl_jax against torch + diffusers.

    python benchmarks/bench_diffusion.py [--quick] [--repeats N] [--batches 32 256]

Both sides run the same denoiser: saferl_jax's `ConvDenoiser` (8x8x1 digits, a two-level U-Net of
GroupNorm, SiLU and 3x3 convolutions, 32 and 64 channels, 199k parameters) and a PyTorch nn.Module
of the same architecture (NCHW) with the JAX weights copied in (checked: eps agrees to ~2e-6). The
weights are a random initialisation: timings do not depend on their values. B samples = P prompts
x K = 4, S = 20 stochastic DDIM steps, eta = 1, T = 1000 linear schedule, log-probs summed over
the 64 dimensions (saferl_jax's reduce="sum").

1. Sampling: saferl_jax `sample` (one jitted lax.scan, compiled by a warm-up call; also timed
   inside an outer jax.jit, as in a jitted training round) against the DDPO pipeline: a Python
   loop over the timesteps of diffusers' DDIMScheduler ("leading" spacing, steps_offset=1,
   set_alpha_to_one=False; the same timesteps as `sampling_timesteps`, checked), calling the torch
   denoiser and DDPO's `ddim_step_with_logprob` (written out below) under torch.no_grad(),
   keeping every state and log-prob.
2. One LOOP update on the stored trajectory of all B samples and S steps: log-probs recomputed
   under the parameters, LOOP (leave-one-out) advantages of fixed rewards, PPO's clipped loss
   (clip 0.2), backward, one Adam step. saferl_jax: one jitted function (`trajectory_log_probs`,
   `loop_advantages`, `ppo_loss`, `stepwise_value_and_grad`, optax.adam), and for comparison
   jax.value_and_grad of the whole S-step recomputation. PyTorch: autograd and
   torch.optim.Adam, two ways: DDPO's loop (forward and backward per timestep, gradients
   accumulated) and all S steps stacked into one forward of S*B images.
3. Memory: the stored trajectory's bytes; XLA's memory analysis of each compiled JAX function
   (arguments, outputs, temporaries); for torch the bytes autograd saves for backward (a
   saved-tensors hook, distinct storages); and, unless --quick, the peak resident memory
   (VmHWM, Linux) of a fresh process per side: after its imports, after setup (for JAX including
   the compilation), and while running both cases once (the peak reset first).

4. Arithmetic rate: XLA's FLOP count of one forward pass, divided into the timings (an update
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
100 times slower than one thread on these small tensors. XLA uses its default thread pool. Medians
still move by tens of percent between runs on a busy machine. On a GPU, JAX runs there and torch
uses CUDA when its build has it (synchronised before each clock read). Results go to
benchmarks/results/diffusion_<platform>.json and .md. PyTorch and diffusers are needed only here
(`pip install torch diffusers`; neither is a saferl_jax dependency).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax.models.denoisers import ConvDenoiser
from saferl_jax.diffusion.losses import loop_advantages, ppo_loss
from saferl_jax.diffusion.sampler import sample, stepwise_value_and_grad, trajectory_log_probs
from saferl_jax.diffusion.schedules import linear_schedule, sampling_timesteps
from saferl_jax.models.functional import as_functional
from timing import platform_description, write_results

T, STEPS, ETA, K, CLIP, LEARNING_RATE = 1000, 20, 1.0, 4, 0.2, 1e-4
SHAPE, NUM_CLASSES, CHANNELS = (8, 8, 1), 10, 32


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


# The JAX side.


def jax_model(seed: int = 0) -> ConvDenoiser:
  return ConvDenoiser(num_classes=NUM_CLASSES, channels=CHANNELS, rngs=nnx.Rngs(seed))


def jax_prompts(batch: int, seed: int = 1) -> jax.Array:
  if batch % K:
    raise ValueError(f"batch: must be a multiple of K = {K}, got {batch}")
  return jax.random.randint(jax.random.key(seed), (batch // K,), 0, NUM_CLASSES)


def jax_sampler(apply_fn, schedule):
  def run(params, prompts, key):
    return sample(apply_fn, params, prompts, key=key, schedule=schedule, num_steps=STEPS, eta=ETA,
                  samples_per_condition=K, shape=SHAPE)
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


def forward_flops(apply_fn, params, batch: int) -> float | None:
  """XLA's count of floating-point operations in one forward pass of the denoiser on B samples."""
  x = jnp.zeros((batch,) + SHAPE)
  t = c = jnp.zeros((batch,), jnp.int32)
  analysis = jax.jit(apply_fn).lower(params, x, t, c).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def matmul_gflops(repeats: int, n: int = 1024) -> dict:
  """The machine's reference rate: an n x n float32 matrix product, in XLA and in torch (best threads)."""
  import torch
  a = jax.random.normal(jax.random.key(0), (n, n))
  product = jax.jit(lambda a: a @ a)
  jax.block_until_ready(product(a))
  rates = {"jax": 2 * n**3 / median_seconds(lambda: jax.block_until_ready(product(a)), repeats) / 1e9}
  b = torch.randn(n, n, device=torch_device())
  torch_rates = []
  for threads in torch_thread_counts():
    torch.set_num_threads(threads)
    torch_rates.append(2 * n**3 / median_seconds(lambda: b @ b, repeats, torch_sync) / 1e9)
  torch.set_num_threads(os.cpu_count() or 1)
  rates["torch"] = max(torch_rates)
  return rates


def rewards_of(x0) -> jax.Array:
  """A fixed, cheap reward (the mean pixel): the update's cost does not depend on it."""
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


# The PyTorch side: the same network, diffusers' scheduler, DDPO's step with log-prob.


def torch_modules():
  import torch
  from torch import nn
  from torch.nn import functional as F

  class Block(nn.Module):
    """h + conv(silu(norm(conv(silu(norm(h))) + bias(e)))), as saferl_jax's ResidualBlock."""

    def __init__(self, cin, cout, features, groups=8):
      super().__init__()
      self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
      self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
      self.bias = nn.Linear(features, cout)
      self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
      self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
      self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, h, e):
      y = self.conv1(F.silu(self.norm1(h))) + self.bias(e)[:, :, None, None]
      y = self.conv2(F.silu(self.norm2(y)))
      return (h if self.skip is None else self.skip(h)) + y

  class TorchConvDenoiser(nn.Module):
    """saferl_jax's ConvDenoiser in NCHW: embeddings, 8x8 -> 4x4 -> 8x8 U-Net with a skip."""

    def __init__(self, num_classes=NUM_CLASSES, channels=CHANNELS, time_embedding_dim=32):
      super().__init__()
      features, half = 4 * channels, time_embedding_dim // 2
      self.register_buffer("frequencies", torch.exp(
          -math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half))
      self.time_in = nn.Linear(time_embedding_dim, features)
      self.time_out = nn.Linear(features, features)
      self.classes = nn.Embedding(num_classes + 1, features)
      self.conv_in = nn.Conv2d(1, channels, 3, padding=1)
      self.block_down = Block(channels, channels, features)
      self.downsample = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
      self.block_mid = Block(2 * channels, 2 * channels, features)
      self.upsample = nn.Conv2d(2 * channels, channels, 3, padding=1)
      self.block_up = Block(2 * channels, channels, features)
      self.norm_out = nn.GroupNorm(8, channels, eps=1e-6)
      self.conv_out = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x, t, condition):
      angles = t.to(torch.float32)[:, None] * self.frequencies
      time = self.time_out(F.silu(self.time_in(torch.cat([angles.sin(), angles.cos()], -1))))
      e = F.silu(time + self.classes(condition))
      h = self.conv_in(x)
      skip = self.block_down(h, e)
      h = self.block_mid(self.downsample(skip), e)
      h = self.upsample(F.interpolate(h, scale_factor=2, mode="nearest"))
      h = self.block_up(torch.cat([h, skip], 1), e)
      return self.conv_out(F.silu(self.norm_out(h)))

  return TorchConvDenoiser


def torch_device():
  import torch
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync():
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def torch_from_jax(jax_model: ConvDenoiser):
  """A TorchConvDenoiser with jax_model's weights (PatchConv kernels [k^2 C, C'] -> [C', C, k, k])."""
  import torch
  net = torch_modules()().to(torch_device())
  tensor = lambda a: torch.tensor(np.asarray(a), device=torch_device())

  def conv(dst, src):
    k = src.kernel_size
    kernel = np.asarray(src.kernel[...]).reshape(k, k, src.in_features, -1)
    dst.weight.data.copy_(tensor(kernel.transpose(3, 2, 0, 1)))
    dst.bias.data.copy_(tensor(src.bias[...]))

  def linear(dst, src):
    dst.weight.data.copy_(tensor(np.asarray(src.kernel[...]).T))
    dst.bias.data.copy_(tensor(src.bias[...]))

  def norm(dst, src):
    dst.weight.data.copy_(tensor(src.scale[...]))
    dst.bias.data.copy_(tensor(src.bias[...]))

  def block(dst, src):
    norm(dst.norm1, src.norm1), conv(dst.conv1, src.conv1), linear(dst.bias, src.bias)
    norm(dst.norm2, src.norm2), conv(dst.conv2, src.conv2)
    if src.skip is not None:
      dst.skip.weight.data.copy_(tensor(np.asarray(src.skip.kernel[...]).T[:, :, None, None]))
      dst.skip.bias.data.copy_(tensor(src.skip.bias[...]))

  linear(net.time_in, jax_model.embedding.time_in)
  linear(net.time_out, jax_model.embedding.time_out)
  net.classes.weight.data.copy_(tensor(jax_model.embedding.classes.embedding[...]))
  for name in ("conv_in", "downsample", "upsample", "conv_out"):
    conv(getattr(net, name), getattr(jax_model, name))
  for name in ("block_down", "block_mid", "block_up"):
    block(getattr(net, name), getattr(jax_model, name))
  norm(net.norm_out, jax_model.norm_out)
  return net


def ddim_scheduler():
  from diffusers import DDIMScheduler
  scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4,
                            beta_end=0.02, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                            timestep_spacing="leading")
  scheduler.set_timesteps(STEPS)
  return scheduler


def ddim_step_with_logprob(scheduler, eps, timestep, x, eta, prev_sample=None, generator=None):
  """DDPO's `ddim_step_with_logprob` (diffusers_patch/ddim_with_logprob.py), log-prob summed.

  x0hat = (x - sqrt(1 - a_t) eps) / sqrt(a_t); std = eta sqrt(variance(t, t')); mean =
  sqrt(a_t') x0hat + sqrt(1 - a_t' - std^2) eps; x_t' = mean + std z; log N(x_t'; mean, std^2).
  """
  import torch
  prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
  prev_timestep = torch.clamp(prev_timestep, 0, scheduler.config.num_train_timesteps - 1)
  alphas_cumprod = scheduler.alphas_cumprod
  alpha_prod_t = alphas_cumprod[timestep]
  alpha_prod_t_prev = torch.where(prev_timestep >= 0, alphas_cumprod[prev_timestep],
                                  scheduler.final_alpha_cumprod)
  beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
  pred_original_sample = (x - beta_prod_t**0.5 * eps) / alpha_prod_t**0.5
  variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
  std_dev_t = eta * variance**0.5
  pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * eps
  prev_sample_mean = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
  if prev_sample is None:
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    prev_sample = prev_sample_mean + std_dev_t * noise
  log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std_dev_t**2)
              - torch.log(std_dev_t) - math.log(math.sqrt(2 * math.pi)))
  return prev_sample, log_prob.sum(dim=tuple(range(1, log_prob.ndim)))


def torch_sample(net, scheduler, prompts, generator=None):
  """DDPO's pipeline_with_logprob loop: every state and log-prob of S steps, no gradients."""
  import torch
  with torch.no_grad():
    scheduler.set_timesteps(STEPS, device=prompts.device)
    conditions = prompts.repeat_interleave(K)
    batch = conditions.shape[0]
    x = torch.randn((batch, SHAPE[2], SHAPE[0], SHAPE[1]), generator=generator,
                    device=prompts.device)
    states, log_probs = [x], []
    for t in scheduler.timesteps:
      eps = net(x, t.expand(batch), conditions)
      x, log_prob = ddim_step_with_logprob(scheduler, eps, t, x, ETA, generator=generator)
      states.append(x)
      log_probs.append(log_prob)
    return torch.stack(states), torch.stack(log_probs), conditions


def torch_loop_loss_terms(scheduler, log_probs, old_log_probs, rewards):
  """LOOP advantages and PPO's clipped loss per (step, sample), as DDPO writes it."""
  import torch
  groups = rewards.view(-1, K)
  advantages = (groups - (groups.sum(1, keepdim=True) - groups) / (K - 1)).reshape(-1)
  ratio = torch.exp(log_probs - old_log_probs)
  unclipped = -advantages * ratio
  clipped = -advantages * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
  return torch.maximum(unclipped, clipped)


def torch_update_per_step(net, optimizer, scheduler, states, old_log_probs, conditions, rewards):
  """DDPO's training loop: per timestep a forward and a backward (gradients accumulate), one step."""
  batch = conditions.shape[0]
  optimizer.zero_grad()
  total = 0.0
  for j, t in enumerate(scheduler.timesteps):
    eps = net(states[j], t.expand(batch), conditions)
    _, log_prob = ddim_step_with_logprob(scheduler, eps, t, states[j], ETA,
                                         prev_sample=states[j + 1])
    loss = torch_loop_loss_terms(scheduler, log_prob, old_log_probs[j], rewards).mean() / STEPS
    loss.backward()
    total += loss.detach()
  optimizer.step()
  return total


def torch_stacked_loss(net, scheduler, states, old_log_probs, conditions, rewards):
  """All S steps as one forward of S*B images (the steps of a stored trajectory are independent)."""
  import torch
  steps, batch = old_log_probs.shape
  timesteps = scheduler.timesteps
  x = states[:-1].reshape((steps * batch,) + states.shape[2:])
  eps = net(x, timesteps.repeat_interleave(batch), conditions.repeat(steps))
  view = lambda v: v.reshape((steps, batch) + states.shape[2:])
  prev_timesteps = torch.clamp(timesteps - T // STEPS, 0, T - 1)
  a_t = scheduler.alphas_cumprod.to(x.device)[timesteps].view(steps, 1, 1, 1, 1)
  a_prev = scheduler.alphas_cumprod.to(x.device)[prev_timesteps].view(steps, 1, 1, 1, 1)
  # ddim_step_with_logprob's formula with per-step coefficients broadcast over the stack.
  x0hat = (view(x) - (1 - a_t) ** 0.5 * view(eps)) / a_t**0.5
  std = ETA * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
  mean = a_prev**0.5 * x0hat + (1 - a_prev - std**2) ** 0.5 * view(eps)
  log_prob = (-((states[1:] - mean) ** 2) / (2 * std**2) - torch.log(std)
              - math.log(math.sqrt(2 * math.pi))).sum(dim=(2, 3, 4))
  return torch_loop_loss_terms(scheduler, log_prob, old_log_probs, rewards[None]).mean()


def torch_update_stacked(net, optimizer, scheduler, states, old_log_probs, conditions, rewards):
  optimizer.zero_grad()
  loss = torch_stacked_loss(net, scheduler, states, old_log_probs, conditions, rewards)
  loss.backward()
  optimizer.step()
  return loss.detach()


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


# Timing.


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


def torch_thread_counts() -> list[int]:
  """All cores, and one thread: on a busy machine torch's OpenMP threads can wait on each other."""
  cores = os.cpu_count() or 1
  return [cores] if torch_device().type == "cuda" or cores == 1 else [cores, 1]


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


def to_torch(a):
  import torch
  return torch.tensor(np.asarray(a), device=torch_device())


def nchw(states):
  """[..., H, W, C] -> [..., C, H, W]."""
  a = np.asarray(states)
  return np.moveaxis(a, -1, -3).copy()


def run_batch(model: ConvDenoiser, batch: int, repeats: int) -> dict:
  import torch
  torch.manual_seed(0)
  schedule = linear_schedule(T)
  apply_fn, params = as_functional(model)
  prompts = jax_prompts(batch)
  net = torch_from_jax(model)
  scheduler = ddim_scheduler()
  row = {"batch": batch, "prompts": batch // K, "samples_per_prompt": K, "steps": STEPS,
         "repeats": repeats}

  # Agreement: the timesteps, the schedules, eps.
  ours = sampling_timesteps(T, STEPS)
  theirs = scheduler.timesteps.cpu().numpy()
  theirs_prev = np.clip(theirs - T // STEPS, 0, T - 1)
  row["timesteps_equal"] = bool(np.array_equal(np.asarray(ours.timesteps), theirs)
                                and np.array_equal(np.asarray(ours.previous), theirs_prev))
  row["alphas_cumprod_max_abs_diff"] = float(np.max(np.abs(
      np.asarray(schedule.alphas_cumprod, np.float64) - scheduler.alphas_cumprod.numpy())))
  keys = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(keys[0], (batch,) + SHAPE)
  t = jax.random.randint(keys[1], (batch,), 0, T)
  c = jax.random.randint(keys[2], (batch,), 0, NUM_CLASSES + 1)
  eps_jax = np.asarray(jax.jit(apply_fn)(params, x, t, c))
  with torch.no_grad():
    eps_torch = net(to_torch(nchw(x)), to_torch(t).long(), to_torch(c).long()).cpu().numpy()
  row["eps_max_abs_diff"] = float(np.max(np.abs(nchw(eps_jax) - eps_torch)))
  row["eps_scale"] = float(np.max(np.abs(eps_jax)))

  # 1. Sampling.
  run_sample = jax_sampler(apply_fn, schedule)
  key = jax.random.key(3)
  start = time.perf_counter()
  trajectory = jax.block_until_ready(run_sample(params, prompts, key))
  row["jax_sample_compile_s"] = time.perf_counter() - start
  row["jax_sample_s"] = median_seconds(
      lambda: jax.block_until_ready(run_sample(params, prompts, key)), repeats)
  in_jit = jax.jit(run_sample)  # as inside a jitted training round: no Python-side checks per call
  row["jax_sample_in_jit_s"] = median_seconds(
      lambda: jax.block_until_ready(in_jit(params, prompts, key)), repeats)

  # Teacher forcing: torch's DDPO formula on the states saferl_jax sampled, and both against float64.
  states = to_torch(nchw(trajectory.states))
  conditions = to_torch(trajectory.conditions).long()
  with torch.no_grad():
    torch_lp = torch.stack([
        ddim_step_with_logprob(scheduler, net(states[j], tj.expand(batch), conditions), tj,
                               states[j], ETA, prev_sample=states[j + 1])[1]
        for j, tj in enumerate(scheduler.timesteps)])
  jax_lp, torch_lp_np = np.asarray(trajectory.log_probs), torch_lp.cpu().numpy()
  apply = jax.jit(apply_fn)
  eps_steps = np.stack([np.asarray(apply(params, trajectory.states[j], jnp.full((batch,), tj),
                                         trajectory.conditions))
                        for j, tj in enumerate(np.asarray(trajectory.timesteps))])
  exact = reference_log_probs(eps_steps, np.asarray(trajectory.states), trajectory.timesteps,
                              trajectory.previous_timesteps)
  row["log_prob_max_abs_diff"] = float(np.max(np.abs(torch_lp_np - jax_lp)))
  row["log_prob_max_rel_diff"] = float(np.max(np.abs(torch_lp_np - jax_lp) / np.abs(jax_lp)))
  row["log_prob_jax_vs_float64"] = float(np.max(np.abs(jax_lp - exact)))
  row["log_prob_torch_vs_float64"] = float(np.max(np.abs(torch_lp_np - exact)))
  row["log_prob_range"] = [float(jax_lp.min()), float(jax_lp.max())]

  # 2. One LOOP update.
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
  row["forward_flops"] = forward_flops(apply_fn, params, batch)
  old_log_probs, rewards_torch = to_torch(trajectory.log_probs), to_torch(rewards)
  args = (scheduler, states, old_log_probs, conditions, rewards_torch)

  # The loss and gradient at the same parameters, before torch's optimiser moves them. Each side's
  # old log-probs are its own evaluation of the stored steps (ratio 1 exactly), so the check is of
  # the two gradients, not of the float32 rounding of the log-probs themselves.
  jax_loss, jax_grads = jax.jit(jax.value_and_grad(loss_fn))(params, trajectory, rewards)
  net.zero_grad()
  torch_loss = torch_stacked_loss(net, scheduler, states, torch_lp, conditions, rewards_torch)
  torch_loss.backward()
  torch_grads = copy_grads_to_jax_layout(net, model, jax_grads)
  jax_flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(jax_grads)])
  row["loss_jax"], row["loss_torch"] = float(jax_loss), float(torch_loss.detach())
  row["grad_rel_diff"] = float(np.linalg.norm(jax_flat - torch_grads) / np.linalg.norm(jax_flat))
  # The same with diffusers' alphas_cumprod replaced by saferl_jax's (float64-computed, then float32):
  # what is left is the two formulas' float32 rounding.
  scheduler_ours = ddim_scheduler()
  scheduler_ours.alphas_cumprod = torch.tensor(np.asarray(schedule.alphas_cumprod))
  scheduler_ours.final_alpha_cumprod = scheduler_ours.alphas_cumprod[0]
  with torch.no_grad():
    torch_lp_ours = torch.stack([
        ddim_step_with_logprob(scheduler_ours, net(states[j], tj.expand(batch), conditions), tj,
                               states[j], ETA, prev_sample=states[j + 1])[1]
        for j, tj in enumerate(scheduler_ours.timesteps)])
  row["log_prob_max_abs_diff_same_alphas"] = float(np.max(np.abs(torch_lp_ours.numpy() - jax_lp)))
  net.zero_grad()
  torch_stacked_loss(net, scheduler_ours, states, torch_lp_ours, conditions, rewards_torch).backward()
  torch_grads = copy_grads_to_jax_layout(net, model, jax_grads)
  row["grad_rel_diff_same_alphas"] = float(np.linalg.norm(jax_flat - torch_grads)
                                           / np.linalg.norm(jax_flat))

  # Torch's timings, with all cores and with one thread.
  prompts_torch = to_torch(prompts).long()
  generator = torch.Generator(device=torch_device()).manual_seed(0)
  torch_optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
  row["torch"] = {}
  for threads in torch_thread_counts():
    torch.set_num_threads(threads)
    row["torch"][threads] = {
        "sample_s": median_seconds(
            lambda: torch_sample(net, scheduler, prompts_torch, generator), repeats, torch_sync),
        "update_s": median_seconds(
            lambda: torch_update_per_step(net, torch_optimizer, *args), repeats, torch_sync),
        "stacked_update_s": median_seconds(
            lambda: torch_update_stacked(net, torch_optimizer, *args), repeats, torch_sync)}
  torch.set_num_threads(os.cpu_count() or 1)
  for case, ours in (("sample_s", "jax_sample_s"), ("update_s", "jax_update_s"),
                     ("stacked_update_s", "jax_update_s")):
    threads = min(row["torch"], key=lambda n: row["torch"][n][case])
    row[f"torch_best_{case}"] = row["torch"][threads][case]
    row[f"torch_best_{case}_threads"] = threads
    row[f"speedup_{case}"] = row["torch"][threads][case] / row[ours]

  # 3. Memory.
  row["trajectory_bytes"] = int(sum(np.asarray(a).nbytes for a in trajectory))
  row["param_bytes"] = int(sum(np.asarray(p).nbytes for p in jax.tree_util.tree_leaves(params)))
  row["jax_sample_memory"] = memory_analysis(
      jax.jit(run_sample).lower(params, prompts, key).compile())
  row["jax_update_memory"] = memory_analysis(
      update.lower(params, opt_state, trajectory, rewards).compile())
  row["jax_update_whole_memory"] = memory_analysis(
      update_whole.lower(params, opt_state, trajectory, rewards).compile())
  row["torch_saved_for_backward_bytes"] = saved_tensor_bytes(
      lambda: torch_stacked_loss(net, *args))
  row["torch_saved_for_backward_per_step_bytes"] = saved_tensor_bytes(
      lambda: torch_update_per_step_graph_only(net, *args))
  return row


def torch_update_per_step_graph_only(net, scheduler, states, old_log_probs, conditions, rewards):
  """One timestep's graph of DDPO's loop (its backward frees it before the next step is built)."""
  batch = conditions.shape[0]
  t = scheduler.timesteps[0]
  eps = net(states[0], t.expand(batch), conditions)
  _, log_prob = ddim_step_with_logprob(scheduler, eps, t, states[0], ETA, prev_sample=states[1])
  return torch_loop_loss_terms(scheduler, log_prob, old_log_probs[0], rewards).mean()


def copy_grads_to_jax_layout(net, model, jax_grads) -> np.ndarray:
  """torch's gradients in the order and layout of jax_grads' leaves (by mapping the weights back)."""
  grads = {name: p.grad.detach().cpu().numpy() for name, p in net.named_parameters()}
  flat = []
  paths = jax.tree_util.tree_flatten_with_path(jax_grads)[0]
  for path, leaf in paths:
    names = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    module, field = names[:-1], names[-1]
    if module[0] == "embedding":
      module = module[1:]
    torch_name = ".".join(module)
    if module == ["classes"]:
      g = grads["classes.weight"]
    elif field == "kernel" and leaf.ndim == 2 and torch_name + ".weight" in grads:
      g = grads[torch_name + ".weight"]
      if g.ndim == 4 and g.shape[2:] == (1, 1):  # the 1x1 skip
        g = g[:, :, 0, 0].T
      elif g.ndim == 4:  # [C', C, k, k] -> [k, k, C, C'] -> [k^2 C, C']
        g = g.transpose(2, 3, 1, 0).reshape(leaf.shape)
      else:
        g = g.T
    elif field == "scale":
      g = grads[torch_name + ".weight"]
    else:
      g = grads[torch_name + "." + field]
    if g.shape != leaf.shape:
      raise ValueError(f"gradient layout mismatch at {names}: {g.shape} vs {leaf.shape}")
    flat.append(np.ravel(g))
  return np.concatenate(flat)


# Peak resident memory, one fresh process per side.


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current resident size (Linux >= 4.0); False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as clear_refs:
      clear_refs.write("5")
    return True
  except OSError:
    return False


def memory_side(side: str, batch: int) -> dict:
  """Peak RSS of one side in this (fresh) process: after imports, after setup, during the run."""
  out = {"after_imports_MB": rss_mb()}
  if side == "jax":
    schedule = linear_schedule(T)
    apply_fn, params = as_functional(jax_model())
    prompts, key = jax_prompts(batch), jax.random.key(3)
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(params)
    sampler = jax.jit(jax_sampler(apply_fn, schedule))
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
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)  # torch's own initialisation: no JAX runtime in this process
    net = torch_modules()().to(torch_device())
    prompts = torch.randint(0, NUM_CLASSES, (batch // K,), device=torch_device())
    scheduler = ddim_scheduler()
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    out["setup_peak_MB"] = rss_mb()
    if reset_peak_rss():
      states, log_probs, conditions = torch_sample(net, scheduler, prompts)
      args = (scheduler, states, log_probs, conditions, states[-1].mean(dim=(1, 2, 3)))
      torch_update_per_step(net, optimizer, *args)
      out["run_peak_MB"] = rss_mb()
      reset_peak_rss()
      torch_update_stacked(net, optimizer, *args)
      out["run_stacked_peak_MB"] = rss_mb()
  return out


def measure_memory_in_subprocess(side: str, batch: int) -> dict:
  out = subprocess.run([sys.executable, __file__, "--memory-side", side, "--batches", str(batch)],
                       capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="3 repeats and no peak-RSS subprocesses")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls per case at B = 32 (default 10; scaled by 32 / B, at least 3)")
  parser.add_argument("--batches", type=int, nargs="+", default=[32],
                      help="samples per batch, multiples of K = 4 (default 32; e.g. 32 256)")
  parser.add_argument("--memory-side", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  batches = args.batches
  if args.memory_side:  # a child process: peak RSS of one side only
    if args.memory_side == "torch":  # imported before the first reading, as jax is
      for name in ("torch", "diffusers"):
        importlib.import_module(name)
    print(json.dumps(memory_side(args.memory_side, batches[0])))
    return
  repeats = args.repeats or (3 if args.quick else 10)

  import torch
  torch.set_num_threads(os.cpu_count())
  model = jax_model()
  rows = []
  for batch in batches:
    row = run_batch(model, batch, max(3, repeats * 32 // batch))
    if not args.quick:
      row["peak_rss_jax"] = measure_memory_in_subprocess("jax", batch)
      row["peak_rss_torch"] = measure_memory_in_subprocess("torch", batch)
    rows.append(row)
    print(json.dumps(row), flush=True)

  import diffusers
  results = {
      "platform": platform_description(
          f", torch {torch.__version__} ({torch_device()}; timed with "
          f"{' and '.join(map(str, torch_thread_counts()))} threads), "
          f"diffusers {diffusers.__version__}"),
      "setup": {"shape": SHAPE, "channels": CHANNELS, "num_train_timesteps": T, "steps": STEPS,
                "eta": ETA, "samples_per_prompt": K, "clip_range": CLIP, "reduce": "sum",
                "learning_rate": LEARNING_RATE, "repeats_at_32": repeats,
                "denoiser_parameters": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(
                    nnx.state(model, nnx.Param))))},
      "rows": rows, "matmul_gflops": matmul_gflops(repeats)}
  write_results("diffusion", results, markdown(results))


def markdown(results: dict) -> str:
  rows = results["rows"]
  mb = lambda b: b / 2**20
  lines = [f"# Diffusion sampling and LOOP update benchmark on {results['platform']}", "",
           f"ConvDenoiser (8x8x1, {results['setup']['denoiser_parameters']:,} parameters, random "
           f"weights, copied into an equal PyTorch module), B = P prompts x K = {K}, S = {STEPS} "
           f"DDIM steps, eta = {ETA}, log-probs summed over dimensions. Seconds per call, median "
           "of the given repeats after a warm-up call (JAX compilation excluded, and shown "
           "apart). The machine may be shared with other jobs: expect tens of percent of noise.", "",
           "PyTorch is timed with all cores (torch.set_num_threads) and with one thread; the "
           "speed-up is against the faster of the two.", "",
           "| case | B | repeats (at most) | saferl_jax | " + " | ".join(
               f"PyTorch, {n} thread{'s' if n > 1 else ''}" for n in rows[0]["torch"])
           + " | speed-up vs faster PyTorch |",
           "|---|---|---|---|" + "---|" * len(rows[0]["torch"]) + "---|"]
  cases = (("sample S steps with log-probs: `sample` / DDPO's loop", "jax_sample_s", "sample_s"),
           ("the same, `sample` inside jax.jit", "jax_sample_in_jit_s", "sample_s"),
           ("LOOP update: saferl_jax / DDPO's loop (backward per step)", "jax_update_s", "update_s"),
           ("LOOP update: saferl_jax / torch with the S steps stacked in one forward",
            "jax_update_s", "stacked_update_s"),
           ("LOOP update, gradient of the whole S-step recomputation / DDPO's loop",
            "jax_update_whole_s", "update_s"))
  for r in rows:
    for name, ours, theirs in cases:
      best = min(v[theirs] for v in r["torch"].values())
      lines.append(f"| {name} | {r['batch']} | {r['repeats']} | {r[ours]:.4f} | " + " | ".join(
          f"{v[theirs]:.4f}" for v in r["torch"].values()) + f" | {best / r[ours]:.2f}x |")
  rates = results["matmul_gflops"]
  lines += ["", "saferl_jax's LOOP update sums per-step gradients in a lax.scan "
            "(`stepwise_value_and_grad`, as `finetune` does); the last case differentiates the "
            "whole S-step recomputation instead.", "",
            f"Arithmetic rate (XLA's FLOP count of one forward pass; an update counted as 3 forward "
            f"passes per step). Reference: a 1024 x 1024 float32 matmul runs at "
            f"{rates['jax']:.0f} GFLOP/s in XLA and {rates['torch']:.0f} GFLOP/s in torch on this "
            "machine.", "", "| B | MFLOP per forward pass | GFLOP/s: saferl_jax sample, PyTorch "
            "sample | saferl_jax update, PyTorch update (DDPO's loop) |", "|---|---|---|---|"]
  for r in rows:
    if r.get("forward_flops"):
      work = STEPS * r["forward_flops"] / 1e9
      lines.append(f"| {r['batch']} | {r['forward_flops'] / 1e6:.0f} | "
                   f"{work / r['jax_sample_s']:.0f}, {work / r['torch_best_sample_s']:.0f} | "
                   f"{3 * work / r['jax_update_s']:.0f}, {3 * work / r['torch_best_update_s']:.0f} |")
  lines += ["", "saferl_jax compilation (first call), seconds: " + ", ".join(
      f"B = {r['batch']}: sample {r['jax_sample_compile_s']:.1f}, update "
      f"{r['jax_update_compile_s']:.1f}" for r in rows) + ".", "",
            "Agreement (same weights). Log-probs: torch's DDPO formula (diffusers' float32 "
            "alphas_cumprod) re-evaluating the trajectory saferl_jax sampled, and both against "
            "float64 (schedule and formula; the same float32 eps): the differences sit in the last two "
            "steps (sigma ~ 0.007 and 0.02), where float32 cancellation in 1 - alphabar_t / "
            "alphabar_t' and 1 - alphabar_t' - sigma^2 moves a 64-dimension log-density by ~1e-2; "
            "the other steps agree to ~1e-4. Loss and gradient: at the same parameters, each side's own "
            "log-probs as the old ones (ratio 1), torch's stacked form.", "",
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

  def xla(m):
    if not m:
      return "n/a"
    return (f"{mb(m['argument_size_in_bytes']):.2f} + {mb(m['output_size_in_bytes']):.2f} + "
            f"{mb(m['temp_size_in_bytes']):.2f}")

  for r in rows:
    lines.append(
        f"| {r['batch']} | {mb(r['trajectory_bytes']):.2f} | {xla(r['jax_sample_memory'])} | "
        f"{xla(r['jax_update_memory'])} | {xla(r.get('jax_update_whole_memory'))} | "
        f"{mb(r['torch_saved_for_backward_bytes']):.2f} / "
        f"{mb(r['torch_saved_for_backward_per_step_bytes']):.2f} |")
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
        lines.append(
            f"| {r['batch']} | "
            f"{fmt(r['peak_rss_jax'], jax_keys)} | {fmt(r['peak_rss_torch'], torch_keys)} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
