"""LoRA: unchanged at init, the adapted layers against hand-computed W + (alpha / r) A B, gradients
against finite differences, adapter-only differentiation, merge, disable, include, options, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saferl_jax.models import lora
from saferl_jax.models.denoisers import ConvDenoiser, MLPDenoiser, PatchConv

# float32 sums of up to a few hundred products of O(1) terms: a relative error of ~100 ulps.
RTOL = 100 * np.finfo(np.float32).eps


class _Holder(nnx.Module):
  """One layer in a module, so that add_lora can replace it."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    return self.layer(x)


@pytest.fixture(scope="module")
def built():
  """name -> (a function returning a fresh copy of the model, its inputs); each model built once."""
  t = jnp.array([0, 17, 900])
  made = {  # built by one compiled program each: much faster than initialising op by op
      "mlp": (nnx.jit(lambda: MLPDenoiser(2, num_classes=3, hidden=(16, 16), rngs=nnx.Rngs(0)))(),
              (_normal(1, (3, 2)), t, jnp.array([0, 2, 3]))),
      "conv": (nnx.jit(lambda: ConvDenoiser(channels=8, rngs=nnx.Rngs(0)))(),
               (_normal(2, (3, 8, 8, 1)), t, jnp.array([0, 9, 10]))),
      # A strided convolution on inputs with two batch axes, alone: its gradients are cheap to compile.
      "conv_layer": (_Holder(PatchConv(3, 4, stride=2, rngs=nnx.Rngs(0))),
                     (_normal(3, (2, 3, 6, 6, 3)),)),
  }
  return {name: ((lambda m=model: nnx.clone(m)), inputs) for name, (model, inputs) in made.items()}


_call = nnx.jit(lambda model, *inputs: model(*inputs))


@pytest.fixture(scope="module")
def adapted(built):
  """name -> (the plain model's output, the model at rank 2, its jitted apply_fn, adapters, base)."""
  out = {}
  for name in ("mlp", "conv"):
    build, inputs = built[name]
    model = build()
    reference = _call(model, *inputs)
    assert lora.add_lora(model, rank=2, rngs=nnx.Rngs(1)) is model
    apply_fn, adapters, base = lora.lora_functional(model)
    out[name] = (reference, model, jax.jit(apply_fn), adapters, base)
  return out


def _normal(seed, shape, scale=1.0):
  """Test data from numpy: no random-number program for XLA to compile per shape."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _with_random_b(adapters, seed, scale=0.3):
  """The adapters with every B drawn N(0, scale^2): the adapted network differs from its base."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
  new = [_normal((seed, i), leaf.shape, scale)
         if any(getattr(entry, "key", None) == "lora_b" for entry in path) else leaf
         for i, (path, leaf) in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, new)


def _adapted_paths(model):
  return sorted(path for path, module in nnx.iter_modules(model) if isinstance(module, lora.LoRALayer))


def _assert_close(actual, expected, rtol=RTOL):
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_output_unchanged_at_init_and_jit_equals_eager(built, adapted, name):
  build, inputs = built[name]
  reference, model, apply_jit, adapters, base = adapted[name]
  _assert_close(apply_jit((adapters, base), *inputs), reference)
  _assert_close(_call(model, *inputs), reference)
  if name == "mlp":  # eagerly (the U-Net's many eager ops would compile for seconds)
    # B = 0: base(x) + s (x A) 0 adds an exact zero.
    np.testing.assert_array_equal(model(*inputs), build()(*inputs))


