"""Image-classification data sets from your own files and from tensorflow-datasets.

Three sources besides the built-in MNIST and Fashion-MNIST (`sources`), each a
`RawSplit`: the images as stored, integer labels, the number of classes and
where they were read from. `vsml_jax.data.make_dataset` turns one into a
learner's inputs (grey, resized, standardised: `vsml_jax.data.normalize`).

``idx:DIR``   the original MNIST layout in DIR:
              ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each gzipped
              (``.gz``) or not (e.g. KMNIST, EMNIST after renaming);
``npz:FILE``  a numpy ``.npz`` with arrays ``x_train, y_train, x_test, y_test``
              (the layout of Keras' ``mnist.npz``);
``tfds:NAME`` a tensorflow-datasets image-classification set that is already
              prepared (``as_supervised``: its (image, label) pair).

Images are [N, H, W] (grey) or [N, H, W, C] with C = 1 or 3, either integers in
0..255 (uint8) or floats in [0, 1]. Labels are integers; the number of
classes C is max label + 1 over every split present (for tfds, its
ClassLabel's count), and every class 0..C-1 must occur somewhere, so labels
counted from 1 (1..C) are an error rather than a data set with an empty class 0.

Nothing here downloads: these are your files (a tfds set is prepared once with
``tfds.builder(NAME).download_and_prepare()``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from vsml_jax.data.sources import (
    DatasetNotFoundError,
    _find_in_dir,
    clear_source_caches,
    load_idx_pair,
    split_files,
)

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
TFDS_SPLITS = ("train", "test")


class DatasetFormatError(ValueError):
    """A data file exists but does not hold a usable image-classification set."""


@dataclass(frozen=True)
class RawSplit:
    """One split of a data set as stored.

    Attributes:
      images: [N, H, W] or [N, H, W, C] (C in 1, 3): integers in 0..255 or
        floats in [0, 1]. Read-only.
      labels: int32 [N] in 0..num_classes-1. Read-only.
      num_classes: C, the same for every split of the data set.
      source: the folder, file or tfds set the split was read from.
    """
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    source: str


def _check_split(split: str) -> None:
    if split not in TFDS_SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {list(TFDS_SPLITS)}.")


def count_classes(labels: Dict[str, np.ndarray], where: str) -> int:
    """C = max label + 1 over all splits, after checking the labels.

    Args:
      labels: {split: int [N]} for every split present.
      where: names the data set in error messages.

    Raises:
      DatasetFormatError: negative labels, fewer than 2 classes, or a class in
        0..C-1 that never occurs (e.g. labels counted from 1).
    """
    every = np.concatenate([np.asarray(v).reshape(-1) for v in labels.values()])
    if every.size == 0:
        raise DatasetFormatError(f"{where}: no labels at all.")
    lo, hi = int(every.min()), int(every.max())
    if lo < 0:
        raise DatasetFormatError(f"{where}: labels must be class indices 0..C-1, found "
                                 f"{lo}..{hi}; map them to 0..C-1 first.")
    num_classes = hi + 1
    missing = np.setdiff1d(np.arange(num_classes), every)
    if missing.size:
        shown = ", ".join(map(str, missing[:10].tolist())) + (" ..." if missing.size > 10
                                                             else "")
        hint = (" (they look counted from 1: subtract 1)" if missing.tolist() == [0]
                else "")
        raise DatasetFormatError(
            f"{where}: labels must be 0..C-1 with every class present; with labels "
            f"{lo}..{hi} the classes {shown} never occur{hint}. Map the labels to "
            f"0..C-1 with C the number of classes.")
    if num_classes < 2:
        raise DatasetFormatError(f"{where}: all labels are {hi}; a classification task "
                                 "needs at least 2 classes.")
    return num_classes


def _labels_1d(labels: np.ndarray, where: str) -> np.ndarray:
    """int32 [N] from integer [N] or [N, 1] (Keras' CIFAR layout)."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DatasetFormatError(f"{where}: labels have shape {labels.shape}; expected "
                                 "[N] (or [N, 1]) class indices, not one-hot rows.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(f"{where}: labels have dtype {labels.dtype}; class "
                                 "indices must be integers (e.g. y.astype(np.int64)).")
    return labels.astype(np.int32)


def _check_images(images: np.ndarray, where: str) -> None:
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DatasetFormatError(f"{where}: images have shape {images.shape}; expected "
                                 "[N, H, W] (grey) or [N, H, W, C] with C = 1 or 3.")
    if not (np.issubdtype(images.dtype, np.integer)
            or np.issubdtype(images.dtype, np.floating)):
        raise DatasetFormatError(f"{where}: images have dtype {images.dtype}; use uint8 "
                                 "(0..255) or floats in [0, 1].")


