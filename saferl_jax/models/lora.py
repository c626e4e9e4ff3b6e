"""Low-rank adapters (LoRA) for the NNX denoisers, and the adapted model as a pure function (floor 2).

`add_lora` replaces every dense layer (`nnx.Linear`) and every im2col convolution (`PatchConv`,
whose kernel is a matrix [k^2 C_in, C_out]) of a model by a `LoRALayer` computing

  y = base(x) + (alpha / r) (x A) B,    A [in, r] random, B [r, out] = 0,

where x A is the input times A for a dense layer and the k x k convolution with kernel A for a
convolution. B = 0 makes the adapted model equal to the original at initialisation. The adapter
weights A, B are `nnx.LoRAParam`s (a subclass of `nnx.Param`), so the filter `nnx.LoRAParam`
separates them from the frozen weights: `lora_functional` splits the model into the trainable
adapters (small) and the base weights (everything else). Fine-tuning differentiates and optimises
the adapters only, keeps one copy of the base for every seed, and uses the adapters with B = 0
(`disable_adapters`) as the KL reference: the pretrained network, without a second copy of its
weights. `merge_lora` folds (alpha / r) A B into the base kernels for deployment. Embeddings and
normalisation layers keep their weights.

References:
  [LoRA] Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen. LoRA: Low-Rank Adaptation of Large
  Language Models. ICLR 2022. https://arxiv.org/abs/2106.09685
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement
  Learning. ICLR 2024 (LoRA for reward fine-tuning of diffusion models).
  https://arxiv.org/abs/2305.13301
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import filterlib

from saferl_jax import checks
# _conv is PatchConv's own im2col convolution: the adapter's x A runs the same fast kernel (its
# gradient stays fast inside lax.scan on CPU, see saferl_jax.models.denoisers).
from saferl_jax.models.denoisers import PatchConv, _conv

ADAPTABLE = (nnx.Linear, PatchConv)


class LoRALayer(nnx.LoRA):
  """base(x) + (alpha / r) (x A) B for a dense layer or an im2col convolution `base`.

  A [in, r] (in = k^2 C_in for a convolution) starts He-uniform as in flax's `nnx.LoRA`, B [r, out]
  at zero; both are `nnx.LoRAParam`s. For a `PatchConv`, x A is the convolution of x with the
  kernel A (same size, stride and padding as the base), so the layer equals the base convolution
  with kernel W + (alpha / r) A B.

  Args:
    base: the `nnx.Linear` or `PatchConv` to adapt (kept as `base_module`, weights untouched).
    rank: r, the rank of the update.
    alpha: the update's scale numerator; the update is multiplied by alpha / r.
    rngs: `nnx.Rngs` for A.

  Example:
    >>> layer = LoRALayer(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rank=2, alpha=2.0, rngs=nnx.Rngs(1))
    >>> layer.lora_a.shape, layer.lora_b.shape, layer.scale
    ((3, 2), (2, 5), 1.0)

  References:
    [LoRA] https://arxiv.org/abs/2106.09685
  """

  def __init__(self, base: nnx.Module, *, rank: int, alpha: float, rngs: nnx.Rngs):
    kernel = base.kernel
    super().__init__(kernel.shape[0], rank, kernel.shape[1], base_module=base,
                     param_dtype=kernel.dtype, rngs=rngs)
    self.scale = float(alpha) / rank

  def __call__(self, x: jax.Array) -> jax.Array:
    base = self.base_module
    a, b = self.lora_a[...], self.lora_b[...]
    if isinstance(base, PatchConv):
      images = x.reshape((-1,) + x.shape[-3:])
      down = _conv(images, a, base.kernel_size, base.stride)
      down = down.reshape(x.shape[:-3] + down.shape[1:])
    else:
      down = x @ a
    return base(x) + self.scale * (down @ b)


class LoRAFunctional(NamedTuple):
  """A LoRA model as a pure function: apply_fn((adapters, base), *inputs) = model(*inputs)."""
  apply_fn: Callable[..., Any]
  adapters: nnx.State  # the nnx.LoRAParam weights (A, B of every adapted layer): trainable
  base: nnx.State      # every other weight: frozen


class ParameterCounts(NamedTuple):
  """Scalars of a LoRA model: the adapters' (trainable) and all of them (adapters included)."""
  trainable: int
  total: int


def _walk(node, path: tuple, replace: Callable, seen: dict) -> None:
  """Calls replace(path, child) on every module edge below `node` and stores what it returns.

  Every reference is visited, so a layer shared by two parents gets one replacement in both. The
  walk does not enter LoRA layers (their base layer is not adapted twice).
  """
  for key, child in list(nnx.iter_children(node)):
    if isinstance(child, nnx.Variable):
      continue
    if id(child) not in seen:
      seen[id(child)] = replace(path + (key,), child)
      if seen[id(child)] is child and not isinstance(child, LoRALayer):
        _walk(child, path + (key,), replace, seen)
    new = seen[id(child)]
    if new is not child:
      if isinstance(key, int) or isinstance(node, (list, dict)):
        node[key] = new
      else:
        setattr(node, key, new)


