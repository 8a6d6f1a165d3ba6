"""Finding, downloading and loading MNIST and Fashion-MNIST as uint8 arrays.

(Other data sets, from folders, files and tensorflow-datasets, are loaded by
`vsml_jax.data.files`; `vsml_jax.data.make_dataset` takes both.)

With an explicit ``data_dir`` argument, `load_dataset` looks only in
``<data_dir>/<name>/`` (and with ``download=True`` downloads into it): a
folder that was named but lacks the files is an error naming that folder, never
a reason to read some other copy. Without one it looks in these places, in
order, and uses the first that has both files of the split
(``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``):

1. ``$VSML_DATA_DIR/<name>/``;
2. for fashion_mnist, ``/usr/share/datasets/fashion-mnist/`` (Debian package
   ``dataset-fashion-mnist``; the files sit directly in that folder);
3. the user cache ``$VSML_CACHE_DIR/<name>/`` (default
   ``${XDG_CACHE_HOME:-~/.cache}/vsml_jax/<name>/``);
4. tensorflow-datasets, if importable and the dataset was prepared before
   (it is never asked to download);
5. only with ``download=True``: the original URLs, into the cache of step 3,
   each file checked against its published MD5.

There is no fallback to fake data: if every step fails, `DatasetNotFoundError`
lists each place with the reason it failed and how to fix it. Files that exist
but are corrupt raise `IDXError` at once instead of being skipped, since a
damaged file deserves attention rather than being silently shadowed.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

# urllib (standard library) rather than requests: fetching four static files
# needs nothing more, and the data layer should not add a dependency that every
# user installs only for a one-off download.
import urllib.error
import urllib.request

import numpy as np

from vsml_jax.data.idx import IDXError, check_images_labels, read_idx

DATA_DIR_ENV = "VSML_DATA_DIR"
CACHE_DIR_ENV = "VSML_CACHE_DIR"
MIRROR_ENV = "VSML_DATA_MIRROR"

SPLITS = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset is published and the MD5 of each published .gz file.

    `mirrors` are base URLs tried in order; ``{name}`` in a URL is replaced by
    the dataset name. `system_dirs` are folders that OS packages install the
    files into directly (no ``<name>`` sub-folder). `num_classes`: labels lie
    in 0..num_classes-1 (checked on every load).
    """

    mirrors: Tuple[str, ...]
    md5: Mapping[str, str]
    system_dirs: Tuple[str, ...] = ()
    num_classes: int = 10


# Checksums of the original distributions, as listed by torchvision's MNIST and
# FashionMNIST datasets.
DATASETS: Dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        mirrors=(
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": DatasetSpec(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """No copy of the dataset was found (and none could be downloaded)."""


class DownloadError(OSError):
    """A file could not be downloaded from any mirror."""


class ChecksumError(DownloadError):
    """A downloaded file did not match its published checksum."""


# --------------------------------------------------------------------- naming
def split_files(split: str) -> Tuple[str, str]:
    """Returns the .gz file names (images, labels) of a split ("train"/"test")."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {sorted(SPLITS)}.")
    prefix = SPLITS[split]
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is unknown; use one of {sorted(DATASETS)}.")
    return DATASETS[name]


