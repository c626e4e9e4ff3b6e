"""The PyTorch side of bench_diffusion.py: the same denoisers, diffusers' schedulers, DDPO's and
Flow-GRPO's steps with log-probs, sampling loops and LOOP updates.

Nothing here imports JAX: the peak-memory child process of the torch side never starts JAX's
runtime. Weights arrive as numpy arrays named by their path in the JAX model, and gradients go back
the same way (`set_weights`, `grads_by_jax_path`): the torch modules use the JAX modules' attribute
names, so one rule per parameter kind converts the layouts.

Written from DDPO's `ddim_step_with_logprob` (kvablack/ddpo-pytorch,
ddpo_pytorch/diffusers_patch/ddim_with_logprob.py) and Flow-GRPO's `sde_step_with_logprob`
(yifan123/flow_grpo, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py), with the log-density
summed over dimensions (saferl_jax's reduce="sum"; both originals average).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def thread_counts() -> list[int]:
  """All cores, and one thread: on a busy machine torch's OpenMP threads can wait on each other."""
  cores = os.cpu_count() or 1
  return [cores] if device().type == "cuda" or cores == 1 else [cores, 1]


def tensor(a, dtype=None) -> torch.Tensor:
  return torch.tensor(np.asarray(a), device=device(), dtype=dtype)


# The networks: saferl_jax's denoisers with the JAX attribute names.


class SinusoidalEmbedding(nn.Module):
  """[sin(t f_i), cos(t f_i)], f_i = 10000^(-i / (dim / 2)), as saferl_jax's sinusoidal_embedding."""

  def __init__(self, dim: int):
    super().__init__()
    half = dim // 2
    self.register_buffer("frequencies", torch.exp(
        -math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half))

  def forward(self, t):
    angles = t.to(torch.float32)[:, None] * self.frequencies
    return torch.cat([angles.sin(), angles.cos()], -1)


class ClassEncoder(nn.Module):
  """table[c], num_classes + 1 rows (the last: the null token)."""

  def __init__(self, num_classes: int, features: int):
    super().__init__()
    self.table = nn.Embedding(num_classes + 1, features)

  def forward(self, condition):
    return self.table(condition)


class ConditionEmbedding(nn.Module):
  """e(t, c) = time_out(silu(time_in(sinusoidal(t)))) + encoder(c)."""

  def __init__(self, num_classes: int, time_embedding_dim: int, features: int):
    super().__init__()
    self.sinusoidal = SinusoidalEmbedding(time_embedding_dim)
    self.time_in = nn.Linear(time_embedding_dim, features)
    self.time_out = nn.Linear(features, features)
    self.encoder = ClassEncoder(num_classes, features)

  def forward(self, t, condition):
    return self.time_out(F.silu(self.time_in(self.sinusoidal(t)))) + self.encoder(condition)


class MLPDenoiser(nn.Module):
  """h <- silu(layers[i](h) + condition_projections[i](silu(e))), then out(h)."""

  def __init__(self, data_dim: int, num_classes: int, hidden=(128, 128, 128),
               time_embedding_dim: int = 32):
    super().__init__()
    self.embedding = ConditionEmbedding(num_classes, time_embedding_dim, hidden[0])
    sizes = [data_dim, *hidden]
    self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
    self.condition_projections = nn.ModuleList(nn.Linear(hidden[0], b) for b in hidden)
    self.out = nn.Linear(hidden[-1], data_dim)

  def forward(self, x, t, condition):
    e = F.silu(self.embedding(t, condition))
    h = x
    for layer, projection in zip(self.layers, self.condition_projections):
      h = F.silu(layer(h) + projection(e))
    return self.out(h)


class ResidualBlock(nn.Module):
  """h + conv2(silu(norm2(conv1(silu(norm1(h))) + bias(e)))), in NCHW."""

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


