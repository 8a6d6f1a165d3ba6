"""Reader for the IDX file format used by MNIST and Fashion-MNIST.

An IDX file is a tiny header followed by a dense big-endian array:

    bytes 0-1   0x00 0x00            (magic)
    byte  2     dtype code           (0x08 uint8, 0x09 int8, 0x0B int16,
                                      0x0C int32, 0x0D float32, 0x0E float64)
    byte  3     ndim
    4 * ndim    dimensions, big-endian uint32
    ...         prod(dims) items of the dtype, row-major

Files are usually distributed gzip-compressed (``*.gz``). Every way a file can
be broken raises `IDXError`, whose message names the file, the exact problem
and how to fix it, because a half-downloaded data file otherwise surfaces much
later as a baffling shape error or as silently wrong training curves.
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

GZIP_MAGIC = b"\x1f\x8b"

# dtype code -> big-endian numpy dtype, as in the IDX specification.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_FIX = "delete it and download again (or pass download=True to re-fetch it)"


class IDXError(ValueError):
    """A file is not a valid IDX file (or not the one that was expected)."""


def _fail(path: str, problem: str, fix: str = _FIX) -> IDXError:
    return IDXError(f"{path}: {problem}. The file is corrupt or incomplete: {fix}.")


def _read_bytes(path: str) -> bytes:
    """Returns the decompressed bytes of `path` (gzip if named .gz or if gzipped)."""
    with open(path, "rb") as f:
        raw = f.read()
    is_gzip = raw[:2] == GZIP_MAGIC
    if path.endswith(".gz") and not is_gzip:
        fix = _FIX
        if raw[:2] == b"\x00\x00":
            fix = (f"it looks like an uncompressed IDX file, so rename it to "
                   f"{path[:-3]}, or {_FIX}")
        raise _fail(path, f"named .gz but is not gzip data (first bytes "
                          f"{raw[:4].hex() or 'none: the file is empty'}, expected "
                          f"1f8b...)", fix)
    if not is_gzip:
        return raw
    # A raw-named file that is gzip data is decompressed anyway: renaming a
    # download should not make it unreadable.
    try:
        return gzip.decompress(raw)
    except EOFError as e:
        raise _fail(path, f"gzip stream is truncated ({len(raw)} compressed bytes; {e})")
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise _fail(path, f"gzip data is damaged ({e})")


def parse_idx(data: bytes, path: str = "<bytes>",
              expect_dtype: Optional[np.dtype] = None,
              expect_ndim: Optional[int] = None) -> np.ndarray:
    """Parses decompressed IDX bytes into a read-only array.

    Args:
      data: the complete, decompressed file contents.
      path: used in error messages only.
      expect_dtype: if given, the header's dtype must be this one.
      expect_ndim: if given, the header's ndim must be this one.

    Returns:
      An array with the header's shape in native byte order, e.g. uint8
      [N, 28, 28] for images or uint8 [N] for labels. It is marked read-only
      because loaders cache and share it.
    """
    if len(data) < 4:
        raise _fail(path, f"only {len(data)} bytes, too short for the 4-byte IDX header")
    if data[0] != 0 or data[1] != 0:
        raise _fail(path, f"bad magic number 0x{data[:4].hex()} (an IDX file "
                          f"starts with two zero bytes, a dtype code and ndim)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise _fail(path, f"unknown IDX dtype code 0x{code:02X} (known: {known})")
    dtype = IDX_DTYPES[code]
    if expect_dtype is not None and dtype.newbyteorder("=") != np.dtype(expect_dtype):
        raise _fail(path, f"wrong IDX dtype code 0x{code:02X} ({dtype.newbyteorder('=')}), "
                          f"expected {np.dtype(expect_dtype)}")
    if ndim == 0:
        raise _fail(path, "header declares ndim 0; IDX arrays have at least 1 dimension")
    if expect_ndim is not None and ndim != expect_ndim:
        raise _fail(path, f"header declares {ndim} dimensions, expected {expect_ndim}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise _fail(path, f"truncated header: {ndim} dimensions need {header_len} bytes, "
                          f"file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    count = shape[0]
    item_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    expected = count * item_bytes
    actual = len(data) - header_len
    if actual != expected:
        raise _fail(path, _size_problem(shape, item_bytes, expected, actual))
    arr = np.frombuffer(data, dtype, count=int(np.prod(shape, dtype=np.int64)),
                        offset=header_len).reshape(shape)
    if dtype.byteorder not in ("=", "|") and dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    arr.flags.writeable = False
    return arr


def _size_problem(shape, item_bytes: int, expected: int, actual: int) -> str:
    """Says whether a payload of the wrong size is truncated, padded or miscounted."""
    count = shape[0]
    whole = item_bytes > 0 and actual % item_bytes == 0
    if whole:
        # A whole number of items: the header's count disagrees with the payload.
        return (f"count mismatch: header declares {count} items of shape "
                f"{tuple(shape[1:])} ({expected} bytes) but the payload holds "
                f"{actual // item_bytes} items ({actual} bytes)")
    if actual < expected:
        return (f"truncated data: header declares shape {tuple(shape)} "
                f"({expected} bytes of data) but only {actual} bytes follow")
    return (f"trailing garbage: {actual - expected} unexpected bytes after the "
            f"{expected} bytes of data declared by the header (shape {tuple(shape)})")


def read_idx(path: PathLike, *, expect_dtype: Optional[np.dtype] = None,
             expect_ndim: Optional[int] = None) -> np.ndarray:
    """Reads an IDX file, gzip-compressed (``.gz``) or raw.

    Args:
      path: file to read.
      expect_dtype, expect_ndim: optional checks of the header (see `parse_idx`).

    Returns:
      Read-only array, e.g. uint8 [N, 28, 28] (images) or uint8 [N] (labels).

    Raises:
      IDXError: bad magic, unknown or unexpected dtype code, truncated data,
        count mismatch, trailing garbage, or a ``.gz`` file that is not gzip.
      FileNotFoundError: the file does not exist.
    """
    path = os.fspath(path)
    return parse_idx(_read_bytes(path), path, expect_dtype=expect_dtype,
                     expect_ndim=expect_ndim)


def check_images_labels(images: np.ndarray, labels: np.ndarray, *,
                        num_classes: int = 10, images_path: str = "images",
                        labels_path: str = "labels") -> None:
    """Checks that an image file and a label file belong together.

    Args:
      images: [N, H, W] images.
      labels: [N] integer labels.
      num_classes: labels must lie in 0..num_classes-1.
      images_path, labels_path: named in error messages.

    Raises:
      IDXError: counts differ, labels are not 1-D, or a label is out of range.
    """
    if labels.ndim != 1:
        raise _fail(labels_path, f"labels must be 1-D, got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise IDXError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the two files come from different versions "
            f"or one is damaged: {_FIX} (both files).")
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise _fail(labels_path, f"labels must lie in 0..{num_classes - 1}, "
                                     f"found values in {lo}..{hi}")
