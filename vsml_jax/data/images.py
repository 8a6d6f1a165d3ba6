"""Turning images of any size and colour into a learner's inputs.

Every learner in this package is fed inputs standardised one way:

    pixels in [0, 1]  ->  grey  ->  resized to S x S  ->  (x - PIXEL_MEAN) / PIXEL_STD  ->  [N, S*S]

`normalize` does all of it, for uint8 or [0, 1] float images, grey or colour,
of any size. The shipped learners were meta-trained on inputs made this way,
so data fed to them (or to a learner meta-trained here) MUST go through it:
a learner meta-trained on standardised pixels does not learn on raw 0..255
values or on differently scaled ones.

Shapes: N images, H x W source pixels, C channels, S x S target pixels,
D = S * S inputs.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Statistics used by the original VS-ML code for MNIST and Fashion-MNIST alike
# (pixels scaled to [0, 1] first). One shared normalisation keeps inputs on the
# same scale across datasets, which meta-generalisation to unseen datasets needs.
PIXEL_MEAN = 0.13066047430038452
PIXEL_STD = 0.3081078827381134

# Luma weights of ITU-R BT.601 for (R, G, B), applied to the [0, 1] values as
# they are (no gamma linearisation): what PIL's convert("L") and
# tf.image.rgb_to_grayscale use. They sum to 1, so white stays 1.
GREY_WEIGHTS = (0.299, 0.587, 0.114)

# The side of MNIST-like images, and of the default input (28 // pool).
IMAGE_SIDE = 28

# Images per compiled call of the resizing path (bounds the float copies of
# large colour sets; the result does not depend on it).
_CHUNK = 8192


def pool_images(images: jax.Array, pool: int) -> jax.Array:
    """Average-pools square images over non-overlapping pool x pool blocks.

    Args:
      images: [N, S, S] float images.
      pool: block size; must divide S (for 28x28: 1, 2, 4, 7, 14, 28).

    Returns:
      [N, S // pool, S // pool]; e.g. pool=4 turns 28x28 into 7x7 (49 inputs),
      which keeps CPU experiments small.
    """
    n, h, w = images.shape
    if pool < 1 or h % pool or w % pool:
        raise ValueError(f"pool={pool} must be a positive divisor of the image size "
                         f"{h}x{w}; use 1 (784 inputs), 2 (196) or 4 (49).")
    if pool == 1:
        return images
    return images.reshape(n, h // pool, pool, w // pool, pool).mean(axis=(2, 4))


@functools.partial(jax.jit, static_argnames="pool")
def normalize_images(images: jax.Array, pool: int = 1) -> jax.Array:
    """The 28x28 grey uint8 case of `normalize` (MNIST, Fashion-MNIST).

    pixels / 255, optional average pooling, then (x - PIXEL_MEAN) / PIXEL_STD,
    then flattening. (Pooling commutes with the affine normalisation, so its
    position does not change the result; it must come before flattening.)

    Args:
      images: uint8 [N, 28, 28].
      pool: 1, 2 or 4 (see `pool_images`).

    Returns:
      float32 [N, (28 // pool) ** 2], i.e. [N, 784], [N, 196] or [N, 49].
    """
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    x = pool_images(x, pool)
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return x.reshape(x.shape[0], -1)


def target_side(input_size: Optional[int] = None, pool: int = 1) -> int:
    """S, the side of the square images a learner reads.

    Args:
      input_size: D = S * S (e.g. 49 -> 7); wins over `pool` when given.
      pool: else S = 28 // pool; pool must divide 28 (1, 2, 4, 7, 14, 28).

    Returns:
      S >= 1.
    """
    if input_size is not None:
        side = math.isqrt(int(input_size)) if int(input_size) > 0 else 0
        if side < 1 or side * side != int(input_size):
            raise ValueError(f"input_size={input_size} must be a square number (S x S "
                             "pixels), e.g. 49 (7x7), 196 (14x14) or 784 (28x28).")
        return side
    if not isinstance(pool, (int, np.integer)) or pool < 1 or IMAGE_SIDE % pool:
        raise ValueError(f"pool={pool} must be a positive divisor of the image size "
                         f"{IMAGE_SIDE}x{IMAGE_SIDE}; use 1 (784 inputs), 2 (196) or 4 "
                         "(49), or give input_size=S*S for any other S.")
    return IMAGE_SIDE // int(pool)


def _check_values(images, where: str) -> None:
    """Range checks of concrete pixel values (skipped for traced arrays)."""
    if isinstance(images, jax.core.Tracer) or images.size == 0:
        return
    arr = np.asarray(images)
    lo, hi = arr.min(), arr.max()
    if not np.issubdtype(arr.dtype, np.integer) and not (np.isfinite(lo) and np.isfinite(hi)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise ValueError(f"{where}: example {bad[0]} has a non-finite pixel "
                         f"(images[{', '.join(map(str, bad))}] is {arr[bad]}); remove or "
                         "repair that example.")
    if np.issubdtype(arr.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: integer pixels must lie in 0..255, found "
                             f"{lo}..{hi}; store them as uint8 (0..255) or as floats "
                             "in [0, 1].")
    elif not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        hint = " (they look like 0..255 values: divide by 255)" if hi > 1 else ""
        raise ValueError(f"{where}: float pixels must lie in [0, 1], found "
                         f"{lo:g}..{hi:g}{hint}.")


@functools.partial(jax.jit, static_argnames=("side", "scale"))
def _normalize_kernel(images: jax.Array, side: int, scale: bool) -> jax.Array:
    x = images.astype(jnp.float32)
    if scale:
        x = x / 255.0
    if x.ndim == 4:
        x = x[..., 0] if x.shape[-1] == 1 else x @ jnp.asarray(GREY_WEIGHTS, jnp.float32)
    n, h, w = x.shape
    if (h, w) == (IMAGE_SIDE, IMAGE_SIDE) and IMAGE_SIDE % side == 0:
        # Exact block averages: what the shipped learners were trained on.
        x = pool_images(x, IMAGE_SIDE // side)
    elif (h, w) != (side, side):
        x = jax.image.resize(x, (n, side, side), method="linear", antialias=True)
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return x.reshape(n, side * side)


def normalize(images, input_size: Optional[int] = None, pool: int = 1, *,
              where: str = "images") -> jax.Array:
    """Turns images into the standardised inputs every learner here expects.

    Inputs MUST be standardised this way: the meta-trained learners (e.g.
    ``pretrained:mnist``) learn on these inputs and on nothing else. Steps:

    1. pixels to [0, 1]: integer images (uint8) are divided by 255; float
       images are assumed to be in [0, 1] already (checked when the values
       are concrete: 0..255 floats are an error, not silently rescaled);
    2. colour to grey: [N, H, W, 3] -> 0.299 R + 0.587 G + 0.114 B (ITU-R
       BT.601 luma, `GREY_WEIGHTS`); [N, H, W, 1] drops its channel axis;
    3. resize to S x S, S = sqrt(input_size) or 28 // pool: a 28x28 source
       whose side S divides is average-pooled over exact blocks (bit-identical
       to `normalize_images`, the MNIST pipeline); anything else goes through
       `jax.image.resize` (linear, antialiased; non-square images are
       stretched to the square);
    4. (x - PIXEL_MEAN) / PIXEL_STD, the statistics of the original VS-ML code,
       shared by every data set; then flatten.

    Args:
      images: [N, H, W] grey or [N, H, W, C] with C = 1 or 3; uint8 (or
        another integer type) in 0..255, or float in [0, 1]. numpy or jax.
      input_size: D = S * S inputs (a square number), e.g. 49 for 7x7.
      pool: used when input_size is None: S = 28 // pool (1, 2, 4, ...).
      where: names the images in error messages (e.g. a file).

    Returns:
      float32 [N, S * S].
    """
    side = target_side(input_size, pool)
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    shape = tuple(np.shape(images))
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise ValueError(f"{where}: images have shape {shape}; expected [N, H, W] (grey) "
                         "or [N, H, W, C] with C = 1 (grey) or 3 (RGB; drop an alpha "
                         "channel first).")
    dtype = np.dtype(images.dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"{where}: images have dtype {dtype}; use uint8 (0..255) or "
                         "floats in [0, 1].")
    _check_values(images, where)
    scale = bool(np.issubdtype(dtype, np.integer))
    if (scale and len(shape) == 3 and shape[1:] == (IMAGE_SIDE, IMAGE_SIDE)
            and IMAGE_SIDE % side == 0):
        # The MNIST path, unchanged: results stay bit-identical to before.
        return normalize_images(images, pool=IMAGE_SIDE // side)
    if scale and dtype != np.uint8:
        images = images.astype(np.uint8)  # values checked to be 0..255 above
    n = shape[0]
    if n <= _CHUNK or isinstance(images, jax.core.Tracer):
        return _normalize_kernel(images, side, scale)
    return jnp.concatenate([_normalize_kernel(images[i:i + _CHUNK], side, scale)
                            for i in range(0, n, _CHUNK)])