def default_cache_dir() -> str:
    """Root of the download cache: $VSML_CACHE_DIR or ~/.cache/vsml_jax."""
    if os.environ.get(CACHE_DIR_ENV):
        return os.path.expanduser(os.environ[CACHE_DIR_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(xdg), "vsml_jax")


def default_mirrors(name: str) -> Tuple[str, ...]:
    """Mirror base URLs: $VSML_DATA_MIRROR (comma/space separated) or the originals."""
    env = os.environ.get(MIRROR_ENV, "").replace(",", " ").split()
    return tuple(env) if env else _spec(name).mirrors


def _url(base: str, name: str, filename: str) -> str:
    base = base.replace("{name}", name)
    return base + ("" if base.endswith("/") else "/") + filename


# -------------------------------------------------------------------- finding
def _find_in_dir(folder: str, filenames: Sequence[str]) -> Tuple[Optional[List[str]], str]:
    """Looks for each file (with or without .gz) in `folder`.

    Returns (paths, "") if all are there, else (None, reason).
    """
    if not os.path.isdir(folder):
        return None, "folder does not exist"
    found, missing = [], []
    for fn in filenames:
        options = [os.path.join(folder, fn), os.path.join(folder, fn[:-len(".gz")])]
        hit = next((p for p in options if os.path.isfile(p)), None)
        if hit is None:
            missing.append(fn)
        else:
            found.append(hit)
    if missing:
        return None, "missing " + ", ".join(f"{m} (or without .gz)" for m in missing)
    return found, ""


def _candidate_dirs(name: str, data_dir: Optional[str],
                    cache_dir: Optional[str]) -> List[Tuple[str, str]]:
    """Returns [(description, folder)] in look-up order.

    An explicit data_dir is the only candidate: the defaults below are only
    for when no folder was named.
    """
    if data_dir is not None:
        return [("data_dir argument", os.path.join(os.path.expanduser(data_dir), name))]
    dirs = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        dirs.append((f"${DATA_DIR_ENV}", os.path.join(os.path.expanduser(env), name)))
    else:
        dirs.append((f"${DATA_DIR_ENV}", ""))
    for d in _spec(name).system_dirs:
        dirs.append(("system package folder", d))
    root = cache_dir if cache_dir is not None else default_cache_dir()
    dirs.append(("user cache", os.path.join(os.path.expanduser(root), name)))
    return dirs


# -------------------------------------------------------------------- loading
@functools.lru_cache(maxsize=16)
def _load_idx_pair_cached(images_path: str, labels_path: str, _stamp: Tuple,
                          num_classes: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    if num_classes is None:  # any IDX image set: grey or colour, labels checked later
        images = read_idx(images_path)
        labels = read_idx(labels_path, expect_ndim=1)
        if images.ndim not in (3, 4):
            raise IDXError(f"{images_path}: images have shape {images.shape}; an image "
                           "file holds [N, H, W] (grey) or [N, H, W, C] (colour) arrays.")
        if not np.issubdtype(labels.dtype, np.integer):
            raise IDXError(f"{labels_path}: labels have dtype {labels.dtype}; class "
                           "labels must be integers 0..C-1.")
        check_images_labels(images, labels, num_classes=int(labels.max(initial=0)) + 1,
                            images_path=images_path, labels_path=labels_path)
    else:  # MNIST and Fashion-MNIST: exactly the published layout
        images = read_idx(images_path, expect_dtype=np.uint8, expect_ndim=3)
        labels = read_idx(labels_path, expect_dtype=np.uint8, expect_ndim=1)
        check_images_labels(images, labels, num_classes=num_classes,
                            images_path=images_path, labels_path=labels_path)
    labels = labels.astype(np.int32)
    labels.flags.writeable = False
    return images, labels


def load_idx_pair(images_path: str, labels_path: str, num_classes: Optional[int] = 10
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Reads and cross-checks an image file and its label file.

    The result is cached in-process keyed by the resolved paths (plus size and
    modification time, so a re-downloaded file is re-read): experiments reload
    the same split many times, and decompressing 60,000 images takes a while.

    Args:
      images_path, labels_path: the two IDX files (gzipped or not).
      num_classes: the published layout of MNIST-like sets (uint8 [N, H, W]
        images, uint8 labels in 0..num_classes-1); None accepts any IDX image
        file ([N, H, W] or [N, H, W, C], any IDX dtype) with integer labels
        (whose range the caller checks).

    Returns:
      images: read-only [N, H, W(, C)] (uint8 [N, 28, 28] for MNIST);
      labels: read-only int32 [N].
    """
    paths = (os.path.realpath(images_path), os.path.realpath(labels_path))
    stamp = tuple((st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))
    return _load_idx_pair_cached(*paths, stamp, num_classes)


@functools.lru_cache(maxsize=8)
def _load_tfds(name: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds  # optional; the caller guards failures

    data = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1, download=False))
    images = np.asarray(data["image"], dtype=np.uint8)
    if images.ndim == 4:  # tfds stores [N, 28, 28, 1]
        images = images[..., 0]
    labels = np.asarray(data["label"]).astype(np.int32)
    check_images_labels(images, labels, num_classes=DATASETS[name].num_classes,
                        images_path=f"tfds:{name}/{split}",
                        labels_path=f"tfds:{name}/{split}")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def clear_source_caches() -> None:
    """Forgets the IDX and tfds arrays this module loaded (`vsml_jax.data.clear_cache`
    also clears those of `files`, which imports this module, not the other way)."""
    _load_idx_pair_cached.cache_clear()
    _load_tfds.cache_clear()


# ---------------------------------------------------------------- downloading
def _md5_of(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # integrity check, not security
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(urls: Sequence[str], dest: str, md5: str, *,
                  timeout: float = 60.0) -> str:
    """Downloads `dest` from the first of `urls` that serves the right bytes.

    Each attempt streams into a temporary file next to `dest`, checks the
    length announced by the server and the MD5, and only then moves it into
    place with `os.replace`, so `dest` is either absent or complete and
    verified, never partial (also when the process is killed).

    Args:
      urls: full URLs of the same file, tried in order.
      dest: final path.
      md5: expected hex MD5 of the file.
      timeout: seconds per connection attempt / read.

    Returns:
      `dest`.

    Raises:
      ChecksumError: no URL served the right file and at least one served a
        file with a wrong checksum (names URL, expected and actual MD5).
      DownloadError: every URL failed (each with its reason).
    """
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    failures, bad_checksum = [], False
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dest)}.",
                                   suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _fetch(url, out, timeout)
            if actual != md5:
                bad_checksum = True
                failures.append(f"{url}: checksum mismatch, expected MD5 {md5}, got "
                                f"{actual} ({os.path.getsize(tmp)} bytes; the file is "
                                f"truncated or not the published one)")
                continue
            # mkstemp creates the file private (0600); a data file is not secret.
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            failures.append(f"{url}: {_describe(e)}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    cls = ChecksumError if bad_checksum else DownloadError
    raise cls(f"could not download {os.path.basename(dest)} to {folder}:\n  "
              + "\n  ".join(failures)
              + "\nCheck the network, set $VSML_DATA_MIRROR to a working mirror, or "
                "fetch the file by hand into that folder.")


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"cannot connect ({e.reason})"
    return f"{type(e).__name__}: {e}"


def _fetch(url: str, out, timeout: float) -> str:
    """Streams `url` into the open file `out`; returns the hex MD5 of the body.

    Raises DownloadError if the connection ends before the announced
    Content-Length (http.client would otherwise return the short body quietly).
    """
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        announced = resp.headers.get("Content-Length")
        while True:
            try:
                block = resp.read(1 << 16)
            except (http.client.HTTPException, OSError) as e:
                # e.g. IncompleteRead, connection reset or timeout mid-transfer.
                raise DownloadError(f"truncated download: connection failed after "
                                    f"{received} bytes ({e!r})") from e
            if not block:
                break
            out.write(block)
            digest.update(block)
            received += len(block)
    if announced is not None and received != int(announced):
        raise DownloadError(f"truncated download: server announced {announced} bytes "
                            f"but sent {received}")
    return digest.hexdigest()


def download_dataset(name: str, split: str, cache_dir: Optional[str] = None, *,
                     mirrors: Optional[Sequence[str]] = None,
                     checksums: Optional[Mapping[str, str]] = None,
                     timeout: float = 60.0) -> Tuple[str, str]:
    """Downloads the image and label files of one split into the cache.

    Args:
      name: "mnist" or "fashion_mnist".
      split: "train" or "test".
      cache_dir: cache root (files go to ``<cache_dir>/<name>/``); default
        `default_cache_dir()`.
      mirrors: base URLs tried in order (``{name}`` is substituted); default
        $VSML_DATA_MIRROR or the original locations.
      checksums: {file name: MD5}; default the published checksums.
      timeout: seconds per connection attempt / read.

    Returns:
      (images_path, labels_path).
    """
    spec = _spec(name)
    mirrors = tuple(mirrors) if mirrors is not None else default_mirrors(name)
    checksums = dict(checksums) if checksums is not None else dict(spec.md5)
    folder = os.path.join(os.path.expanduser(
        cache_dir if cache_dir is not None else default_cache_dir()), name)
    paths = []
    for fn in split_files(split):
        if fn not in checksums:
            raise ValueError(f"no checksum known for {fn}; pass checksums={{{fn!r}: md5}}.")
        dest = os.path.join(folder, fn)
        if not os.path.isfile(dest):
            download_file([_url(m, name, fn) for m in mirrors], dest, checksums[fn],
                          timeout=timeout)
        paths.append(dest)
    return paths[0], paths[1]


# ------------------------------------------------------------------ main entry
def load_dataset(name: str, split: str, data_dir: Optional[str] = None,
                 download: bool = False, *, cache_dir: Optional[str] = None,
                 mirrors: Optional[Sequence[str]] = None,
                 checksums: Optional[Mapping[str, str]] = None,
                 use_tfds: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Loads a split of MNIST or Fashion-MNIST (see the module doc for the order).

    Args:
      name: "mnist" or "fashion_mnist".
      split: "train" or "test".
      data_dir: folder holding ``<name>/``; when given, the only place looked
        at (and, with download=True, where the files are downloaded to).
      download: fetch the files if no copy is found: into ``<data_dir>/<name>/``
        when data_dir is given, else into the cache.
      cache_dir: cache root instead of $VSML_CACHE_DIR / ~/.cache/vsml_jax.
      mirrors: base URLs to download from (default $VSML_DATA_MIRROR or the
        original locations).
      checksums: {file name: MD5} to verify downloads against (default the
        published checksums).
      use_tfds: also try tensorflow-datasets' prepared data (only without an
        explicit data_dir).

    Returns:
      images: read-only uint8 [N, 28, 28]; labels: read-only int32 [N] in 0..9.
      The arrays are shared with an in-process cache: copy before mutating.

    Raises:
      DatasetNotFoundError: no copy anywhere (message lists every place tried),
        or none in an explicit data_dir (message names it).
      IDXError: a copy was found but is corrupt.
      DownloadError / ChecksumError: download=True and the download failed.
    """
    images, labels, _ = locate_dataset(name, split, data_dir, download, cache_dir=cache_dir,
                                       mirrors=mirrors, checksums=checksums,
                                       use_tfds=use_tfds)
    return images, labels


def locate_dataset(name: str, split: str, data_dir: Optional[str] = None,
                   download: bool = False, *, cache_dir: Optional[str] = None,
                   mirrors: Optional[Sequence[str]] = None,
                   checksums: Optional[Mapping[str, str]] = None,
                   use_tfds: bool = True) -> Tuple[np.ndarray, np.ndarray, str]:
    """`load_dataset` that also says where the data came from.

    Returns:
      (images uint8 [N, 28, 28], labels int32 [N], source): source is the
      folder the IDX files were read from (after a download, the folder they
      were downloaded into), or "tfds:NAME" for tensorflow-datasets' copy.
    """
    spec = _spec(name)
    images_fn, labels_fn = split_files(split)
    if data_dir is not None:
        return _load_from_explicit_dir(name, split, data_dir, download, mirrors=mirrors,
                                       checksums=checksums)
    tried = []
    for what, folder in _candidate_dirs(name, None, cache_dir):
        if not folder:
            tried.append(f"{what}: not set")
            continue
        paths, reason = _find_in_dir(folder, (images_fn, labels_fn))
        if paths is not None:
            return (*load_idx_pair(*paths, num_classes=spec.num_classes),
                    os.path.dirname(os.path.abspath(paths[0])))
        tried.append(f"{what} {folder}: {reason}")

    if use_tfds:
        try:
            return (*_load_tfds(name, split), f"tfds:{name}")
        except ImportError as e:
            tried.append(f"tensorflow_datasets: not importable ({e})")
        except IDXError:
            raise
        except Exception as e:  # tfds raises many kinds; record them all
            tried.append(f"tensorflow_datasets: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}")
    else:
        tried.append("tensorflow_datasets: skipped (use_tfds=False)")

    if download:
        paths = download_dataset(name, split, cache_dir, mirrors=mirrors,
                                 checksums=checksums)
        return (*load_idx_pair(*paths, num_classes=spec.num_classes),
                os.path.dirname(os.path.abspath(paths[0])))
    tried.append("download: not attempted (download=False)")

    cache_folder = _candidate_dirs(name, None, cache_dir)[-1][1]
    fixes = [
        f"set ${DATA_DIR_ENV} (or pass data_dir= / --data_dir) to a folder that "
        f"holds {name}/{images_fn} and {name}/{labels_fn}",
    ]
    if spec.system_dirs:
        fixes.append("apt-get install dataset-fashion-mnist")
    fixes.append(f"pass download=True (--download) to fetch the files into {cache_folder}")
    raise DatasetNotFoundError(
        f"dataset {name!r} split {split!r} not found. Looked in:\n  - "
        + "\n  - ".join(tried)
        + "\nTo fix it, do one of:\n  - " + "\n  - ".join(fixes))


def _load_from_explicit_dir(name: str, split: str, data_dir: str, download: bool, *,
                            mirrors, checksums) -> Tuple[np.ndarray, np.ndarray, str]:
    """The data_dir branch of `locate_dataset`: that folder or an error naming it."""
    spec = _spec(name)
    images_fn, labels_fn = split_files(split)
    folder = os.path.join(os.path.expanduser(data_dir), name)
    paths, reason = _find_in_dir(folder, (images_fn, labels_fn))
    if paths is None and download:
        # Into the named folder, so the next run finds the files there.
        paths = download_dataset(name, split, data_dir, mirrors=mirrors,
                                 checksums=checksums)
    if paths is None:
        raise DatasetNotFoundError(
            f"dataset {name!r} split {split!r} not found in the data_dir given "
            f"({data_dir}): {folder}: {reason}. An explicit data_dir is the only place "
            f"looked at (${DATA_DIR_ENV}, the cache and the other defaults are used "
            f"only without one). To fix it, put {images_fn} and {labels_fn} (or the "
            f"same without .gz) into {folder}, pass download=True (--download) to "
            f"fetch them there, or leave data_dir (--data_dir) unset.")
    return (*load_idx_pair(*paths, num_classes=spec.num_classes),
            os.path.dirname(os.path.abspath(paths[0])))