def _check_model(model) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: must be an nnx.Module, got {type(model).__name__}")
  if isinstance(model, ADAPTABLE + (LoRALayer,)):
    raise ValueError(f"model: a bare {type(model).__name__} cannot be replaced in place; pass the "
                     "module that holds it")


def add_lora(model: nnx.Module, *, rank: int, alpha: float | None = None, rngs: nnx.Rngs,
             include=None) -> nnx.Module:
  """Replaces every dense and im2col convolution layer of `model` by base(x) + (alpha / r) (x A) B.

  A [in, r] is drawn He-uniform (fan-in in; in = k^2 C_in for a convolution), B [r, out] is zero,
  so the model's output is unchanged until B is trained. Layers already adapted are left as they
  are, as are embeddings and normalisation layers. The model is modified in place.

  Args:
    model: an NNX module (e.g. `MLPDenoiser`, `ConvDenoiser`).
    rank: r >= 1, the rank of every update.
    alpha: the scale numerator, > 0; None means alpha = r (a scale of 1), LoRA's convention of
      fixing alpha at the first r tried.
    rngs: `nnx.Rngs` for the A matrices.
    include: optional nnx filter choosing the layers to adapt: a predicate
      include(path, layer) -> bool (path a tuple of attribute names and indices), a type such as
      `PatchConv`, `nnx.PathContains("block_mid")`, or a tuple of these (any of them). None: all.

  Returns:
    The same `model`, with `LoRALayer`s in place of the chosen layers.

  Example:
    >>> from saferl_jax.models.denoisers import ConvDenoiser
    >>> model = nnx.eval_shape(  # shapes only: nothing is computed
    ...     lambda: add_lora(ConvDenoiser(channels=8, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1)))
    >>> type(model.conv_in).__name__, model.conv_in.lora_a.shape
    ('LoRALayer', (9, 2))

  References:
    [LoRA] https://arxiv.org/abs/2106.09685
  """
  _check_model(model)
  rank = checks.check_count("rank", rank)
  alpha = float(rank) if alpha is None else float(checks.check_real("alpha", alpha, low=0.0,
                                                                    open_low=True))
  if not isinstance(rngs, nnx.Rngs):
    raise TypeError(f"rngs: must be an nnx.Rngs, got {type(rngs).__name__}")
  chosen = (lambda path, layer: True) if include is None else filterlib.to_predicate(include)

  def replace(path, child):
    if isinstance(child, ADAPTABLE) and chosen(path, child):
      return LoRALayer(child, rank=rank, alpha=alpha, rngs=rngs)
    return child

  _walk(model, (), replace, {})
  return model


