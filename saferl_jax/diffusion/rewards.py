"""Rewards for fine-tuning the toy diffusion models, (floor 1: pure functions of samples).

Every reward scores a batch of final samples x_0 [B, *shape] and returns [B]; all run under
jit and vmap.

- `prompt_alignment_reward`: log p(prompted class | x_0) under a classifier (log-softmax of its
  logits), the digits task's stand-in for the text-image alignment rewards of DDPO. At most 0;
  log(1/10) is chance.
- `quality_reward`: minus the root-mean-square pixel distance from x_0 to its nearest reference
  (training) image, -min_j sqrt(mean((x_0 - r_j)^2)). A distance to the data manifold, sampled by
  the 1797 digits: 0 on a training image, about -0.5 for a blurred or noisy digit, below -1 for
  noise. Chosen over a range penalty (which any image in [-1, 1] satisfies) because it also
  penalises off-manifold images inside the range; being a nearest-neighbour score, it is
  maximised by copying a training image, so read it beside the alignment reward, not alone.
- `compressibility_reward`: minus the DEFLATE-compressed size of the image quantised to uint8,
  as a fraction of the raw size: -len(deflate(uint8(x_0))) / x_0.size. Computed by zlib on the
  host through `jax.pure_callback`, so it has no gradient: the black-box reward that only
  policy-gradient methods can use (DDPO's JPEG compressibility in miniature). -0.094 (6 bytes)
  for a constant 8x8 image, about -0.8 for a digit, -1.08 (a stored block of 69 bytes) for noise.
- `tilt_reward`: r(x) = a^T x for the 2-D mixture task, whose KL-regularised optimum is known in
  closed form (`saferl_jax.data.mixture2d.tilted_mixture`); with one direction per sample, the
  many-prompt 2-D task's r(x, u) = u^T x.
- `combine_rewards`: several rewards weighted into one, sum_k w_k r_k(x_0, c), with each part
  kept for logging (`CombinedReward.components`), as Flow-GRPO's `multi_score`.

Fine-tuning calls a reward as reward_fn(x0 [B, *shape], conditions) -> [B], where conditions are
the batch's prompts: an array or pytree of arrays with leading axis B
(`saferl_jax.diffusion.conditions`). What each reward here reads of them:

- `prompt_alignment_reward`: class ids int [B] (the digits task's conditions), as they are:
  `lambda x0, c: prompt_alignment_reward(classifier_fn, params, x0, c)`.
- `quality_reward`, `compressibility_reward`: nothing (they score x_0 alone):
  `lambda x0, c: quality_reward(x0, references)`.
- `tilt_reward`: a fixed direction [D] (the unconditional mixture task ignores c), or per-sample
  directions [B, D], the many-prompt task's prompts u: `lambda x0, u: scale * tilt_reward(x0, u)`.

The classifier itself is `saferl_jax.models.DigitClassifier`, fitted by
`saferl_jax.training.train_classifier`.

References:
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement
  Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  [LOOP] Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image
  Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
  [Flow-GRPO] Liu et al. Flow-GRPO: Training Flow Matching Models via Online RL. 2025.
  https://arxiv.org/abs/2505.05470
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import dataclasses
import functools
import zlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks


def prompt_alignment_reward(classifier_apply_fn: Callable, classifier_params: Any, x0: ArrayLike,
                            prompts: ArrayLike) -> jax.Array:
  """log p(prompt | x_0) = log_softmax(classifier logits)[prompt], one per sample.

  Args:
    classifier_apply_fn: apply_fn(params, images [B, H, W, C]) -> logits [B, num_classes].
    classifier_params: the classifier's parameters.
    x0: [B, H, W, C] generated images.
    prompts: [B] int prompted classes in [0, num_classes) (the digits task's conditions).

  Returns:
    [B] log-probabilities (<= 0).

  Example:
    >>> logits_fn = lambda params, x: jnp.stack([jnp.zeros(len(x)), jnp.log(3.0) * jnp.ones(len(x))], -1)
    >>> reward = prompt_alignment_reward(logits_fn, None, jnp.zeros((1, 8, 8, 1)), jnp.array([1]))
    >>> round(float(reward[0]), 4)  # log(3 / 4)
    -0.2877
  """
  x0 = checks.as_float("x0", x0)
  prompts = checks.as_int("prompts", prompts)
  if prompts.shape != x0.shape[:1]:
    raise ValueError(f"prompts: expected shape [B={x0.shape[0]}], got {prompts.shape}")
  log_probs = jax.nn.log_softmax(classifier_apply_fn(classifier_params, x0), axis=-1)
  checks.check_indices("prompts", prompts, log_probs.shape[-1], what="class")
  return jnp.take_along_axis(log_probs, prompts[:, None], axis=-1)[:, 0]


def quality_reward(x0: ArrayLike, reference_images: ArrayLike) -> jax.Array:
  """Minus the RMS pixel distance to the nearest reference image, -min_j sqrt(mean((x_0 - r_j)^2)).

  Args:
    x0: [B, *shape] generated samples.
    reference_images: [N, *shape] the data (e.g. the training digits).

  Returns:
    [B] rewards (<= 0; 0 exactly on a reference image).

  Example:
    >>> refs = jnp.stack([jnp.zeros((8, 8, 1)), jnp.ones((8, 8, 1))])
    >>> quality_reward(jnp.stack([refs[1], 0.5 * refs[1]]), refs).tolist()
    [0.0, -0.5]
  """
  x0 = checks.as_float("x0", x0)
  reference_images = checks.as_float("reference_images", reference_images)
  if x0.ndim < 2 or reference_images.shape[1:] != x0.shape[1:] or reference_images.shape[0] == 0:
    raise ValueError(f"reference_images: expected [N, {', '.join(map(str, x0.shape[1:]))}] to match "
                     f"x0 {x0.shape}, got {reference_images.shape}")
  return _nearest_rms_distance(x0, reference_images)


@jax.jit
def _nearest_rms_distance(x0: jax.Array, reference_images: jax.Array) -> jax.Array:
  x = x0.reshape(x0.shape[0], -1)
  refs = reference_images.reshape(reference_images.shape[0], -1)
  squared = (jnp.sum(x ** 2, -1)[:, None] - 2 * x @ refs.T + jnp.sum(refs ** 2, -1)[None, :])
  nearest = jnp.maximum(jnp.min(squared, axis=-1), 0.0) / x.shape[-1]
  return 0.0 - jnp.sqrt(nearest)  # 0.0, not -0.0, on a reference image


def _compressed_fractions(x: np.ndarray, sample_ndim: int, level: int) -> np.ndarray:
  """Host side: len(deflate(uint8 image)) / size for each sample in x [..., *sample_shape]."""
  x = np.asarray(x)
  batch_shape = x.shape[:x.ndim - sample_ndim]
  flat = x.reshape((-1,) + x.shape[x.ndim - sample_ndim:])
  pixels = np.round((np.clip(flat, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  size = pixels[0].size if pixels.shape[0] else 1
  sizes = [len(zlib.compress(image.tobytes(), level, wbits=-15)) for image in pixels]
  return (np.asarray(sizes, np.float32) / size).reshape(batch_shape)


def compressibility_reward(x0: ArrayLike, *, level: int = 9) -> jax.Array:
  """Minus the DEFLATE size of uint8(round((x_0 + 1) 127.5)) as a fraction of the raw size.

  Runs zlib on the host through `jax.pure_callback` (vmap_method="expand_dims": the callback
  receives a whole vmapped batch at once), so it works under jit and vmap but has no gradient.

  Args:
    x0: [B, *shape] samples in [-1, 1] (clipped before quantisation).
    level: zlib's compression level, 0..9.

  Returns:
    [B] rewards, -compressed bytes / pixels (a raw DEFLATE stream, no zlib header).

  Example:
    >>> compressibility_reward(jnp.full((1, 8, 8, 1), -1.0)).tolist()  # 64 zero bytes -> 6 bytes
    [-0.09375]
  """
  x0 = checks.as_float("x0", x0)
  if x0.ndim < 2:
    raise ValueError(f"x0: expected a batch [B, *shape], got shape {x0.shape}")
  if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, np.integer)):
    if isinstance(level, (float, np.floating)):
      raise ValueError(f"level: must be an int in 0..9, got {level!r}")
    raise TypeError(f"level: must be an int in 0..9, got {type(level).__name__} {level!r}")
  if not 0 <= level <= 9:
    raise ValueError(f"level: must be in 0..9, got {level}")
  callback = functools.partial(_compressed_fractions, sample_ndim=x0.ndim - 1, level=level)
  result = jax.ShapeDtypeStruct(x0.shape[:1], jnp.float32)
  return -jax.pure_callback(callback, result, x0, vmap_method="expand_dims")


def tilt_reward(x: ArrayLike, direction: ArrayLike) -> jax.Array:
  """r(x) = a^T x, the linear reward of the 2-D mixture task (one a, or one per sample).

  Args:
    x: [..., D] samples.
    direction: [D] the direction a, or [..., D] (the shape of x) one direction per sample, such as
      the many-prompt task's prompts u.

  Returns:
    [...] rewards.

  Example:
    >>> tilt_reward(jnp.array([[1.0, 2.0], [3.0, -1.0]]), jnp.array([1.0, 1.0])).tolist()
    [3.0, 2.0]
    >>> tilt_reward(jnp.array([[1.0, 2.0], [3.0, -1.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])).tolist()
    [1.0, -1.0]
  """
  x = checks.as_float("x", x)
  direction = checks.as_float("direction", direction)
  if direction.ndim == 1 and x.ndim >= 1 and x.shape[-1] == direction.shape[0]:
    return x @ direction
  if direction.ndim > 1 and direction.shape == x.shape:
    return jnp.sum(x * direction, axis=-1)
  raise ValueError(f"direction: expected shape [D] with D = x.shape[-1], or x's shape (one direction "
                   f"per sample), got {direction.shape} for x {x.shape}")


# Several rewards in one.


class RewardComponents(NamedTuple):
  """A combined reward and its parts.

  Attributes:
    total: [B] sum_k w_k r_k(x_0, c).
    by_name: {name: [B]} each reward r_k before weighting, in the order given.
  """
  total: jax.Array
  by_name: dict


@dataclasses.dataclass(frozen=True, eq=False)
class CombinedReward:
  """reward_fn(x0, conditions) = sum_k w_k r_k(x0, conditions); made by `combine_rewards`.

  Calling it returns the total [B] (what fine-tuning optimises); `components` returns the total
  and each part from one evaluation of every reward (what a training loop logs).

  Attributes:
    names: the rewards' names.
    reward_fns: reward_fn(x0 [B, *shape], conditions) -> [B], one per name.
    weights: one weight per name.
  """
  names: tuple
  reward_fns: tuple
  weights: tuple

  def __call__(self, x0: ArrayLike, conditions: Any) -> jax.Array:
    return self.components(x0, conditions).total

  def components(self, x0: ArrayLike, conditions: Any) -> RewardComponents:
    """The weighted total [B] and every reward [B] by name (`RewardComponents`)."""
    shape = jnp.shape(x0)
    if len(shape) < 1:
      raise ValueError(f"x0: expected a batch [B, *shape], got shape {shape}")
    by_name = {}
    for name, reward_fn in zip(self.names, self.reward_fns):
      value = jnp.asarray(reward_fn(x0, conditions))
      if value.shape != shape[:1]:
        raise ValueError(f"reward_fns[{name!r}]: must return one reward per sample, shape "
                         f"[B={shape[0]}], got {value.shape}")
      by_name[name] = value
    total = sum(weight * by_name[name] for name, weight in zip(self.names, self.weights))
    return RewardComponents(total, by_name)


def combine_rewards(reward_fns: Mapping[str, Callable] | Sequence[Callable],
                    weights: Mapping[str, float] | Sequence[float]) -> CombinedReward:
  """Several rewards as one: r(x_0, c) = sum_k w_k r_k(x_0, c), each part kept for logging.

  Rewards on different scales (a log-probability near -0.1, a compressed size near -0.8) are
  weighted before they are summed; the advantages (`saferl_jax.diffusion.losses`) then
  standardise the total, so only the ratios of the weights matter there.

  Args:
    reward_fns: {name: reward_fn} or a sequence of reward_fn (named "reward_0", "reward_1", ...),
      each reward_fn(x0 [B, *shape], conditions) -> [B], jittable to be used in fine-tuning.
    weights: {name: w} with the same names, or a sequence of the same length; finite floats.

  Returns:
    A `CombinedReward`: call it for the total [B]; `.components(x0, conditions)` gives the total
    and each reward by name.

  Example:
    >>> reward = combine_rewards({"mean": lambda x, c: x.mean(-1), "first": lambda x, c: x[:, 0]},
    ...                          {"mean": 1.0, "first": -0.5})
    >>> x0 = jnp.array([[1.0, 3.0], [2.0, 2.0]])
    >>> reward(x0, None).tolist()
    [1.5, 1.0]
    >>> {name: r.tolist() for name, r in reward.components(x0, None).by_name.items()}
    {'mean': [2.0, 2.0], 'first': [1.0, 2.0]}

  References:
    [Flow-GRPO] Liu et al. Flow-GRPO: Training Flow Matching Models via Online RL. 2025. https://arxiv.org/abs/2505.05470
  """
  if isinstance(reward_fns, Mapping):
    names = tuple(reward_fns)
    for name in names:
      if not isinstance(name, str):
        raise TypeError(f"reward_fns: names must be strings, got {type(name).__name__} {name!r}")
    if not isinstance(weights, Mapping):
      raise TypeError(f"weights: must be a dict with reward_fns' names {list(names)}, got "
                      f"{type(weights).__name__}")
    if set(weights) != set(names):
      raise ValueError(f"weights: must have reward_fns' names {list(names)}, got {list(weights)}")
    functions, weights = tuple(reward_fns.values()), tuple(weights[name] for name in names)
  elif isinstance(reward_fns, Sequence) and not isinstance(reward_fns, (str, bytes)):
    names, functions = tuple(f"reward_{k}" for k in range(len(reward_fns))), tuple(reward_fns)
    if isinstance(weights, Mapping) or not isinstance(weights, Sequence) \
        or isinstance(weights, (str, bytes)):
      raise TypeError(f"weights: must be a sequence like reward_fns, got {type(weights).__name__}")
    if len(weights) != len(functions):
      raise ValueError(f"weights: has {len(weights)} entries for {len(functions)} reward_fns")
    weights = tuple(weights)
  else:
    raise TypeError(f"reward_fns: must be a dict {{name: reward_fn}} or a sequence of reward_fn, "
                    f"got {type(reward_fns).__name__}")
  if not functions:
    raise ValueError("reward_fns: needs at least one reward")
  for name, function in zip(names, functions):
    if not callable(function):
      raise TypeError(f"reward_fns[{name!r}]: must be callable, got {type(function).__name__}")
  for name, weight in zip(names, weights):
    checks.check_real(f"weights[{name!r}]", weight)
  return CombinedReward(names, functions, weights)