def _read_only(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.flags.writeable = False


# ---------------------------------------------------------------------- idx:DIR
def load_idx_dir(folder: str, split: str) -> RawSplit:
    """A split of an IDX folder (the original MNIST layout).

    Args:
      folder: holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each may end
        in ``.gz``). The other split's labels, if there, count the classes too.
      split: "train" or "test".

    Returns:
      RawSplit with images [N, H, W(, C)] as stored.
    """
    _check_split(split)
    folder = os.path.abspath(os.path.expanduser(folder))
    names = {s: split_files(s) for s in TFDS_SPLITS}
    paths, reason = _find_in_dir(folder, names[split])
    if paths is None:
        wanted = ", ".join(n[:-len(".gz")] for s in TFDS_SPLITS for n in names[s])
        raise DatasetNotFoundError(
            f"idx:{folder}: the {split} split is not there ({reason}). An idx: folder "
            f"holds the four files of the original MNIST layout: {wanted} (each may "
            "be gzipped, with .gz); point idx: at such a folder.")
    images, labels = load_idx_pair(*paths, num_classes=None)
    all_labels = {split: labels}
    other = "test" if split == "train" else "train"
    other_paths, _ = _find_in_dir(folder, names[other])
    if other_paths is not None:
        all_labels[other] = load_idx_pair(*other_paths, num_classes=None)[1]
    num_classes = count_classes(all_labels, f"idx:{folder} ({paths[1]})")
    return RawSplit(images=images, labels=labels, num_classes=num_classes, source=folder)


# --------------------------------------------------------------------- npz:FILE
@functools.lru_cache(maxsize=8)
def _load_npz_cached(path: str, split: str, _stamp: Tuple) -> RawSplit:
    fix = ("write it with np.savez(FILE, x_train=images [N, H, W] or [N, H, W, C], "
           "y_train=labels [N], x_test=..., y_test=...)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetFormatError(f"{path}: not a readable .npz file ({e}); {fix}.") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DatasetFormatError(f"{path}: holds a single array, not an .npz archive "
                                 f"with {', '.join(NPZ_KEYS)}; {fix}.")
    suffix = "train" if split == "train" else "test"
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise DatasetFormatError(
                f"{path}: missing key(s) {', '.join(missing)} (it has "
                f"{', '.join(npz.files) or 'no arrays'}); an npz data set holds "
                f"{', '.join(NPZ_KEYS)}: {fix}.")
        try:
            images = np.asarray(npz[f"x_{suffix}"])
            labels = {s: np.asarray(npz[f"y_{s}"]) for s in TFDS_SPLITS}
        except (OSError, ValueError) as e:  # damaged members, object arrays
            raise DatasetFormatError(f"{path}: cannot read its arrays ({e}); {fix}.") from e
    labels = {s: _labels_1d(y, f"{path}: y_{s}") for s, y in labels.items()}
    _check_images(images, f"{path}: x_{suffix}")
    if images.shape[0] != labels[suffix].shape[0]:
        raise DatasetFormatError(
            f"{path}: x_{suffix} holds {images.shape[0]} images but y_{suffix} holds "
            f"{labels[suffix].shape[0]} labels; every image needs exactly one label: "
            f"{fix}.")
    num_classes = count_classes(labels, path)
    _read_only(images, labels[suffix])
    return RawSplit(images=images, labels=labels[suffix], num_classes=num_classes,
                    source=path)


def load_npz(path: str, split: str) -> RawSplit:
    """A split of an .npz file with x_train, y_train, x_test, y_test.

    Images [N, H, W] or [N, H, W, C] (C = 1 or 3), uint8 / integers in 0..255 or
    floats in [0, 1] (checked when they are normalised); labels integer [N]
    (or [N, 1]). Cached in-process by path, size and modification time.

    Args:
      path: the .npz file.
      split: "train" (x_train, y_train) or "test" (x_test, y_test).

    Returns:
      RawSplit; C counts the labels of both splits.
    """
    _check_split(split)
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        where = os.path.dirname(path)
        why = "is not a file" if os.path.exists(path) else "does not exist"
        if not os.path.isdir(where):
            why += f" (nor does its folder {where})"
        raise DatasetNotFoundError(
            f"npz:{path} {why}. Give the path of an .npz file holding "
            f"{', '.join(NPZ_KEYS)} (e.g. Keras' mnist.npz), relative to the current "
            "directory or absolute.")
    st = os.stat(path)
    return _load_npz_cached(path, split, (st.st_size, st.st_mtime_ns))


# -------------------------------------------------------------------- tfds:NAME
def _tfds_error(name: str, problem: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"tfds:{name}: {problem}. vsml_jax never downloads or prepares tfds sets; "
        f"prepare it once with: python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir=DIR).download_and_prepare()\" (DIR: the "
        "data_dir / --data_dir you pass, else tfds' default $TFDS_DATA_DIR or "
        "~/tensorflow_datasets).")


def _has_tensorflow() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=8)
def _load_tfds_cached(name: str, split: str, data_dir: Optional[str]) -> RawSplit:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetNotFoundError(
            f"tfds:{name}: tensorflow_datasets is not installed ({e}). Install it with "
            "pip install 'vsml_jax[tfds]' (plus tensorflow to read sets stored as "
            "tfrecord, the default), or use idx:DIR / npz:FILE.") from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        where = data_dir or "tfds' default data folder ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
        raise DatasetNotFoundError(
            f"tfds:{name}: tensorflow-datasets finds no data set {name!r}: no builder of "
            f"that name is registered and no prepared copy is in {where} "
            f"({str(e).splitlines()[0]}). Check the name (tfds.list_builders()) and "
            "the data_dir / --data_dir.") from e
    where = f"in {builder.data_dir}"
    if not builder.is_prepared():
        raise _tfds_error(name, f"the data set is not prepared (looked {where})")
    info = builder.info
    keys = info.supervised_keys
    if not keys or len(keys) < 2 or not all(isinstance(k, str) for k in keys[:2]):
        raise DatasetFormatError(
            f"tfds:{name}: its supervised_keys are {keys!r}, not (image, label); only "
            "image-classification sets can be used.")
    image_key, label_key = keys[0], keys[1]
    if split not in info.splits:
        raise DatasetFormatError(f"tfds:{name}: has no {split!r} split (it has "
                                 f"{', '.join(info.splits)}); the train and test splits "
                                 "are used.")
    fmt = getattr(info.file_format, "value", str(info.file_format))
    if fmt == "array_record":
        # Random-access files: read as a data source, which needs no TensorFlow.
        source = builder.as_data_source(split=split)
        rows = source.__getitems__(range(len(source)))
        images = np.stack([np.asarray(r[image_key]) for r in rows])
        labels = np.asarray([r[label_key] for r in rows])
    else:
        if not _has_tensorflow():
            raise DatasetNotFoundError(
                f"tfds:{name}: stored as {fmt} {where}, which tensorflow-datasets reads "
                "only with TensorFlow: pip install tensorflow (or prepare the set with "
                "file_format='array_record').")
        images, labels = tfds.as_numpy(builder.as_dataset(
            split=split, as_supervised=True, batch_size=-1, shuffle_files=False))
        images, labels = np.asarray(images), np.asarray(labels)
    where = f"tfds:{name} ({split}, {builder.data_dir})"
    _check_images(images, where)
    labels = _labels_1d(labels, where)
    feature = info.features[label_key]
    if getattr(feature, "num_classes", None):
        num_classes = int(feature.num_classes)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetFormatError(f"{where}: labels {labels.min()}..{labels.max()} "
                                     f"outside its {num_classes} classes.")
    else:
        num_classes = count_classes({split: labels}, where)
    _read_only(images, labels)
    return RawSplit(images=images, labels=labels, num_classes=num_classes,
                    source=f"tfds:{name} ({builder.data_dir})")