def lora_functional(model: nnx.Module) -> LoRAFunctional:
  """The adapted model as apply_fn((adapters, base), *inputs) = model(*inputs), split by nnx.LoRAParam.

  `adapters` holds every A and B (the weights to differentiate and optimise), `base` everything
  else (frozen, shared between seeds). `disable_adapters(adapters)` gives the base network.

  Args:
    model: a module with LoRA layers (`add_lora`).

  Returns:
    A `LoRAFunctional` (apply_fn, adapters, base).

  Example:
    >>> model = add_lora(nnx.Sequential(nnx.Linear(2, 8, rngs=nnx.Rngs(0)), nnx.silu,
    ...                                 nnx.Linear(8, 2, rngs=nnx.Rngs(0))), rank=2, rngs=nnx.Rngs(1))
    >>> apply_fn, adapters, base = lora_functional(model)
    >>> x = jnp.ones((4, 2))
    >>> bool(jnp.allclose(apply_fn((adapters, base), x), model(x)))
    True
    >>> count_parameters(adapters), count_parameters(base)  # 2 (2 + 8) + 2 (8 + 2); 24 + 18
    (40, 42)

  References:
    [LoRA] https://arxiv.org/abs/2106.09685
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: must be an nnx.Module, got {type(model).__name__}")
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
  if not jax.tree_util.tree_leaves(adapters):
    raise ValueError("model: has no LoRA adapters; call add_lora(model, rank=..., rngs=...) first")

  def apply_fn(params, *inputs):
    adapters, base = params
    return nnx.merge(graphdef, adapters, base)(*inputs)
  return LoRAFunctional(apply_fn, adapters, base)


def _key_name(entry) -> Any:
  """The name in one step of a pytree key path (an attribute, a dict key or an index)."""
  for field in ("key", "name", "idx"):
    if hasattr(entry, field):
      return getattr(entry, field)
  return None


def disable_adapters(adapters):
  """The adapters with every B set to zero: (alpha / r) x A B = 0, so the model is its base network.

  Used as the KL reference of fine-tuning: apply_fn((disable_adapters(adapters), base), ...) is
  the pretrained model, computed from the one shared copy of its weights.

  Args:
    adapters: `lora_functional(model).adapters` (an nnx.State, or any pytree whose B leaves sit
      under the key "lora_b"), with any leading axes (e.g. a seed axis).

  Returns:
    The same structure, B leaves zero, A leaves unchanged.

  Example:
    >>> model = add_lora(nnx.Sequential(nnx.Linear(2, 8, rngs=nnx.Rngs(0)), nnx.silu,
    ...                                 nnx.Linear(8, 2, rngs=nnx.Rngs(0))), rank=2, rngs=nnx.Rngs(1))
    >>> apply_fn, adapters, base = lora_functional(model)
    >>> trained = nnx.map_state(lambda path, v: v + 1.0, adapters)  # A + 1 and B = 1: changed
    >>> x = jnp.ones((4, 2))
    >>> bool(jnp.allclose(apply_fn((disable_adapters(trained), base), x), model(x)))  # model: B = 0
    True

  References:
    [LoRA] https://arxiv.org/abs/2106.09685
  """
  found = []

  def zero_b(path, leaf):
    if any(_key_name(entry) == "lora_b" for entry in path):
      found.append(path)
      return jnp.zeros_like(leaf)
    return leaf
  disabled = jax.tree_util.tree_map_with_path(zero_b, adapters)
  if not found:
    raise ValueError("adapters: holds no lora_b weights; pass lora_functional(model).adapters")
  return disabled


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base layer, W <- W + (alpha / r) A B, and removes the adapters.

  The merged model computes what the adapted one does (up to float rounding), at the cost of the
  original model, and its state has the original model's structure (no nnx.LoRAParam).
  Modified in place.

  Args:
    model: a module with LoRA layers (`add_lora`), e.g. after `nnx.update(model, adapters)`.

  Returns:
    The same `model`, each `LoRALayer` replaced by its base layer with the merged kernel.

  Example:
    >>> model = add_lora(nnx.Sequential(nnx.Linear(2, 8, rngs=nnx.Rngs(0)), nnx.silu,
    ...                                 nnx.Linear(8, 2, rngs=nnx.Rngs(0))), rank=2, rngs=nnx.Rngs(1))
    >>> type(merge_lora(model).layers[2]).__name__
    'Linear'

  References:
    [LoRA] https://arxiv.org/abs/2106.09685
  """
  _check_model(model)

  def replace(path, child):
    if not isinstance(child, LoRALayer):
      return child
    base = child.base_module
    update = child.scale * (child.lora_a[...] @ child.lora_b[...])
    base.kernel[...] = (base.kernel[...] + update).astype(base.kernel.dtype)
    return base
  _walk(model, (), replace, {})
  return model


def count_parameters(tree) -> int:
  """The number of scalars in a pytree of arrays: sum over leaves of prod(leaf.shape).

  Args:
    tree: a pytree of arrays (an nnx.State, a dict, `jax.ShapeDtypeStruct`s), or an nnx.Module
      (its whole state).

  Returns:
    The count, a Python int.

  Example:
    >>> count_parameters({"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(5)})
    20

  References:
    [LoRA] https://arxiv.org/abs/2106.09685 (trainable parameter counts, Table 4)
  """
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, (bool, str, bytes)) or not (hasattr(leaf, "shape") or
                                                    isinstance(leaf, (int, float, complex))):
      raise TypeError(f"tree: leaves must be arrays, got {type(leaf).__name__} {leaf!r}")
    total += math.prod(np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape)
  return total


def parameter_counts(model: nnx.Module) -> ParameterCounts:
  """(trainable, total): the scalars of the model's nnx.LoRAParam weights, and of its whole state.

  Args:
    model: an NNX module, adapted by `add_lora` or not (then trainable = 0).

  Returns:
    A `ParameterCounts`; trainable / total is the fraction LoRA fine-tuning updates.

  Example:
    The digits U-Net and the 2-D task's MLP at rank 4: 9.4% and 6.9% of the weights trainable
    (the models alone have 199,009 and 105,346; small layers make rank 4 a large fraction).

    >>> from saferl_jax.models.denoisers import ConvDenoiser, MLPDenoiser
    >>> counts = lambda build: parameter_counts(nnx.eval_shape(  # shapes only: nothing is computed
    ...     lambda: add_lora(build(nnx.Rngs(0)), rank=4, rngs=nnx.Rngs(1))))
    >>> counts(lambda rngs: ConvDenoiser(channels=32, rngs=rngs))
    ParameterCounts(trainable=20648, total=219657)
    >>> counts(lambda rngs: MLPDenoiser(2, num_classes=10, hidden=(128, 128, 128), rngs=rngs))
    ParameterCounts(trainable=7824, total=113170)

  References:
    [LoRA] https://arxiv.org/abs/2106.09685
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: must be an nnx.Module, got {type(model).__name__}")
  return ParameterCounts(count_parameters(nnx.state(model, nnx.LoRAParam)),
                         count_parameters(nnx.state(model)))
