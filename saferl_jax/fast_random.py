"""Fast counter-based random numbers for the hot loops (floor 1, shared).

Resampling for the bootstrap and Gumbel noise for Plackett-Luce sampling are bound by random
number generation: on CPU, JAX's threefry spends most of their time. Here a counter is mixed by
a bijective integer hash (Wellons' "lowbias32") keyed by seeds drawn with `jax.random`, so the
same key gives the same numbers and different keys independent-looking streams. Statistical
tests in tests/ (uniformity, multinomial counts, sampling frequencies) check what they feed.
Every user keeps `generator="threefry"` available for JAX's own generator.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from saferl_jax import checks

Generator = Literal["hash", "threefry"]
GENERATORS = ("hash", "threefry")


def check_generator(generator: str) -> None:
  if generator not in GENERATORS:
    raise ValueError(f"generator: must be 'hash' or 'threefry', got {generator!r}")


def hash32(x: jax.Array) -> jax.Array:
  """Wellons' lowbias32: a bijective uint32 mixer with low bias."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def gumbel(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32,
           generator: Generator = "hash") -> jax.Array:
  """Standard Gumbel noise of `shape`; "hash" uses 23-bit uniforms like jax.random.uniform.

  Example:
    >>> import jax
    >>> gumbel(jax.random.key(0), (2, 3)).shape
    (2, 3)
  """
  checks.check_key("key", key)
  check_generator(generator)
  if generator == "threefry":
    return jax.random.gumbel(key, shape, dtype)
  size = int(np.prod(shape))
  if size >= 2**32:
    raise ValueError(f"shape: the 'hash' generator draws at most 2^32 numbers per call, asked for {size}")
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  counter = jax.lax.iota(jnp.uint32, size).reshape(shape)
  bits = hash32(hash32(counter + seeds[0]) ^ seeds[1])
  # 23 bits, centred in their interval: u in [2^-24, 1 - 2^-24], exactly representable.
  uniform = ((bits >> 9).astype(jnp.float32) + 0.5) * (1.0 / 2**23)
  return (-jnp.log(-jnp.log(uniform))).astype(dtype)