def load_tfds(name: str, split: str, data_dir: Optional[str] = None) -> RawSplit:
    """A split of a prepared tensorflow-datasets image-classification set.

    Read as its supervised (image, label) pair: sets stored as array_record
    through ``as_data_source`` (no TensorFlow needed), all others (tfrecord,
    tfds' default) through ``as_dataset(as_supervised=True)``, which needs
    TensorFlow. Never downloads or prepares anything.

    Args:
      name: a tfds name, optionally with config and version ("mnist",
        "emnist/letters", "cifar10:3.0.2").
      split: "train" or "test".
      data_dir: tfds' data folder; default tfds' own ($TFDS_DATA_DIR or
        ~/tensorflow_datasets). When given, the only place looked at.

    Returns:
      RawSplit; C from the label feature's ClassLabel (else max label + 1).
      Every image of the split must have one size.
    """
    _check_split(split)
    if data_dir is not None:
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    return _load_tfds_cached(name, split, data_dir)


def clear_file_caches() -> None:
    """Forgets the npz and tfds arrays loaded so far."""
    _load_npz_cached.cache_clear()
    _load_tfds_cached.cache_clear()


def clear_cache() -> None:
    """Forgets every array loaded so far, here and in `sources` (frees memory,
    forces re-reading)."""
    clear_source_caches()
    clear_file_caches()


__all__ = ["DatasetFormatError", "RawSplit", "count_classes", "load_idx_dir", "load_npz",
           "load_tfds", "clear_file_caches", "clear_cache", "NPZ_KEYS"]
