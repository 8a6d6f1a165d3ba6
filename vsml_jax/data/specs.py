"""Data sets named by a spec string, wherever a data set is named.

Grammar (what ``--dataset`` / ``--datasets`` flags and `make_dataset` take)::

    SPEC := PART ( ("," | "+") PART )*        several parts: a mixture
    PART := "mnist" | "fashion_mnist"          the built-in sets (looked up and
                                               downloaded as BUILD.md says)
          | "idx:" DIR                         the 4 IDX files of the MNIST layout
          | "npz:" FILE                        x_train, y_train, x_test, y_test
          | "tfds:" NAME                       a prepared tensorflow-datasets set

Only the first ":" separates the kind from its argument (``tfds:cifar10:3.0.2``
works); a DIR or FILE cannot contain "," or "+". Relative paths are relative to
the current directory. "synthetic" is not a spec: callers build it with
`synthetic_dataset`. Command-line flags that are lists (``--datasets`` of
experiments.evaluate and fig5) split on ",", so there a mixture is written with
"+": ``--datasets=mnist+fashion_mnist,npz:letters.npz``.

`data_dir` is where the built-in sets are looked for (``<data_dir>/<name>/``)
and tfds' data folder for ``tfds:``; ``idx:`` and ``npz:`` name their files
themselves and ignore it. `download` only applies to the built-in sets: an
``idx:``/``npz:`` set is yours and a ``tfds:`` set is prepared with tfds, so for
them it is ignored.
"""
from __future__ import annotations

import re
from typing import List, Optional

import jax.numpy as jnp

from vsml_jax.data.episodes import Dataset, make_mixture
from vsml_jax.data.files import RawSplit, load_idx_dir, load_npz, load_tfds
from vsml_jax.data.images import normalize, target_side
from vsml_jax.data.sources import DATASETS, locate_dataset

PREFIXES = ("idx", "npz", "tfds")
GRAMMAR = ("mnist, fashion_mnist, idx:DIR (IDX files of the MNIST layout), npz:FILE "
           "(x_train, y_train, x_test, y_test), tfds:NAME (a prepared tensorflow-datasets "
           "set), or several joined by ',' or '+' (a mixture)")


def split_spec(spec: str) -> List[str]:
    """The parts of a spec, each checked against the grammar.

    Args:
      spec: e.g. "mnist", "npz:data/letters.npz", "mnist+fashion_mnist".

    Returns:
      ["mnist"], ["npz:data/letters.npz"], ["mnist", "fashion_mnist"].

    Raises:
      ValueError: an empty part or an unknown data set (message gives the grammar).
    """
    if not isinstance(spec, str):
        raise ValueError(f"dataset spec {spec!r} is not a string; use {GRAMMAR}.")
    parts = [p.strip() for p in re.split(r"[,+]", spec)]
    if not spec.strip() or any(not p for p in parts):
        raise ValueError(f"dataset spec {spec!r} has an empty part; use {GRAMMAR}.")
    for part in parts:
        kind, sep, arg = part.partition(":")
        if sep and kind in PREFIXES and arg.strip():
            continue
        if not sep and part in DATASETS:
            continue
        if part == "synthetic":
            raise ValueError("dataset 'synthetic' is not loaded from files: build it with "
                             "vsml_jax.data.synthetic_dataset (the entry points' "
                             "--dataset=synthetic does).")
        hint = (f" (did you mean tfds:{part}?)" if not sep else
                f" (give the {kind} after the ':')" if kind in PREFIXES else "")
        raise ValueError(f"dataset {part!r} is unknown{hint}; use {GRAMMAR}.")
    return parts


def load_split(part: str, split: str, data_dir: Optional[str] = None,
               download: bool = False) -> RawSplit:
    """The stored images and labels of one part of a spec (no preprocessing).

    Args:
      part: one PART of the grammar (see the module doc).
      split: "train" or "test".
      data_dir: for the built-in sets and tfds: (see the module doc).
      download: for the built-in sets only.

    Returns:
      RawSplit: images [N, H, W(, C)] as stored, labels int32 [N], C, source.
    """
    (part,) = split_spec(part)
    kind, _, arg = part.partition(":")
    if kind == "idx":
        return load_idx_dir(arg, split)
    if kind == "npz":
        return load_npz(arg, split)
    if kind == "tfds":
        return load_tfds(arg, split, data_dir=data_dir)
    images, labels, source = locate_dataset(part, split, data_dir=data_dir,
                                            download=download)
    return RawSplit(images=images, labels=labels, num_classes=DATASETS[part].num_classes,
                    source=source)


def make_dataset(spec: str, split: str, data_dir: Optional[str] = None, pool: int = 1,
                 download: bool = False, input_size: Optional[int] = None) -> Dataset:
    """Loads a data set by spec and turns it into a learner's inputs.

    Every image is made grey, resized to S x S and standardised by
    `vsml_jax.data.normalize` (MNIST-like 28x28 sets with S dividing 28 are
    average-pooled exactly, as the shipped learners were trained).

    Args:
      spec: see the module doc, e.g. "mnist", "idx:~/kmnist", "npz:letters.npz",
        "tfds:cifar10", or a mixture "mnist,fashion_mnist".
      split: "train" or "test".
      data_dir: an explicit folder for the built-in sets (``<data_dir>/<name>/``,
        the only place then looked at) and tfds' data folder for tfds:; else
        $VSML_DATA_DIR and the other defaults (see `load_dataset`).
      pool: S = 28 // pool when input_size is None: 1, 2 or 4 -> D = 784, 196, 49.
      download: fetch a missing built-in set (into data_dir when given, else
        the cache); ignored for idx:, npz: and tfds:.
      input_size: D = S * S, any square number (wins over pool).

    Returns:
      Dataset with images float32 [N, D], labels int32 [N], C from the data
      (the largest C of the parts for a mixture), name the spec part, and
      source the folder / file / tfds set read. A mixture samples one data set
      per episode (`make_mixture`).
    """
    parts = split_spec(spec)
    target_side(input_size, pool)  # a bad size fails before any file is read
    if len(parts) > 1:
        return make_mixture([make_dataset(p, split, data_dir=data_dir, pool=pool,
                                          download=download, input_size=input_size)
                             for p in parts])
    raw = load_split(parts[0], split, data_dir=data_dir, download=download)
    images = normalize(raw.images, input_size=input_size, pool=pool,
                       where=f"{parts[0]} ({raw.source}) {split}")
    return Dataset(images=images, labels=jnp.asarray(raw.labels, dtype=jnp.int32),
                   num_classes=raw.num_classes, name=parts[0], source=raw.source)