def test_dense_layer_equals_hand_computed_low_rank_update():
  holder = lora.add_lora(_Holder(nnx.Linear(5, 7, rngs=nnx.Rngs(0))), rank=3, alpha=6.0,
                         rngs=nnx.Rngs(1))
  apply_fn, adapters, base = lora.lora_functional(holder)
  adapters = _with_random_b(adapters, 3)
  x = _normal(4, (2, 4, 5))  # leading axes, as a sequence encoder's
  a, b = (np.asarray(adapters["layer"][n][...], np.float64) for n in ("lora_a", "lora_b"))
  kernel, bias = (np.asarray(base["layer"]["base_module"][n][...], np.float64) for n in ("kernel", "bias"))
  expected = np.asarray(x, np.float64) @ (kernel + 6.0 / 3 * a @ b) + bias
  _assert_close(apply_fn((adapters, base), x), expected)
  assert a.shape == (5, 3) and b.shape == (3, 7)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_layer_equals_convolution_with_updated_kernel(stride):
  holder = lora.add_lora(_Holder(PatchConv(3, 4, stride=stride, rngs=nnx.Rngs(0))), rank=2,
                         alpha=1.0, rngs=nnx.Rngs(1))
  apply_fn, adapters, base = lora.lora_functional(holder)
  adapters = _with_random_b(adapters, 3)
  a, b = adapters["layer"]["lora_a"][...], adapters["layer"]["lora_b"][...]
  kernel, bias = (base["layer"]["base_module"][n][...] for n in ("kernel", "bias"))
  x = _normal(4, (2, 3, 8, 8, 3))  # two batch axes
  kernel = kernel + 0.5 * a @ b
  expected = jax.lax.conv_general_dilated(
      x.reshape(6, 8, 8, 3), kernel.reshape(3, 3, 3, 4), (stride, stride), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
  expected = expected.reshape((2, 3) + expected.shape[1:]) + bias
  _assert_close(apply_fn((adapters, base), x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "conv", "conv_layer"])
def test_adapter_gradients_match_finite_differences_and_leave_out_the_base(built, name):
  build, inputs = built[name]
  apply_fn, adapters, base = lora.lora_functional(lora.add_lora(build(), rank=2, rngs=nnx.Rngs(1)))
  loss = lambda adapters, base, inputs: jnp.sum(apply_fn((adapters, base), *inputs) ** 2)
  # Differentiating the adapters alone: a gradient of the adapters' structure and size, no base weight.
  grads = jax.eval_shape(jax.grad(loss), adapters, base, inputs)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
  assert lora.count_parameters(grads) == lora.count_parameters(adapters)
  assert lora.count_parameters(adapters) < lora.count_parameters(base)
  if name == "conv":
    return  # the U-Net's gradient is its layers': checked on the MLP and the convolution alone
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree_util.tree_map(  # numpy float64, so the shifts below compile nothing
        lambda v: np.asarray(v, np.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree)
    base, inputs = to64(base), to64(inputs)
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    # At init (B = 0): d loss / dA = s x^T (dL/dy) B^T = 0 exactly, and d loss / dB is not zero.
    for path, g in jax.tree_util.tree_flatten_with_path(value_and_grad(to64(adapters), base, inputs)[1])[0]:
      names = [getattr(entry, "key", None) for entry in path]
      assert (np.abs(g).max() == 0) == ("lora_a" in names), path
    adapters = to64(_with_random_b(adapters, 5))
    grads = value_and_grad(adapters, base, inputs)[1]
    h = 1e-5  # central differences: O(h^2) truncation, O(eps_64 / h) rounding, both < 1e-9
    for seed in (6, 7):
      leaves, treedef = jax.tree_util.tree_flatten(adapters)
      direction = jax.tree_util.tree_unflatten(treedef, [
          np.random.default_rng((seed, i)).standard_normal(v.shape) for i, v in enumerate(leaves)])
      shifted = lambda s: jax.tree_util.tree_map(lambda v, d: v + s * d, adapters, direction)
      numeric = (value_and_grad(shifted(h), base, inputs)[0] -
                 value_and_grad(shifted(-h), base, inputs)[0]) / (2 * h)
      analytic = sum(np.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grads),
                                                     jax.tree_util.tree_leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "conv"])