class ConvDenoiser(nn.Module):
  """saferl_jax's ConvDenoiser in NCHW: 8x8 -> 4x4 -> 8x8 U-Net with a skip."""

  def __init__(self, num_classes=10, channels=32, time_embedding_dim=32, image_channels=1):
    super().__init__()
    features = 4 * channels
    self.embedding = ConditionEmbedding(num_classes, time_embedding_dim, features)
    self.conv_in = nn.Conv2d(image_channels, channels, 3, padding=1)
    self.block_down = ResidualBlock(channels, channels, features)
    self.downsample = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
    self.block_mid = ResidualBlock(2 * channels, 2 * channels, features)
    self.upsample = nn.Conv2d(2 * channels, channels, 3, padding=1)
    self.block_up = ResidualBlock(2 * channels, channels, features)
    self.norm_out = nn.GroupNorm(8, channels, eps=1e-6)
    self.conv_out = nn.Conv2d(channels, image_channels, 3, padding=1)

  def forward(self, x, t, condition):
    e = F.silu(self.embedding(t, condition))
    h = self.conv_in(x)
    skip = self.block_down(h, e)
    h = self.block_mid(self.downsample(skip), e)
    h = self.upsample(F.interpolate(h, scale_factor=2, mode="nearest"))
    h = self.block_up(torch.cat([h, skip], 1), e)
    return self.conv_out(F.silu(self.norm_out(h)))


# Weights in, gradients out, by the JAX parameter path ("block_down.conv1.kernel").


# saferl_jax's class table before its condition encoders.
_RENAMED = {"embedding.classes.embedding": "embedding.encoder.table.embedding"}


def _torch_name(jax_path: str) -> str:
  module, _, field = _RENAMED.get(jax_path, jax_path).rpartition(".")
  field = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(field, field)
  return f"{module}.{field}"


def _to_torch_layout(path: str, a: np.ndarray, torch_shape) -> np.ndarray:
  """A JAX leaf in torch's layout: kernels [in, out] -> [out, in], or [k^2 C, C'] -> [C', C, k, k]."""
  if not path.endswith(".kernel"):
    return a
  if len(torch_shape) == 4:
    out, cin, k, _ = torch_shape
    return a.reshape(k, k, cin, out).transpose(3, 2, 0, 1)
  return a.T


def _to_jax_layout(path: str, g: np.ndarray, jax_shape) -> np.ndarray:
  if not path.endswith(".kernel"):
    return g
  if g.ndim == 4:  # [C', C, k, k] -> [k, k, C, C'] -> [k^2 C, C'] (a 1x1 skip gives [C, C'])
    return g.transpose(2, 3, 1, 0).reshape(jax_shape)
  return g.T


def set_weights(net: nn.Module, weights: dict[str, np.ndarray]) -> nn.Module:
  """Copies {jax path: array} into net (every torch parameter must be covered exactly once)."""
  params = dict(net.named_parameters())
  missing = set(params) - {_torch_name(p) for p in weights}
  if missing:
    raise ValueError(f"torch parameters without a JAX weight: {sorted(missing)}")
  with torch.no_grad():
    for path, a in weights.items():
      param = params[_torch_name(path)]
      a = _to_torch_layout(path, np.asarray(a), tuple(param.shape))
      if a.shape != tuple(param.shape):
        raise ValueError(f"{path}: shape {a.shape} does not fit torch's {tuple(param.shape)}")
      param.copy_(tensor(np.ascontiguousarray(a)))
  return net


