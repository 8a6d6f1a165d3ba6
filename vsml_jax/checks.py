"""Value checks for streams and data sets: NaN / inf inputs and labels that are not one-hot.

`unroll` and the baselines check shapes (at trace time, for free) but not
values: one NaN pixel makes every later VS-ML prediction NaN, and labels that
are all zeros, negative or scaled give a loss that means nothing. Checking
values on the default path would cost a pass over the data (or a host
callback) on every call, so it is done in two opt-in places instead:

- On the host, once, where data enters (experiment entry points, data
  loading): `check_stream_values` for streams (inputs [T, (K,) D] with one-hot
  or integer labels) and `check_dataset_values` / `check_dataset` for data
  sets (images [N, ...], integer labels [N]). Vectorised numpy; they raise
  ValueError naming the first bad index and the fix.

- Inside jit, for library users: `checked_unroll` (VS-ML) and
  `checkify_unroll` (any `Learner.unroll`) built with
  `jax.experimental.checkify`. They return (err, (state, out)); `err.throw()`
  outside jit raises with the first bad index. `float_checks=True` also
  reports the first NaN produced (or division by zero) inside the episode.

    err, (state, out) = jax.jit(vsml_jax.checked_unroll)(params, state, (x, y))
    err.throw()  # e.g. "checked_unroll: inputs[37, 412] is nan (not finite)"
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from vsml_jax.network import unroll  # network must not import this module (a cycle)

ONE_HOT_FIX = ("labels must be one-hot rows (exactly one 1, zeros elsewhere); "
               "convert class indices with np.eye(C)[y] or jax.nn.one_hot(y, C), and do "
               "not smooth, scale, mask or negate them")


# ----------------------------------------------------------------- host side
def _index(idx: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(i)) for i in idx) + "]"


def _first(mask: np.ndarray) -> Tuple[int, ...]:
    """Index of the first True of a boolean array (C order)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _as_host(a: Any, what: str, where: str) -> np.ndarray:
    try:
        return np.asarray(a)
    except Exception as e:  # e.g. a tracer: these checks need concrete data
        raise TypeError(f"{where}: {what} must be a concrete array (these are host-side "
                        "checks; inside jit use vsml_jax.checks.checkify_unroll): "
                        f"{type(e).__name__}: {e}") from e


def _first_nonfinite(x: np.ndarray, what: str, where: str
                     ) -> Optional[Tuple[Tuple[int, ...], str]]:
    """None if every value of x is finite, else (its first index, a message
    naming it: "inputs[37, 412] is nan (the first of ...); fix")."""
    kind = x.dtype.kind
    if kind in "biu":  # integers and booleans are always finite
        return None
    if kind not in "fV":  # "V": bfloat16 & co. from ml_dtypes, which isfinite handles
        raise ValueError(f"{where}: {what} have dtype {x.dtype}; expected real numbers.")
    if x.size == 0:
        return None
    # Fast path: a finite sum proves every value finite (NaN and inf propagate);
    # summing allocates nothing, unlike an isfinite mask. An infinite sum can
    # also be an overflow of finite values, so only then look value by value.
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(x.sum()):
            return None
    bad = ~np.isfinite(x)
    if not bad.any():
        return None
    idx = _first(bad)
    return idx, (f"{what}{_index(idx)} is {float(x[idx])} (the first of "
                 f"{int(bad.sum())} non-finite values); remove or repair those examples "
                 "(e.g. np.nan_to_num, or drop them) before running a learner on them.")


def _describe_row(row: np.ndarray) -> str:
    row = np.asarray(row, np.float64)
    shown = np.array2string(row[:12], precision=3, separator=", ")
    if row.size > 12:
        shown = shown[:-1] + ", ...]"
    if not np.all(np.isfinite(row)):
        why = "has non-finite entries"
    elif np.any(row < 0):
        why = "has negative entries"
    elif not np.all((row == 0) | (row == 1)):
        why = "has entries other than 0 and 1 (scaled or smoothed?)"
    elif row.sum() == 0:
        why = "is all zeros"
    else:
        why = f"has {int(row.sum())} ones"
    return f"sum {row.sum()}, {why}: {shown}"


