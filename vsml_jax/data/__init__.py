"""Data layer: data sets by spec, IDX files, look-up and download, episode sampling.

    data = make_dataset("mnist", "train", pool=4)            # Dataset, images [N, 49]
    data = make_dataset("npz:letters.npz", "test", input_size=784)
    data = make_dataset("mnist,fashion_mnist", "train")      # one data set per episode
    x = normalize(images)    # uint8 / [0, 1] float, grey / RGB, any size -> [N, D]

Inputs of every learner MUST be standardised by `normalize` (what
`make_dataset` does): see `vsml_jax.data.images`. The spec grammar is in
`vsml_jax.data.specs`.
"""
from vsml_jax.data.episodes import (
    Dataset,
    DatasetPart,
    make_mixture,
    sample_episode,
    sample_episodes,
    synthetic_dataset,
)
from vsml_jax.data.files import (
    DatasetFormatError,
    RawSplit,
    clear_cache,
    load_idx_dir,
    load_npz,
    load_tfds,
)
from vsml_jax.data.idx import IDXError, check_images_labels, parse_idx, read_idx
from vsml_jax.data.images import (
    GREY_WEIGHTS,
    PIXEL_MEAN,
    PIXEL_STD,
    normalize,
    normalize_images,
    pool_images,
    target_side,
)
from vsml_jax.data.sources import (
    DATASETS,
    ChecksumError,
    DatasetNotFoundError,
    DownloadError,
    default_cache_dir,
    download_dataset,
    download_file,
    load_dataset,
    load_idx_pair,
    locate_dataset,
)
from vsml_jax.data.specs import load_split, make_dataset, split_spec

__all__ = [
    "PIXEL_MEAN", "PIXEL_STD", "GREY_WEIGHTS", "Dataset", "DatasetPart", "make_dataset",
    "make_mixture", "normalize", "normalize_images", "pool_images", "target_side",
    "sample_episode", "sample_episodes", "synthetic_dataset",
    "split_spec", "load_split", "RawSplit", "DatasetFormatError",
    "load_idx_dir", "load_npz", "load_tfds",
    "IDXError", "check_images_labels", "parse_idx", "read_idx",
    "DATASETS", "ChecksumError", "DatasetNotFoundError", "DownloadError",
    "clear_cache", "default_cache_dir", "download_dataset", "download_file",
    "load_dataset", "locate_dataset", "load_idx_pair",
]