def grads_by_jax_path(net: nn.Module, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
  """net's .grad of every parameter in the JAX layout, keyed by JAX path (shapes: path -> shape)."""
  params = dict(net.named_parameters())
  out = {}
  for path, shape in shapes.items():
    g = _to_jax_layout(path, params[_torch_name(path)].grad.detach().cpu().numpy(), shape)
    if g.shape != tuple(shape):
      raise ValueError(f"gradient layout mismatch at {path}: {g.shape} vs {tuple(shape)}")
    out[path] = g
  return out


# DDIM: diffusers' scheduler and DDPO's step.


def ddim_scheduler(num_train_steps: int, num_steps: int):
  from diffusers import DDIMScheduler
  scheduler = DDIMScheduler(num_train_timesteps=num_train_steps, beta_schedule="linear",
                            beta_start=1e-4, beta_end=0.02, clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
  scheduler.set_timesteps(num_steps)
  return scheduler


def ddim_step_with_logprob(scheduler, eps, timestep, x, eta, prev_sample=None, generator=None):
  """DDPO's `ddim_step_with_logprob`, log-prob summed over dimensions.

  x0hat = (x - sqrt(1 - a_t) eps) / sqrt(a_t); std = eta sqrt(variance(t, t')); mean =
  sqrt(a_t') x0hat + sqrt(1 - a_t' - std^2) eps; x_t' = mean + std z; log N(x_t'; mean, std^2).
  """
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


def ddim_sample(net, scheduler, prompts, *, shape, samples_per_prompt, eta, generator=None):
  """DDPO's pipeline_with_logprob loop: every state and log-prob of S steps, no gradients.

  Returns (states [S + 1, B, *shape], log_probs [S, B], conditions [B]); shape in torch's layout.
  """
  with torch.no_grad():
    scheduler.set_timesteps(scheduler.num_inference_steps, device=prompts.device)
    conditions = prompts.repeat_interleave(samples_per_prompt)
    batch = conditions.shape[0]
    x = torch.randn((batch,) + tuple(shape), generator=generator, device=prompts.device)
    states, log_probs = [x], []
    for t in scheduler.timesteps:
      eps = net(x, t.expand(batch), conditions)
      x, log_prob = ddim_step_with_logprob(scheduler, eps, t, x, eta, generator=generator)
      states.append(x)
      log_probs.append(log_prob)
    return torch.stack(states), torch.stack(log_probs), conditions


def ddim_teacher_forced(net, scheduler, states, conditions, eta):
  """log p(states[j + 1] | states[j]) of every stored step by DDPO's formula, no gradients: [S, B]."""
  batch = conditions.shape[0]
  with torch.no_grad():
    return torch.stack([
        ddim_step_with_logprob(scheduler, net(states[j], t.expand(batch), conditions), t, states[j],
                               eta, prev_sample=states[j + 1])[1]
        for j, t in enumerate(scheduler.timesteps)])


def loop_loss_terms(log_probs, old_log_probs, rewards, *, samples_per_prompt, clip_range):
  """LOOP advantages and PPO's clipped loss per (step, sample), as DDPO writes the latter."""
  k = samples_per_prompt
  groups = rewards.view(-1, k)
  advantages = (groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)).reshape(-1)
  ratio = torch.exp(log_probs - old_log_probs)
  unclipped = -advantages * ratio
  clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
  return torch.maximum(unclipped, clipped)


def ddim_update_per_step(net, optimizer, scheduler, states, old_log_probs, conditions, rewards, *,
                         eta, samples_per_prompt, clip_range):
  """DDPO's training loop: per timestep a forward and a backward (gradients accumulate), one step."""
  batch, steps = conditions.shape[0], len(scheduler.timesteps)
  optimizer.zero_grad()
  total = 0.0
  for j, t in enumerate(scheduler.timesteps):
    eps = net(states[j], t.expand(batch), conditions)
    _, log_prob = ddim_step_with_logprob(scheduler, eps, t, states[j], eta,
                                         prev_sample=states[j + 1])
    loss = loop_loss_terms(log_prob, old_log_probs[j], rewards, samples_per_prompt=samples_per_prompt,
                           clip_range=clip_range).mean() / steps
    loss.backward()
    total += loss.detach()
  optimizer.step()
  return total


def ddim_first_step_loss(net, scheduler, states, old_log_probs, conditions, rewards, *, eta,
                         samples_per_prompt, clip_range):
  """One timestep's graph of DDPO's loop (its backward frees it before the next step is built)."""
  batch, t = conditions.shape[0], scheduler.timesteps[0]
  eps = net(states[0], t.expand(batch), conditions)
  _, log_prob = ddim_step_with_logprob(scheduler, eps, t, states[0], eta, prev_sample=states[1])
  return loop_loss_terms(log_prob, old_log_probs[0], rewards, samples_per_prompt=samples_per_prompt,
                         clip_range=clip_range).mean()


def ddim_stacked_loss(net, scheduler, states, old_log_probs, conditions, rewards, *, eta,
                      samples_per_prompt, clip_range):
  """All S steps as one forward of S*B samples (the steps of a stored trajectory are independent)."""
  steps, batch = old_log_probs.shape
  sample_shape = tuple(states.shape[2:])
  timesteps = scheduler.timesteps
  num_train_steps = scheduler.config.num_train_timesteps
  x = states[:-1].reshape((steps * batch,) + sample_shape)
  eps = net(x, timesteps.repeat_interleave(batch), conditions.repeat(steps))
  view = lambda v: v.reshape((steps, batch) + sample_shape)
  prev_timesteps = torch.clamp(timesteps - num_train_steps // steps, 0, num_train_steps - 1)
  per_step = (steps,) + (1,) * (1 + len(sample_shape))
  a_t = scheduler.alphas_cumprod.to(x.device)[timesteps].view(per_step)
  a_prev = scheduler.alphas_cumprod.to(x.device)[prev_timesteps].view(per_step)
  # ddim_step_with_logprob's formula with per-step coefficients broadcast over the stack.
  x0hat = (view(x) - (1 - a_t) ** 0.5 * view(eps)) / a_t**0.5
  std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
  mean = a_prev**0.5 * x0hat + (1 - a_prev - std**2) ** 0.5 * view(eps)
  log_prob = (-((states[1:] - mean) ** 2) / (2 * std**2) - torch.log(std)
              - math.log(math.sqrt(2 * math.pi))).sum(dim=tuple(range(2, states.ndim)))
  return loop_loss_terms(log_prob, old_log_probs, rewards[None], samples_per_prompt=samples_per_prompt,
                         clip_range=clip_range).mean()


def update_stacked(loss_fn, net, optimizer, *args, **kwargs):
  optimizer.zero_grad()
  loss = loss_fn(net, *args, **kwargs)
  loss.backward()
  optimizer.step()
  return loss.detach()


# Rectified flow: diffusers' FlowMatchEulerDiscreteScheduler and Flow-GRPO's SDE step.


def flow_scheduler(sigmas, num_train_steps: int = 1000):
  """diffusers' FlowMatchEulerDiscreteScheduler (shift 1) on the given times t_0 > ... > t_{S-1}.

  Its sigmas are those times and a final 0 (t_S, data level), its timesteps sigmas * T: the
  network sees t * 1000, as saferl_jax's flow_schedule's time_scale.
  """
  from diffusers import FlowMatchEulerDiscreteScheduler
  scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_steps, shift=1.0)
  scheduler.set_timesteps(sigmas=[float(s) for s in sigmas])
  return scheduler


def sde_step_with_logprob(scheduler, velocity, timestep, x, noise_level, prev_sample=None,
                          generator=None):
  """Flow-GRPO's `sde_step_with_logprob` (sde_type "sde"), log-prob summed over dimensions.

  t = sigmas[i], t' = sigmas[i + 1] for the timestep's index i; std_t = a sqrt(t / (1 - t)) (t = 1
  replaced by the first time below it); with dt = t' - t < 0, mean = x (1 + std_t^2 dt / (2 t)) +
  v (1 + std_t^2 (1 - t) / (2 t)) dt, x_t' = mean + std_t sqrt(-dt) z, log N(x_t'; mean, std_t^2 (-dt)).
  """
  step_index = [scheduler.index_for_timestep(t) for t in timestep]
  view = (-1,) + (1,) * (x.ndim - 1)
  sigma = scheduler.sigmas[step_index].view(view).to(x.device)
  sigma_prev = scheduler.sigmas[[i + 1 for i in step_index]].view(view).to(x.device)
  sigma_max = scheduler.sigmas[1].item()
  dt = sigma_prev - sigma
  std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
  mean = (x * (1 + std_dev_t**2 / (2 * sigma) * dt)
          + velocity * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
  std = std_dev_t * torch.sqrt(-dt)
  if prev_sample is None:
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    prev_sample = mean + std * noise
  log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std)
              - math.log(math.sqrt(2 * math.pi)))
  return prev_sample, log_prob.sum(dim=tuple(range(1, log_prob.ndim)))