def check_stream_values(inputs: Any, labels: Any, *, num_classes: Optional[int] = None,
                        num_inputs: Optional[int] = None, where: str = "stream") -> None:
    """Raises ValueError unless a stream's values can be learned from.

    Args:
      inputs: [T, (K,) D] real numbers (any leading axes, e.g. [S, T, K, D]
        for S streams); every value must be finite.
      labels: one-hot [T, (K,) C] (every row exactly one 1 and zeros; bool,
        int or float) or integer class indices [T, (K,)] in [0, num_classes).
      num_classes: C; required for class indices, checked for one-hot labels.
      num_inputs: D, checked if given.
      where: names the caller in the message (e.g. "evaluate --dataset=mnist").
    Raises:
      ValueError naming the first bad index, e.g. "inputs[37, 412] is nan",
      "labels[5] is not one-hot (sum 0.0, is all zeros: ...)" or
      "labels[5] = 12 is not a class index in [0, 10)", with the fix.
    One vectorised pass over the inputs (a sum; the mask only if it is not
    finite) and one over the labels: ~10 ms for 60,000 x 784 float32.
    """
    x = _as_host(inputs, "inputs", where)
    y = _as_host(labels, "labels", where)
    if x.ndim < 1:
        raise ValueError(f"{where}: inputs have shape {x.shape}; expected [T, (K,) D].")
    if num_inputs is not None and x.shape[-1] != num_inputs:
        raise ValueError(f"{where}: inputs have width {x.shape[-1]} but the learner takes "
                         f"{num_inputs}; pool/reshape the data or build the learner for "
                         f"{x.shape[-1]} inputs.")
    lead = x.shape[:-1]
    if y.shape == lead:
        one_hot = False
    elif y.shape[:-1] == lead and y.ndim == x.ndim:
        one_hot = True
    else:
        raise ValueError(
            f"{where}: labels have shape {y.shape} for inputs of shape {x.shape}; expected "
            f"one-hot labels {lead + ('C',)} or integer class indices {lead}.")
    found = _first_nonfinite(x, "inputs", where)
    if found:
        raise ValueError(f"{where}: {found[1]}")
    if one_hot:
        if num_classes is not None and y.shape[-1] != num_classes:
            raise ValueError(f"{where}: labels have {y.shape[-1]} classes (shape {y.shape}) "
                             f"but the learner predicts {num_classes}.")
        if y.dtype.kind not in "biufV":
            raise ValueError(f"{where}: labels have dtype {y.dtype}; expected numbers.")
        with np.errstate(invalid="ignore"):
            ok = np.all((y == 0) | (y == 1), axis=-1) & (np.sum(y, axis=-1) == 1)
        if not ok.all():
            idx = _first(~ok)
            raise ValueError(
                f"{where}: labels{_index(idx)} is not one-hot ({_describe_row(y[idx])}); "
                f"{int((~ok).sum())} rows are not. {ONE_HOT_FIX}.")
        return
    if num_classes is None:
        raise ValueError(f"{where}: labels of shape {y.shape} are class indices; pass "
                         "num_classes to check them.")
    _check_class_indices(y, num_classes, "labels", where)


def _check_class_indices(y: np.ndarray, num_classes: int, what: str, where: str,
                         example: bool = False) -> None:
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: {what} are class indices of dtype {y.dtype}; expected integers "
            f"in [0, {num_classes}) (cast with .astype(np.int32) if they are whole numbers).")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        idx = _first(bad)
        name = f"example {idx[0]}: " if example else ""
        raise ValueError(
            f"{where}: {name}{what}{_index(idx)} = {int(y[idx])} is not a class index in "
            f"[0, {num_classes}) ({int(bad.sum())} such labels); remap the labels to "
            f"0..{num_classes - 1} or build the learner for more classes.")


def check_dataset_values(images: Any, labels: Any, num_classes: int,
                         name: str = "dataset") -> None:
    """Raises ValueError unless a data set's values can be learned from.

    Args:
      images: [N, D] or [N, H, W] (any trailing shape) real numbers, all finite
        (uint8 images always pass).
      labels: [N] integer class indices in [0, num_classes).
      num_classes: C.
      name: names the data set in the message (e.g. "mnist/train").
    Raises:
      ValueError naming the first bad example, e.g. "mnist/train: example 37:
      images[37, 412] is nan" or "example 5: labels[5] = 12 is not a class
      index in [0, 10)", with the fix.
    """
    x = _as_host(images, "images", name)
    y = _as_host(labels, "labels", name)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: images have shape {x.shape}; expected [N, D] (or "
                         "[N, H, W]) with N >= 1 examples.")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name}: labels have shape {y.shape}; expected one integer "
                         f"class index per image, [{x.shape[0]}].")
    found = _first_nonfinite(x, "images", name)
    if found:
        raise ValueError(f"{name}: example {found[0][0]}: {found[1]}")
    _check_class_indices(y, num_classes, "labels", name, example=True)


