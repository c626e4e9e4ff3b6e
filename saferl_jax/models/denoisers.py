"""Noise-prediction networks eps_theta(x_t, t, c) as Flax NNX modules (floor 2).

Every denoiser is called as `model(x_t [B, *shape], t [B], condition [B, ...])` and returns
eps [B, *shape], the noise that x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps carries
(DDPM's epsilon parameterisation), or, trained with `saferl_jax.diffusion.flow`'s loss, the velocity
of a rectified flow. `t` is the training timestep in [0, T) (or a flow's scaled float time).

The condition goes through a swappable encoder: by default (`num_classes=`) a `ClassEncoder`, a
class in [0, num_classes) or the null token `num_classes` (a table of num_classes + 1 rows);
`VectorEncoder` for continuous vectors [B, C], `SequenceEncoder` for sequences of embeddings
[B, L, E], or any module with the same two methods (`__call__` to [B, features] and
`null_condition()`). Training with label dropout (the condition replaced by the null condition with
some probability) makes one network both conditional and unconditional, which classifier-free
guidance combines: eps = eps_u + w (eps_c - eps_u).

The timestep enters through the sinusoidal embedding of the Transformer (`sinusoidal_embedding`)
followed by a small MLP; the condition through its encoder; their sum conditions every block
(added to the hidden units of the MLP, a per-channel bias in the conv net). There is no batch
normalisation: each example's output depends on that example only.

- `MLPDenoiser`: vectors [B, D] (the 2-D mixture task).
- `ConvDenoiser`: 8x8x1 images (the digits task): a small U-Net, 8x8 -> 4x4 -> 8x8 with a skip
  connection, residual blocks of GroupNorm, SiLU and 3x3 convolutions.

The convolutions are `PatchConv`: the k x k neighbourhoods gathered by k^2 shifted slices, then one
matrix product (im2col). On XLA:CPU a convolution's gradient inside a while loop (lax.scan: the
pretraining loop, the per-step gradients of a policy-gradient update) runs far slower than outside
one (jax-ml/jax#12868): with XLA's own gradient, the digits U-Net's stepwise LOOP update (20 steps)
took many times longer than with this one (docs/benchmarks.md). The matrix-product form runs at
full speed in both places, and on an accelerator it costs little.

References:
  [DDPM] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020.
  https://arxiv.org/abs/2006.11239
  [CFG] Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. https://arxiv.org/abs/2207.12598
  Vaswani et al. Attention Is All You Need. NeurIPS 2017 (sinusoidal embedding).
  https://arxiv.org/abs/1706.03762
  Convolution is significantly slower inside a loop body (CPU). https://github.com/jax-ml/jax/issues/12868
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.models.functional import _check_sizes


def sinusoidal_embedding(t: ArrayLike, dim: int, *, max_period: float = 10_000.0) -> jax.Array:
  """[sin(t f_i), cos(t f_i)] with frequencies f_i = max_period^(-i / (dim / 2)), i < dim / 2.

  Args:
    t: [...] timesteps (integers or floats).
    dim: embedding size, even and >= 2.
    max_period: the longest period, 2 pi max_period.

  Returns:
    [..., dim] embeddings: the sines, then the cosines.

  Example:
    >>> sinusoidal_embedding(jnp.array([0]), 4).tolist()
    [[0.0, 0.0, 1.0, 1.0]]
  """
  if checks.check_count("dim", dim, low=2) % 2:
    raise ValueError(f"dim: must be even and >= 2, got {dim}")
  if isinstance(max_period, bool) or not isinstance(max_period, (int, float)):
    raise TypeError(f"max_period: must be a real number, got {type(max_period).__name__} "
                    f"{max_period!r}")
  if not (math.isfinite(max_period) and max_period > 1):
    raise ValueError(f"max_period: must be finite and > 1, got {max_period}")
  half = dim // 2
  frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(t, jnp.float32)[..., None] * frequencies
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _check_inputs(x: jax.Array, t: jax.Array, sample_ndim: int) -> None:
  """Shapes and dtypes are static, so these checks run while tracing."""
  if x.ndim != 1 + sample_ndim:
    raise ValueError(f"x: expected a batch [B, ...] with {sample_ndim} sample axes, got shape {x.shape}")
  if t.shape != x.shape[:1]:
    raise ValueError(f"t: expected shape [B={x.shape[0]}], got {t.shape}")
  if not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
    raise ValueError(f"t: must be an integer or float array, got dtype {t.dtype}")


# Condition encoders: conditions [B, ...] -> [B, features]. Each knows its null condition (the
# input that stands for "no condition", shaped as one condition), which label dropout and
# classifier-free guidance feed it.


class ClassEncoder(nnx.Module):
  """E[c] for class ids c in [0, num_classes], a table of num_classes + 1 rows (the last: the null token).

  Example:
    >>> encoder = ClassEncoder(3, features=4, rngs=nnx.Rngs(0))
    >>> encoder(jnp.array([0, 3])).shape, encoder.null_condition()
    ((2, 4), 3)
  """

  def __init__(self, num_classes: int, *, features: int, rngs: nnx.Rngs):
    checks.check_count("num_classes", num_classes)
    checks.check_count("features", features)
    self.num_classes = num_classes
    self.table = nnx.Embed(num_classes + 1, features, rngs=rngs)

  def null_condition(self) -> int:
    return self.num_classes

  def __call__(self, condition: jax.Array) -> jax.Array:
    if condition.ndim != 1 or not jnp.issubdtype(condition.dtype, jnp.integer):
      raise ValueError(f"condition: class ids must be an integer array [B], got shape "
                       f"{condition.shape} and dtype {condition.dtype}")
    return self.table(condition)


class VectorEncoder(nnx.Module):
  """W2 silu(W1 c + b1) + b2 for continuous conditions c [B, C] (a direction, an embedding).

  The null condition is the zero vector: train with label dropout to give it its meaning.

  Example:
    >>> encoder = VectorEncoder(2, features=8, rngs=nnx.Rngs(0))
    >>> encoder(jnp.ones((5, 2))).shape, encoder.null_condition().tolist()
    ((5, 8), [0.0, 0.0])
  """

  def __init__(self, condition_dim: int, *, features: int, rngs: nnx.Rngs):
    checks.check_count("condition_dim", condition_dim)
    checks.check_count("features", features)
    self.condition_dim = condition_dim
    self.hidden = nnx.Linear(condition_dim, features, rngs=rngs)
    self.out = nnx.Linear(features, features, rngs=rngs)

  def null_condition(self) -> jax.Array:
    return jnp.zeros((self.condition_dim,), jnp.float32)

  def __call__(self, condition: jax.Array) -> jax.Array:
    if condition.shape[1:] != (self.condition_dim,) or condition.ndim != 2:
      raise ValueError(f"condition: expected vectors [B, {self.condition_dim}], got shape "
                       f"{condition.shape}")
    return self.out(nnx.silu(self.hidden(condition.astype(jnp.float32))))


class SequenceEncoder(nnx.Module):
  """Attention pooling of a sequence of embeddings c [B, L, E] (a text encoder's output) to [B, features].

  h = sum_l softmax_l(q . W_k c_l / sqrt(features)) W_v c_l with a learned query q, then a linear
  layer. The null condition is a sequence of L zero embeddings (as a prompt-free embedding).

  Example:
    >>> encoder = SequenceEncoder(6, length=4, features=8, rngs=nnx.Rngs(0))
    >>> encoder(jnp.ones((3, 4, 6))).shape, encoder.null_condition().shape
    ((3, 8), (4, 6))
  """

  def __init__(self, embedding_dim: int, *, length: int, features: int, rngs: nnx.Rngs):
    checks.check_count("embedding_dim", embedding_dim)
    checks.check_count("length", length)
    checks.check_count("features", features)
    self.embedding_dim, self.length, self.features = embedding_dim, length, features
    self.query = nnx.Param(jax.random.normal(rngs.params(), (features,)) / math.sqrt(features))
    self.keys = nnx.Linear(embedding_dim, features, rngs=rngs)
    self.values = nnx.Linear(embedding_dim, features, rngs=rngs)
    self.out = nnx.Linear(features, features, rngs=rngs)

  def null_condition(self) -> jax.Array:
    return jnp.zeros((self.length, self.embedding_dim), jnp.float32)

  def __call__(self, condition: jax.Array) -> jax.Array:
    if condition.ndim != 3 or condition.shape[1:] != (self.length, self.embedding_dim):
      raise ValueError(f"condition: expected sequences [B, {self.length}, {self.embedding_dim}], "
                       f"got shape {condition.shape}")
    condition = condition.astype(jnp.float32)
    scores = self.keys(condition) @ self.query[...] / math.sqrt(self.features)  # [B, L]
    pooled = jnp.einsum("bl,blf->bf", jax.nn.softmax(scores, axis=-1), self.values(condition))
    return self.out(pooled)


class DictEncoder(nnx.Module):
  """sum_k encoder_k(c[k]) for a dict of conditions, one encoder per key (a class and a target value).

  Every encoder maps to the same [B, features]; the null condition is the dict of their nulls.

  Example:
    >>> encoder = DictEncoder({"digit": ClassEncoder(10, features=8, rngs=nnx.Rngs(0)),
    ...                        "ink": VectorEncoder(1, features=8, rngs=nnx.Rngs(1))})
    >>> encoder({"digit": jnp.array([3, 7]), "ink": jnp.ones((2, 1))}).shape
    (2, 8)
    >>> sorted(encoder.null_condition())
    ['digit', 'ink']
  """

  def __init__(self, encoders: dict):
    if not isinstance(encoders, dict) or not encoders:
      raise ValueError(f"encoders: must be a non-empty dict of condition encoders, got {encoders!r}")
    self.names = tuple(sorted(encoders))
    self.encoders = nnx.Dict({name: encoders[name] for name in self.names})

  def null_condition(self) -> dict:
    return {name: self.encoders[name].null_condition() for name in self.names}

  def __call__(self, condition: dict) -> jax.Array:
    if not isinstance(condition, dict) or set(condition) != set(self.names):
      got = sorted(condition) if isinstance(condition, dict) else type(condition).__name__
      raise ValueError(f"condition: expected a dict with keys {list(self.names)}, got {got}")
    return sum(self.encoders[name](condition[name]) for name in self.names)


class ConditionEmbedding(nnx.Module):
  """e(t, c) = MLP(sinusoidal(t)) + encoder(c); the encoder is a `ClassEncoder` unless one is given."""

  def __init__(self, *, num_classes: int | None = None, encoder: nnx.Module | None = None,
               time_embedding_dim: int, features: int, rngs: nnx.Rngs):
    if checks.check_count("time_embedding_dim", time_embedding_dim, low=2) % 2:
      raise ValueError(f"time_embedding_dim: must be even and >= 2, got {time_embedding_dim}")
    checks.check_count("features", features)
    if (num_classes is None) == (encoder is None):
      raise ValueError("condition_encoder: give either num_classes (class ids) or a "
                       "condition_encoder module, not both or neither")
    self.time_embedding_dim = time_embedding_dim
    self.features = features
    self.time_in = nnx.Linear(time_embedding_dim, features, rngs=rngs)
    self.time_out = nnx.Linear(features, features, rngs=rngs)
    self.encoder = (ClassEncoder(num_classes, features=features, rngs=rngs) if encoder is None
                    else encoder)

  def __call__(self, t: jax.Array, condition) -> jax.Array:
    time = self.time_out(nnx.silu(self.time_in(sinusoidal_embedding(t, self.time_embedding_dim))))
    encoded = self.encoder(condition)
    if encoded.shape != time.shape:
      raise ValueError(f"condition_encoder: must map the conditions to [B, {self.features}], got "
                       f"shape {encoded.shape}")
    return time + encoded


class _Conditioned(nnx.Module):
  """What every denoiser says about its conditions (through its condition encoder)."""

  def null_condition(self):
    """The condition that stands for "no condition" (label dropout, classifier-free guidance)."""
    return self.embedding.encoder.null_condition()

  @property
  def num_classes(self) -> int | None:
    """The number of classes of a class-id model, None for other conditions."""
    return getattr(self.embedding.encoder, "num_classes", None)


class MLPDenoiser(_Conditioned):
  """eps_theta for vectors: h <- silu(W_i h + U_i e(t, c)) per hidden layer, then a linear output.

  Args:
    data_dim: D, the size of a sample.
    num_classes: number of classes, for class-id conditions; `num_classes` itself is the null
      token (use 1 and condition 0 or the null token for an unconditional model).
    condition_encoder: instead of num_classes, a module mapping conditions [B, ...] to
      [B, hidden[0]] with a `null_condition()` method (`VectorEncoder`, `SequenceEncoder`, or yours).
    hidden: hidden layer sizes.
    time_embedding_dim: size of the sinusoidal timestep embedding.
    rngs: `nnx.Rngs` for the initial parameters.

  Example:
    >>> model = MLPDenoiser(2, num_classes=4, hidden=(32, 32), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((3, 2)), jnp.array([0, 5, 9]), jnp.array([0, 3, 4])).shape  # 4: the null token
    (3, 2)
  """

  def __init__(self, data_dim: int, *, num_classes: int | None = None,
               condition_encoder: nnx.Module | None = None, hidden: Sequence[int] = (128, 128, 128),
               time_embedding_dim: int = 32, rngs: nnx.Rngs):
    checks.check_count("data_dim", data_dim)
    hidden = _check_sizes("hidden", hidden, allow_empty=False)
    self.data_dim = data_dim
    self.embedding = ConditionEmbedding(num_classes=num_classes, encoder=condition_encoder,
                                        time_embedding_dim=time_embedding_dim, features=hidden[0],
                                        rngs=rngs)
    sizes = [data_dim, *hidden]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.condition_projections = nnx.List([nnx.Linear(hidden[0], b, rngs=rngs) for b in hidden])
    self.out = nnx.Linear(hidden[-1], data_dim, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, condition: jax.Array) -> jax.Array:
    _check_inputs(x, t, 1)
    embedding = nnx.silu(self.embedding(t, condition))
    h = x
    for layer, projection in zip(self.layers, self.condition_projections):
      h = nnx.silu(layer(h) + projection(embedding))
    return self.out(h)


def _patches(x: jax.Array, k: int, s: int) -> jax.Array:
  """[B, H', W', k^2 C]: the zero-padded k x k neighbourhood of every output position (im2col)."""
  pad = k // 2
  out_height, out_width = (x.shape[1] - 1) // s + 1, (x.shape[2] - 1) // s + 1
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return jnp.concatenate(
      [padded[:, di:di + s * (out_height - 1) + 1:s, dj:dj + s * (out_width - 1) + 1:s, :]
       for di in range(k) for dj in range(k)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, k: int, s: int) -> jax.Array:
  """_patches(x) @ kernel, computed forward by XLA's convolution; kernel [k^2 C, C']."""
  pad = k // 2
  return jax.lax.conv_general_dilated(
      x, kernel.reshape(k, k, x.shape[-1], kernel.shape[-1]), (s, s), ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_forward(x, kernel, k, s):
  return _conv(x, kernel, k, s), (x, kernel)


def _conv_backward(k, s, residuals, dy):
  """Both gradients as matrix products: d kernel = patches^T dy, dx = col2im(dy kernel^T)."""
  x, kernel = residuals
  d_kernel = jnp.einsum("bhwp,bhwo->po", _patches(x, k, s), dy)
  d_patches = dy @ kernel.T  # [B, H', W', k^2 C]
  pad, (batch, height, width, channels) = k // 2, x.shape
  out_height, out_width = dy.shape[1:3]
  d_padded = jnp.zeros((batch, height + 2 * pad, width + 2 * pad, channels), x.dtype)
  for n, (di, dj) in enumerate((di, dj) for di in range(k) for dj in range(k)):
    d_padded = d_padded.at[:, di:di + s * (out_height - 1) + 1:s, dj:dj + s * (out_width - 1) + 1:s, :].add(
        d_patches[..., n * channels:(n + 1) * channels])
  return d_padded[:, pad:pad + height, pad:pad + width, :], d_kernel


_conv.defvjp(_conv_forward, _conv_backward)


class PatchConv(nnx.Module):
  """A k x k convolution with SAME-style padding k // 2 and a stride, as im2col and one matmul.

  y[b, i, j] = sum_{di, dj < k} x_pad[b, s i + di, s j + dj] W[di, dj] + bias, with x zero-padded by
  k // 2 on every side (for stride 2 and an even size the output is half the input). The same
  function as lax.conv_general_dilated with padding ((k // 2, k // 2),) * 2, written with slices and
  a dot so that its gradient is fast inside lax.scan on CPU. The forward pass is XLA's convolution;
  the backward pass (a custom VJP) is two matrix products, so it supports reverse-mode
  differentiation (grad, vjp, vmap of grad) but not forward mode (jvp) or second derivatives.

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: k, odd.
    stride: s.
    rngs: `nnx.Rngs` for the kernel (LeCun normal, fan-in k^2 in_features); the bias starts at 0.

  Example:
    >>> conv = PatchConv(1, 4, stride=2, rngs=nnx.Rngs(0))
    >>> conv(jnp.zeros((2, 8, 8, 1))).shape
    (2, 4, 4, 4)
  """

  def __init__(self, in_features: int, out_features: int, *, kernel_size: int = 3, stride: int = 1,
               rngs: nnx.Rngs):
    checks.check_count("in_features", in_features)
    checks.check_count("out_features", out_features)
    if checks.check_count("kernel_size", kernel_size) % 2 == 0:
      raise ValueError(f"kernel_size: must be odd and >= 1, got {kernel_size}")
    checks.check_count("stride", stride)
    self.kernel_size = kernel_size
    self.stride = stride
    self.in_features = in_features
    init = jax.nn.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size * kernel_size * in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    batch_shape = x.shape[:-3]
    y = _conv(x.reshape((-1,) + x.shape[-3:]), self.kernel[...], self.kernel_size, self.stride)
    return y.reshape(batch_shape + y.shape[1:]) + self.bias[...]


class ResidualBlock(nnx.Module):
  """h + conv(silu(norm(conv(silu(norm(h))) + bias(e)))), the embedding as a per-channel bias."""

  def __init__(self, in_channels: int, out_channels: int, *, embedding_features: int, groups: int,
               rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(in_channels, num_groups=groups, rngs=rngs)
    self.conv1 = PatchConv(in_channels, out_channels, rngs=rngs)
    self.bias = nnx.Linear(embedding_features, out_channels, rngs=rngs)
    self.norm2 = nnx.GroupNorm(out_channels, num_groups=groups, rngs=rngs)
    self.conv2 = PatchConv(out_channels, out_channels, rngs=rngs)
    self.skip = (nnx.Linear(in_channels, out_channels, rngs=rngs)
                 if in_channels != out_channels else None)

  def __call__(self, h: jax.Array, embedding: jax.Array) -> jax.Array:
    y = self.conv1(nnx.silu(self.norm1(h)))
    y = y + self.bias(embedding)[:, None, None, :]
    y = self.conv2(nnx.silu(self.norm2(y)))
    return (h if self.skip is None else self.skip(h)) + y


class ConvDenoiser(_Conditioned):
  """eps_theta for 8x8x1 images: a two-level U-Net (8x8 with `channels`, 4x4 with 2 `channels`).

  conv_in -> block(8x8) -> stride-2 conv -> block(4x4) -> nearest upsample + conv -> concat the
  8x8 skip -> block(8x8) -> GroupNorm, SiLU, conv_out. The embedding e(t, c) is a per-channel
  bias inside every block.

  Args:
    num_classes: number of classes (10 digits) for class-id conditions; `num_classes` is the
      null token. Ignored when a condition_encoder is given.
    condition_encoder: a module mapping conditions [B, ...] to [B, 4 channels] with a
      `null_condition()` method (`VectorEncoder`, `SequenceEncoder`, or yours).
    channels: channels at 8x8 (a multiple of 8, the GroupNorm group count).
    time_embedding_dim: size of the sinusoidal timestep embedding.
    image_shape: (H, W, C) of the images, H and W even.
    rngs: `nnx.Rngs` for the initial parameters.

  Example:
    >>> model = ConvDenoiser(channels=16, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((4, 8, 8, 1)), jnp.array([0, 10, 500, 999]), jnp.array([0, 3, 9, 10])).shape
    (4, 8, 8, 1)
  """

  def __init__(self, *, num_classes: int = 10, condition_encoder: nnx.Module | None = None,
               channels: int = 32, time_embedding_dim: int = 32,
               image_shape: tuple[int, int, int] = (8, 8, 1), rngs: nnx.Rngs):
    groups = 8
    checks.check_count("num_classes", num_classes)
    if checks.check_count("channels", channels) < groups or channels % groups:
      raise ValueError(f"channels: must be a positive multiple of {groups}, got {channels}")
    height, width, image_channels = _check_sizes("image_shape", image_shape, length=3)
    if height % 2 or width % 2:
      raise ValueError(f"image_shape: height and width must be even, got {tuple(image_shape)}")
    self.image_shape = tuple(image_shape)
    features = 4 * channels
    wide = 2 * channels
    self.embedding = ConditionEmbedding(
        num_classes=None if condition_encoder is not None else num_classes,
        encoder=condition_encoder, time_embedding_dim=time_embedding_dim, features=features,
        rngs=rngs)
    self.conv_in = PatchConv(image_channels, channels, rngs=rngs)
    self.block_down = ResidualBlock(channels, channels, embedding_features=features, groups=groups,
                                    rngs=rngs)
    self.downsample = PatchConv(channels, wide, stride=2, rngs=rngs)
    self.block_mid = ResidualBlock(wide, wide, embedding_features=features, groups=groups, rngs=rngs)
    self.upsample = PatchConv(wide, channels, rngs=rngs)
    self.block_up = ResidualBlock(2 * channels, channels, embedding_features=features, groups=groups,
                                  rngs=rngs)
    self.norm_out = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)
    self.conv_out = PatchConv(channels, image_channels, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, condition: jax.Array) -> jax.Array:
    _check_inputs(x, t, 3)
    if x.shape[1:] != self.image_shape:
      raise ValueError(f"x: expected images [B, {', '.join(map(str, self.image_shape))}], got shape {x.shape}")
    embedding = nnx.silu(self.embedding(t, condition))
    h = self.conv_in(x)
    skip = self.block_down(h, embedding)
    h = self.block_mid(self.downsample(skip), embedding)
    h = self.upsample(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
    h = self.block_up(jnp.concatenate([h, skip], axis=-1), embedding)
    return self.conv_out(nnx.silu(self.norm_out(h)))
