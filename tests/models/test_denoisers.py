"""Denoisers: the sinusoidal embedding, shapes, the null condition, jit, per-example independence,
and the im2col convolution against XLA's convolution (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saferl_jax.models import denoisers as dn
from saferl_jax.models.functional import as_functional


def test_sinusoidal_embedding_closed_form():
  t = jnp.array([0, 3, 250])
  emb = dn.sinusoidal_embedding(t, 6)
  frequencies = 10_000.0 ** (-np.arange(3) / 3)
  angles = np.asarray(t)[:, None] * frequencies
  np.testing.assert_allclose(emb, np.concatenate([np.sin(angles), np.cos(angles)], -1), atol=1e-4)
  assert dn.sinusoidal_embedding(jnp.zeros((2, 5)), 8).shape == (2, 5, 8)
  with pytest.raises(ValueError, match="dim:"):
    dn.sinusoidal_embedding(t, 5)


def _inputs(shape, batch=4, num_classes=10):
  x = jax.random.normal(jax.random.key(0), (batch, *shape))
  t = jnp.arange(batch, dtype=jnp.int32) * 37
  condition = jnp.arange(batch, dtype=jnp.int32) % (num_classes + 1)
  return x, t, condition


@pytest.fixture(scope="module")
def models():
  """(model, sample shape, num_classes, jitted model call) for each denoiser."""
  built = {
      "mlp": (dn.MLPDenoiser(2, num_classes=4, hidden=(32, 32), rngs=nnx.Rngs(0)), (2,), 4),
      "conv": (dn.ConvDenoiser(channels=16, rngs=nnx.Rngs(0)), (8, 8, 1), 10),
  }
  return {name: (model, shape, num_classes, nnx.jit(lambda m, *inputs: m(*inputs)))
          for name, (model, shape, num_classes) in built.items()}


@pytest.mark.parametrize("name", ["mlp", "conv"])
@pytest.mark.slow
def test_shapes_and_null_token_row(models, name):
  model, shape, num_classes, call = models[name]
  x, t, condition = _inputs(shape, num_classes=num_classes)
  eps = call(model, x, t, condition)
  assert eps.shape == x.shape and eps.dtype == jnp.float32 and np.isfinite(eps).all()
  assert model.embedding.encoder.table.embedding.shape[0] == num_classes + 1
  assert model.null_condition() == num_classes == model.num_classes


@pytest.mark.parametrize("name", ["mlp", "conv"])
@pytest.mark.slow
def test_condition_and_time_change_the_output(models, name):
  model, shape, num_classes, call = models[name]
  x, t, _ = _inputs(shape, num_classes=num_classes)
  real = call(model, x, t, jnp.zeros_like(t))
  null = call(model, x, t, jnp.full_like(t, num_classes))
  later = call(model, x, t + 100, jnp.zeros_like(t))
  for other in (null, later):
    # Per example, the outputs differ by much more than float32 rounding.
    assert np.all(np.abs(np.asarray(real - other)).reshape(len(t), -1).max(-1) > 1e-3)


@pytest.mark.parametrize("name", ["mlp", "conv"])
@pytest.mark.slow
def test_jit_equals_eager_and_examples_are_independent(models, name):
  model, shape, num_classes, _ = models[name]
  x, t, condition = _inputs(shape, num_classes=num_classes)
  apply_fn, params = as_functional(model)
  eager = model(x, t, condition)
  np.testing.assert_allclose(jax.jit(apply_fn)(params, x, t, condition), eager, rtol=1e-5, atol=1e-5)
  # No batch statistics: example i alone gives the same eps (vmap over single examples = the batch).
  single = jax.jit(jax.vmap(lambda xi, ti, ci: apply_fn(params, xi[None], ti[None], ci[None])[0]))(
      x, t, condition)
  np.testing.assert_allclose(single, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_input_checks(models):
  model, shape, _, _ = models["conv"]
  x, t, condition = _inputs(shape)
  with pytest.raises(ValueError, match="t:"):
    model(x, t[:-1], condition)
  with pytest.raises(ValueError, match="condition:"):
    model(x, t, condition.astype(jnp.float32))
  with pytest.raises(ValueError, match="t:"):
    model(x, t.astype(bool), condition)
  with pytest.raises(ValueError, match="x:"):
    model(jnp.zeros((4, 4, 4, 1)), t, condition)
  with pytest.raises(ValueError, match="channels:"):
    dn.ConvDenoiser(channels=12, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="x:"):
    models["mlp"][0](jnp.zeros((4, 2, 1)), t, condition)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.slow
def test_patch_conv_equals_xla_convolution(stride):
  conv = dn.PatchConv(3, 5, stride=stride, rngs=nnx.Rngs(1))
  conv.bias[...] = jnp.arange(5.0)
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))

  def reference(kernel, bias, x):
    return jax.lax.conv_general_dilated(x, kernel.reshape(3, 3, 3, 5), (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias

  kernel, bias = conv.kernel[...], conv.bias[...]
  apply_fn, params = as_functional(conv)
  y = jax.jit(apply_fn)(params, x)
  np.testing.assert_allclose(y, jax.jit(reference)(kernel, bias, x), rtol=1e-5, atol=1e-5)
  assert y.shape == (4, 8 // stride, 8 // stride, 5)
  # The hand-written backward pass (matrix products) against XLA's autodiff of its convolution.
  weights = jax.random.normal(jax.random.key(3), y.shape)
  ours = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(apply_fn(p, x)) * weights), argnums=(0, 1)))(
      params, x)
  theirs = jax.jit(jax.grad(lambda k, b, x: jnp.sum(jnp.sin(reference(k, b, x)) * weights),
                            argnums=(0, 1, 2)))(kernel, bias, x)
  np.testing.assert_allclose(ours[0]["kernel"][...], theirs[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours[0]["bias"][...], theirs[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours[1], theirs[2], rtol=1e-4, atol=1e-4)


def test_patch_conv_rejects_even_kernels():
  with pytest.raises(ValueError, match="kernel_size:"):
    dn.PatchConv(1, 1, kernel_size=2, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_condition_encoders_and_float_times():
  rngs = nnx.Rngs(0)
  vector = dn.MLPDenoiser(2, condition_encoder=dn.VectorEncoder(3, features=16, rngs=rngs),
                          hidden=(16, 16), rngs=rngs)
  sequence = dn.ConvDenoiser(condition_encoder=dn.SequenceEncoder(5, length=4, features=32, rngs=rngs),
                             channels=8, rngs=rngs)
  assert vector.num_classes is None and vector.null_condition().shape == (3,)
  assert sequence.null_condition().shape == (4, 5)
  directions = jax.random.normal(jax.random.key(1), (6, 3))
  x, t = jax.random.normal(jax.random.key(2), (6, 2)), jnp.linspace(0.0, 999.0, 6)  # float times
  eps = vector(x, t, directions)
  assert eps.shape == (6, 2) and np.isfinite(eps).all()
  # Each example depends on its own condition only, and the condition matters.
  np.testing.assert_allclose(vector(x[:1], t[:1], directions[:1]), eps[:1], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(vector(x, t, -directions) - eps)).min() > 1e-4
  tokens = jax.random.normal(jax.random.key(3), (2, 4, 5))
  images = jnp.zeros((2, 8, 8, 1))
  out = sequence(images, jnp.array([10, 500]), tokens)
  assert out.shape == images.shape and np.isfinite(out).all()
  nulls = jnp.broadcast_to(sequence.null_condition(), (2, 4, 5))
  assert np.abs(np.asarray(sequence(images, jnp.array([10, 500]), nulls) - out)).max() > 1e-4


@pytest.mark.slow
def test_condition_encoder_errors():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="^condition_encoder:"):
    dn.MLPDenoiser(2, hidden=(8,), rngs=rngs)  # neither num_classes nor an encoder
  with pytest.raises(ValueError, match="^condition_encoder:"):
    dn.MLPDenoiser(2, num_classes=3, condition_encoder=dn.VectorEncoder(2, features=8, rngs=rngs),
                   hidden=(8,), rngs=rngs)
  wrong_width = dn.MLPDenoiser(2, condition_encoder=dn.VectorEncoder(2, features=4, rngs=rngs),
                               hidden=(8,), rngs=rngs)
  with pytest.raises(ValueError, match="^condition_encoder:"):
    wrong_width(jnp.zeros((3, 2)), jnp.zeros(3), jnp.zeros((3, 2)))
  vector = dn.MLPDenoiser(2, condition_encoder=dn.VectorEncoder(2, features=8, rngs=rngs),
                          hidden=(8,), rngs=rngs)
  with pytest.raises(ValueError, match="^condition:"):
    vector(jnp.zeros((3, 2)), jnp.zeros(3), jnp.zeros((3, 5)))


@pytest.mark.slow
def test_dict_conditions_through_a_pure_function():
  rngs = nnx.Rngs(0)
  encoder = dn.DictEncoder({"digit": dn.ClassEncoder(3, features=8, rngs=rngs),
                            "ink": dn.VectorEncoder(1, features=8, rngs=rngs)})
  apply_fn, params = as_functional(dn.MLPDenoiser(2, condition_encoder=encoder, hidden=(8,),
                                                  rngs=rngs))
  condition = {"digit": jnp.array([0, 2]), "ink": jnp.array([[0.1], [0.9]])}
  x, t = jnp.ones((2, 2)), jnp.array([3, 4])
  out = jax.jit(apply_fn)(params, x, t, condition)
  assert out.shape == (2, 2) and np.isfinite(out).all()
  # Each part of the condition matters.
  other_ink = jax.jit(apply_fn)(params, x, t, {**condition, "ink": condition["ink"][::-1]})
  other_digit = jax.jit(apply_fn)(params, x, t, {**condition, "digit": condition["digit"][::-1]})
  assert np.abs(np.asarray(other_ink - out)).max() > 1e-4
  assert np.abs(np.asarray(other_digit - out)).max() > 1e-4
  with pytest.raises(ValueError, match="^condition:"):
    apply_fn(params, x, t, {"digit": condition["digit"]})
