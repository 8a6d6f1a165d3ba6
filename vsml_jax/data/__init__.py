"""Data layer: IDX files, dataset look-up and download, episode sampling."""
from vsml_jax.data.episodes import (
    PIXEL_MEAN,
    PIXEL_STD,
    Dataset,
    make_dataset,
    normalize_images,
    pool_images,
    sample_episode,
    sample_episodes,
    synthetic_dataset,
)
from vsml_jax.data.idx import IDXError, check_images_labels, parse_idx, read_idx
from vsml_jax.data.sources import (
    DATASETS,
    ChecksumError,
    DatasetNotFoundError,
    DownloadError,
    clear_cache,
    default_cache_dir,
    download_dataset,
    download_file,
    load_dataset,
    load_idx_pair,
)

__all__ = [
    "PIXEL_MEAN", "PIXEL_STD", "Dataset", "make_dataset", "normalize_images",
    "pool_images", "sample_episode", "sample_episodes", "synthetic_dataset",
    "IDXError", "check_images_labels", "parse_idx", "read_idx",
    "DATASETS", "ChecksumError", "DatasetNotFoundError", "DownloadError",
    "clear_cache", "default_cache_dir", "download_dataset", "download_file",
    "load_dataset", "load_idx_pair",
]