@pytest.mark.slow
def test_merge_equals_adapted_and_restores_the_original_structure(built, adapted, name):
  build, inputs = built[name]
  reference, model, *_ = adapted[name]
  model = nnx.clone(model)
  nnx.update(model, _with_random_b(nnx.state(model, nnx.LoRAParam), 7))
  adapted_output = _call(model, *inputs)
  assert np.abs(adapted_output - reference).max() > 1e-2  # the adapters do something
  assert lora.merge_lora(model) is model
  _assert_close(_call(model, *inputs), adapted_output, rtol=10 * RTOL)  # ~ten layers of rounding
  assert not _adapted_paths(model) and not jax.tree_util.tree_leaves(nnx.state(model, nnx.LoRAParam))
  assert jax.tree_util.tree_structure(nnx.state(model)) == jax.tree_util.tree_structure(
      nnx.state(build()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_disabled_adapters_give_the_base_and_vmap_over_seeds_equals_a_loop(built, adapted, name):
  inputs = built[name][1]
  reference, _, apply_jit, adapters, base = adapted[name]
  seeds = [_with_random_b(adapters, seed) for seed in (8, 9, 10)]
  stacked = jax.tree_util.tree_map(lambda *v: np.stack(v), *seeds)
  disabled = jax.jit(lora.disable_adapters)(stacked)  # with a seed axis, as fine-tuning holds them
  take = jax.jit(lambda tree, s: jax.tree_util.tree_map(lambda v: v[s], tree))
  is_a = lambda path, _: "lora_a" in path
  for s, seed in enumerate(seeds):
    one = take(disabled, s)
    _assert_close(apply_jit((one, base), *inputs), reference)
    for got, kept in zip(jax.tree_util.tree_leaves(nnx.filter_state(one, is_a)),
                         jax.tree_util.tree_leaves(nnx.filter_state(seed, is_a))):
      np.testing.assert_array_equal(got, kept)
  vmapped = jax.jit(jax.vmap(lambda a: apply_jit((a, base), *inputs)))(stacked)  # one base for all
  for s, seed in enumerate(seeds):
    _assert_close(vmapped[s], apply_jit((seed, base), *inputs))
  assert np.abs(vmapped[0] - vmapped[1]).max() > 1e-3


@pytest.mark.slow
def test_include_chooses_the_layers(built):
  build, _ = built["conv"]
  num_convs = sum(isinstance(m, PatchConv) for _, m in nnx.iter_modules(build()))
  convs = lora.add_lora(build(), rank=2, rngs=nnx.Rngs(1), include=PatchConv)
  adapted = [m.base_module for _, m in nnx.iter_modules(convs) if isinstance(m, lora.LoRALayer)]
  assert len(adapted) == num_convs >= 9 and all(isinstance(m, PatchConv) for m in adapted)
  mid = lora.add_lora(build(), rank=2, rngs=nnx.Rngs(1), include=nnx.PathContains("block_mid"))
  assert _adapted_paths(mid) == [("block_mid", "bias"), ("block_mid", "conv1"), ("block_mid", "conv2")]
  mlp = lora.add_lora(built["mlp"][0](), rank=2, rngs=nnx.Rngs(1),
                      include=lambda path, layer: path[0] == "layers")
  assert _adapted_paths(mlp) == [("layers", 0), ("layers", 1)]


def test_adding_twice_keeps_one_adapter_and_shared_layers_get_one(built):
  model = lora.add_lora(built["mlp"][0](), rank=2, rngs=nnx.Rngs(1))
  count, paths = lora.parameter_counts(model), _adapted_paths(model)
  lora.add_lora(model, rank=2, rngs=nnx.Rngs(2))
  assert lora.parameter_counts(model) == count and _adapted_paths(model) == paths

  class Tied(nnx.Module):
    def __init__(self):
      self.first = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
      self.second = self.first
  tied = lora.add_lora(Tied(), rank=1, rngs=nnx.Rngs(1))
  assert isinstance(tied.first, lora.LoRALayer) and tied.first is tied.second
  assert lora.parameter_counts(tied).trainable == 1 * (3 + 3)


def test_bad_options_name_the_argument(built):
  model = built["mlp"][0]
  for rank, error in ((0, ValueError), (-2, ValueError), (2.5, ValueError), ("4", TypeError),
                      (True, TypeError), (None, TypeError)):
    with pytest.raises(error, match="rank"):
      lora.add_lora(model(), rank=rank, rngs=nnx.Rngs(1))
  for alpha in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="alpha"):
      lora.add_lora(model(), rank=2, alpha=alpha, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match="rngs"):
    lora.add_lora(model(), rank=2, rngs=0)
  with pytest.raises(TypeError, match="model"):
    lora.add_lora(lambda x: x, rank=2, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="model"):
    lora.add_lora(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="model: has no LoRA"):
    lora.lora_functional(model())
  with pytest.raises(ValueError, match="adapters"):
    lora.disable_adapters({"kernel": jnp.zeros((2, 2))})
  with pytest.raises(TypeError, match="tree"):
    lora.count_parameters({"name": "kernel"})


@pytest.mark.slow
def test_count_parameters_closed_form():
  tree = {"w": jnp.zeros((3, 5)), "b": jax.ShapeDtypeStruct((5,), jnp.float32), "s": 2.0}
  assert lora.count_parameters(tree) == 15 + 5 + 1
  assert lora.count_parameters(nnx.Linear(4, 6, rngs=nnx.Rngs(0))) == 4 * 6 + 6
  assert lora.count_parameters(PatchConv(3, 5, kernel_size=3, rngs=nnx.Rngs(0))) == 9 * 3 * 5 + 5
  # Adapters: r (in + out) per dense or conv layer (in = k^2 C_in), the layers found by a walk.
  for build in (lambda: MLPDenoiser(2, num_classes=3, hidden=(16, 24), rngs=nnx.Rngs(0)),
                lambda: ConvDenoiser(channels=16, rngs=nnx.Rngs(0))):
    model = nnx.eval_shape(build)  # shapes only
    total = lora.count_parameters(model)
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, (nnx.Linear, PatchConv))]
    expected = sum(3 * (m.kernel.shape[0] + m.kernel.shape[1]) for m in layers)
    adapted = nnx.eval_shape(lambda: lora.add_lora(build(), rank=3, rngs=nnx.Rngs(1)))
    assert lora.parameter_counts(adapted) == (expected, total + expected)