def check_dataset(data: Any, name: Optional[str] = None) -> None:
    """`check_dataset_values` of a `vsml_jax.data.Dataset` (images [N, D], labels [N],
    num_classes), named by `name` or the data set's own name."""
    check_dataset_values(data.images, data.labels, data.num_classes,
                         name or getattr(data, "name", "") or "dataset")


# ----------------------------------------------------------- traced (checkify)
def _index_format(ndim: int) -> str:
    return "[" + ", ".join(["{}"] * ndim) + "]"


def stream_value_checks(inputs: jax.Array, labels: jax.Array, *, where: str = "unroll"
                        ) -> None:
    """`checkify.check`s that inputs [..., D] are finite and labels [..., C] one-hot.

    Traceable: call it inside a function that `jax.experimental.checkify.checkify`
    transforms (as `checkify_unroll` does); a failure names the first bad index
    and value, e.g. "unroll: inputs[3, 17] is nan (not finite)".
    """
    bad = ~jnp.isfinite(inputs)
    idx = jnp.unravel_index(jnp.argmax(bad.reshape(-1)), bad.shape)
    checkify.check(~jnp.any(bad),
                   where + ": inputs" + _index_format(inputs.ndim) + " is {} (not finite); "
                   "repair or drop such examples before the episode.",
                   *idx, inputs[idx])
    ok = jnp.all((labels == 0) | (labels == 1), axis=-1) & (jnp.sum(labels, axis=-1) == 1)
    row = jnp.unravel_index(jnp.argmax(~ok.reshape(-1)), ok.shape)
    checkify.check(jnp.all(ok),
                   where + ": labels" + _index_format(ok.ndim) + " is not one-hot (sum {}): "
                   "{}; " + ONE_HOT_FIX + ".",
                   *row, jnp.sum(labels[row]), labels[row])


def checkify_unroll(unroll_fn: Callable, *, float_checks: bool = False,
                    where: str = "unroll") -> Callable:
    """Wraps any unroll(params, state, (inputs, labels)) -> (state, out) with checks.

    Args:
      unroll_fn: e.g. `Learner.unroll` of VS-ML or of a baseline.
      float_checks: also report the first NaN produced and any division by zero
        inside the episode (`checkify.float_checks`; instruments every op, slower).
      where: names the caller in messages.
    Returns:
      checked(params, state, data) -> (err, (state, out)), pure and jittable;
      `err.throw()` (outside jit) raises the first failure, `err.get()` gives
      its message or None. The data are checked before the episode runs:
      inputs finite, labels one-hot (`stream_value_checks`).

        checked = jax.jit(vsml_jax.checks.checkify_unroll(learner.unroll))
        err, (state, out) = checked(params, state, (x, y))
        err.throw()
    """
    errors = checkify.user_checks | (checkify.float_checks if float_checks else set())

    def run(params, state, data):
        inputs, labels = data
        stream_value_checks(jnp.asarray(inputs), jnp.asarray(labels), where=where)
        return unroll_fn(params, state, data)

    return checkify.checkify(run, errors=errors)


def checked_unroll(params, state, data, *, float_checks: bool = False, **unroll_kwargs
                   ) -> Tuple[checkify.Error, Tuple[Any, Any]]:
    """`vsml_jax.unroll` with value checks: returns (err, (state, out)).

    Opt-in: the default `unroll` checks no values and stays as fast as it is.
    Checks that inputs are finite and labels one-hot before the episode (and,
    with float_checks=True, the first NaN / division by zero inside it);
    `unroll_kwargs` (impl, remat, remat_chunk) go to `unroll`. Shape errors
    still raise ValueError at once. Composes with jit and vmap:

        checked = jax.jit(vsml_jax.checked_unroll,
                          static_argnames=("impl", "remat", "remat_chunk", "float_checks"))
        err, (state, out) = checked(params, state, (inputs, labels))
        err.throw()   # outside jit; e.g. JaxRuntimeError:
                      # "checked_unroll: inputs[37, 412] is nan (not finite); ..."
        if err.get() is None: ...   # or inspect without raising
    """
    fn = functools.partial(unroll, **unroll_kwargs)
    return checkify_unroll(fn, float_checks=float_checks, where="checked_unroll")(
        params, state, data)