def flow_sample(net, scheduler, prompts, *, shape, samples_per_prompt, noise_level, generator=None):
  """Flow-GRPO's pipeline_with_logprob loop: every state and log-prob of S SDE steps, no gradients.

  Returns (states [S + 1, B, *shape], log_probs [S, B], conditions [B]); shape in torch's layout.
  """
  with torch.no_grad():
    conditions = prompts.repeat_interleave(samples_per_prompt)
    batch = conditions.shape[0]
    x = torch.randn((batch,) + tuple(shape), generator=generator, device=prompts.device)
    states, log_probs = [x], []
    for t in scheduler.timesteps:
      velocity = net(x, t.expand(batch).to(x.device), conditions)
      x, log_prob = sde_step_with_logprob(scheduler, velocity, t.unsqueeze(0), x, noise_level,
                                          generator=generator)
      states.append(x)
      log_probs.append(log_prob)
    return torch.stack(states), torch.stack(log_probs), conditions


def flow_teacher_forced(net, scheduler, states, conditions, noise_level):
  """log p(states[j + 1] | states[j]) of every stored step by Flow-GRPO's formula: [S, B]."""
  batch = conditions.shape[0]
  with torch.no_grad():
    return torch.stack([
        sde_step_with_logprob(scheduler, net(states[j], t.expand(batch), conditions), t.unsqueeze(0),
                              states[j], noise_level, prev_sample=states[j + 1])[1]
        for j, t in enumerate(scheduler.timesteps)])
