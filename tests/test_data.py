"""Tests of vsml_jax.data on the real MNIST / Fashion-MNIST files.

The data folder comes from $VSML_DATA_DIR (CI sets it to shared/data). The
download tests run a real HTTP server on 127.0.0.1 that serves copies of those
files, intact, cut short, or with a lying Content-Length.
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsml_jax.data import (
    ChecksumError,
    Dataset,
    DatasetNotFoundError,
    DownloadError,
    IDXError,
    load_dataset,
    locate_dataset,
    make_dataset,
    normalize_images,
    read_idx,
    sample_episode,
    sample_episodes,
    synthetic_dataset,
)

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Published facts about the files in shared/data (see its README.md): example
# counts and the first 16 hex digits of sha256(decompressed array bytes).
EXPECTED = {
    ("mnist", "train"): (10000, "8f49a21cf36fe101", "122809b800f6a8f2"),
    ("mnist", "test"): (10000, "6d87418db22cc802", "ddeff807876a9661"),
    ("fashion_mnist", "train"): (60000, "2e487a6c89124f78", "657fbd221bfc9f41"),
    ("fashion_mnist", "test"): (10000, "c867c93ff9536059", "3d0e6c6ea990b53b"),
}


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No data dir, mirror or cache from the environment leaks into a test."""
    monkeypatch.delenv("VSML_DATA_DIR", raising=False)
    monkeypatch.delenv("VSML_DATA_MIRROR", raising=False)
    monkeypatch.setenv("VSML_CACHE_DIR", str(tmp_path / "env_cache"))
    return tmp_path


def _no_tfds() -> bool:
    """True if tensorflow-datasets is absent (tests that must not find data in
    it pass use_tfds=False when it is installed)."""
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        return True
    return False


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves /good/<f> intact, /cut/<f> as a cut copy and /short/<f> with a
    Content-Length larger than what is sent; everything else is 404."""

    files: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        parts = self.path.strip("/").split("/")
        body = self.files.get(parts[-1]) if len(parts) == 2 else None
        if body is None or parts[0] not in ("good", "cut", "short"):
            self.send_error(404, "Not Found")
            return
        if parts[0] == "cut":
            body = body[: len(body) // 2]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if parts[0] == "short":
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def server(data_dir):
    """(base URL, {file name: md5}) of a local server with the real mnist files."""
    files, md5 = {}, {}
    for fn in FILES["train"] + FILES["test"]:
        with open(os.path.join(data_dir, "mnist", fn), "rb") as f:
            files[fn] = f.read()
        md5[fn] = hashlib.md5(files[fn]).hexdigest()
    handler = type("Handler", (_Handler,), {"files": files})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", md5
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _leftovers(folder) -> list:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ------------------------------------------------------------- real files
@pytest.mark.parametrize("name,split", sorted(EXPECTED))
def test_load_real_files(data_dir, name, split):
    images, labels = load_dataset(name, split)
    n, img_sha, lab_sha = EXPECTED[(name, split)]
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert labels.min() == 0 and labels.max() == 9
    assert hashlib.sha256(images.tobytes()).hexdigest().startswith(img_sha)
    assert hashlib.sha256(labels.astype(np.uint8).tobytes()).hexdigest().startswith(lab_sha)


def test_load_is_cached_and_read_only(data_dir):
    a = load_dataset("mnist", "test")
    b = load_dataset("mnist", "test", data_dir=data_dir)
    assert a[0] is b[0] and a[1] is b[1]
    with pytest.raises(ValueError):
        a[0][0, 0, 0] = 1  # shared with the cache, so it must not be mutable


def test_uncompressed_files_are_found(data_dir, isolated_env):
    folder = isolated_env / "raw" / "mnist"
    folder.mkdir(parents=True)
    for fn in FILES["test"]:
        with gzip.open(os.path.join(data_dir, "mnist", fn), "rb") as f:
            (folder / fn[: -len(".gz")]).write_bytes(f.read())
    images, labels = load_dataset("mnist", "test", data_dir=str(isolated_env / "raw"))
    ref_images, ref_labels = load_dataset("mnist", "test", data_dir=data_dir)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


# ---------------------------------------------------------- corrupt files
def _idx_bytes(arr: np.ndarray, code: int = 0x08, count=None) -> bytes:
    shape = list(arr.shape)
    if count is not None:
        shape[0] = count
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(shape, ">u4").tobytes()
    return header + arr.tobytes()


@pytest.fixture(scope="module")
def small(data_dir):
    images, labels = load_dataset("mnist", "test", data_dir=data_dir)
    return np.array(images[:100]), np.array(labels[:100], dtype=np.uint8)


def _write_gz(path, payload: bytes) -> str:
    path.write_bytes(gzip.compress(payload, compresslevel=1))
    return str(path)


def _assert_idx_error(path, *needles, **kw):
    with pytest.raises(IDXError) as err:
        read_idx(path, **kw)
    msg = str(err.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, msg
    assert "download again" in msg
    return msg


def test_good_small_file_roundtrip(tmp_path, small):
    images, labels = small
    np.testing.assert_array_equal(read_idx(_write_gz(tmp_path / "i.gz", _idx_bytes(images))),
                                  images)
    raw = tmp_path / "l-idx1-ubyte"
    raw.write_bytes(_idx_bytes(labels))
    np.testing.assert_array_equal(read_idx(raw), labels)


def test_bad_magic(tmp_path, small):
    payload = b"\x12\x34" + _idx_bytes(small[1])[2:]
    _assert_idx_error(_write_gz(tmp_path / "magic.gz", payload), "bad magic number 0x1234")


def test_wrong_dtype_code(tmp_path, small):
    payload = _idx_bytes(small[1])
    unknown = _write_gz(tmp_path / "unknown.gz", payload[:2] + b"\x07" + payload[3:])
    _assert_idx_error(unknown, "unknown IDX dtype code 0x07")
    as_int32 = _write_gz(tmp_path / "int32.gz", _idx_bytes(small[1].astype(">i4"), 0x0C))
    assert read_idx(as_int32).dtype == np.int32  # valid IDX, but not uint8:
    _assert_idx_error(as_int32, "wrong IDX dtype code 0x0C", expect_dtype=np.uint8)


def test_truncated_payload(tmp_path, small):
    payload = _idx_bytes(small[0])[:-300]
    _assert_idx_error(_write_gz(tmp_path / "trunc.gz", payload), "truncated data",
                      "(100, 28, 28)")


def test_truncated_gzip_stream(tmp_path, small):
    gz = gzip.compress(_idx_bytes(small[0]))
    path = tmp_path / "cut.gz"
    path.write_bytes(gz[: len(gz) // 2])
    _assert_idx_error(str(path), "gzip stream is truncated")


def test_count_mismatch(tmp_path, small):
    payload = _idx_bytes(small[0][:90], count=100)
    _assert_idx_error(_write_gz(tmp_path / "count.gz", payload), "count mismatch",
                      "declares 100 items", "holds 90 items")


def test_trailing_garbage(tmp_path, small):
    payload = _idx_bytes(small[0]) + b"junk!"
    _assert_idx_error(_write_gz(tmp_path / "trail.gz", payload), "trailing garbage",
                      "5 unexpected bytes")
    # On 1-byte label items any extra bytes are extra items: a count mismatch.
    labels_payload = _idx_bytes(small[1]) + b"junk!"
    _assert_idx_error(_write_gz(tmp_path / "trail_l.gz", labels_payload), "count mismatch",
                      "declares 100 items", "holds 105 items")


def test_not_gzip(tmp_path, small):
    path = tmp_path / "plain.gz"
    path.write_bytes(_idx_bytes(small[1]))
    _assert_idx_error(str(path), "not gzip")


def test_corrupt_file_in_data_dir_is_not_skipped(tmp_path, small, isolated_env):
    folder = tmp_path / "d" / "mnist"
    folder.mkdir(parents=True)
    images, labels = small
    _write_gz(folder / FILES["test"][0], _idx_bytes(images))
    _write_gz(folder / FILES["test"][1], _idx_bytes(labels[:90]))
    with pytest.raises(IDXError) as err:
        load_dataset("mnist", "test", data_dir=str(tmp_path / "d"))
    msg = str(err.value)
    assert "100 images" in msg and "90 labels" in msg
    assert str(folder / FILES["test"][0]) in msg and str(folder / FILES["test"][1]) in msg

    bad = labels.copy()
    bad[3] = 12
    _write_gz(folder / FILES["test"][1], _idx_bytes(bad))
    with pytest.raises(IDXError, match=r"labels must lie in 0\.\.9, found values in 0\.\.12"):
        load_dataset("mnist", "test", data_dir=str(tmp_path / "d"))


# ---------------------------------------------------------- missing data
def test_missing_dataset_lists_places(isolated_env):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist", "train", use_tfds=_no_tfds())
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for needle in ("$VSML_DATA_DIR: not set", "/usr/share/datasets/fashion-mnist",
                   str(isolated_env / "env_cache" / "fashion_mnist"),
                   "tensorflow_datasets", "download=False",
                   "apt-get install dataset-fashion-mnist", "download=True",
                   "--data_dir"):
        assert needle in msg, f"{needle!r} missing from:\n{msg}"


def test_explicit_data_dir_is_the_only_place(isolated_env, data_dir, monkeypatch):
    # $VSML_DATA_DIR holds the data, but a folder that was named wins: no silent
    # fall-through to another copy.
    monkeypatch.setenv("VSML_DATA_DIR", data_dir)
    empty = isolated_env / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist", "train", data_dir=str(empty))
    msg = str(err.value)
    for needle in (str(empty / "fashion_mnist"), "folder does not exist",
                   "train-images-idx3-ubyte.gz", "the only place looked at",
                   "download=True", "--data_dir"):
        assert needle in msg, f"{needle!r} missing from:\n{msg}"
    assert load_dataset("fashion_mnist", "train")[0].shape == (60000, 28, 28)


def test_missing_one_file_is_reported(isolated_env, data_dir):
    folder = isolated_env / "half" / "mnist"
    folder.mkdir(parents=True)
    src = os.path.join(data_dir, "mnist", FILES["test"][0])
    (folder / FILES["test"][0]).write_bytes(open(src, "rb").read())
    with pytest.raises(DatasetNotFoundError, match="missing t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", "test", data_dir=str(isolated_env / "half"), use_tfds=False)


def test_bad_names():
    with pytest.raises(ValueError, match="unknown"):
        load_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="split='valid'"):
        load_dataset("mnist", "valid")


# -------------------------------------------------------------- download
def test_download_good_file(server, isolated_env, data_dir):
    base, md5 = server
    cache = isolated_env / "cache"
    images, labels = load_dataset("mnist", "test", download=True, cache_dir=str(cache),
                                  mirrors=[base + "/good/"], checksums=md5, use_tfds=False)
    assert _leftovers(cache / "mnist") == sorted(FILES["test"])  # no temp files
    ref = load_dataset("mnist", "test", data_dir=data_dir)
    np.testing.assert_array_equal(images, ref[0])
    np.testing.assert_array_equal(labels, ref[1])
    # Found in the cache next time, without downloading.
    again = load_dataset("mnist", "test", cache_dir=str(cache), use_tfds=False)
    np.testing.assert_array_equal(again[0], ref[0])


def test_download_into_explicit_data_dir(server, isolated_env, data_dir):
    """download=True with a named folder fetches into that folder, through
    make_dataset too, and the next load finds the files there."""
    base, md5 = server
    folder = isolated_env / "mine"
    images, labels, source = locate_dataset(
        "mnist", "test", data_dir=str(folder), download=True, mirrors=[base + "/good/"],
        checksums=md5)
    assert source == str(folder / "mnist")
    assert _leftovers(folder / "mnist") == sorted(FILES["test"])
    assert _leftovers(isolated_env / "env_cache") == []  # not the cache
    ref = make_dataset("mnist", "test", data_dir=data_dir, pool=4)
    mine = make_dataset("mnist", "test", data_dir=str(folder), pool=4)
    assert mine.source == str(folder / "mnist") and ref.source != mine.source
    np.testing.assert_array_equal(mine.images, ref.images)


def test_download_mirror_from_env(server, isolated_env, monkeypatch):
    base, md5 = server
    monkeypatch.setenv("VSML_DATA_MIRROR", base + "/good/")
    images, _ = load_dataset("mnist", "test", download=True, checksums=md5, use_tfds=False)
    assert images.shape == (10000, 28, 28)
    # The default cache location honours $VSML_CACHE_DIR.
    assert _leftovers(isolated_env / "env_cache" / "mnist") == sorted(FILES["test"])


def test_download_cut_copy_fails_and_leaves_nothing(server, isolated_env):
    base, md5 = server
    cache = isolated_env / "cache"
    url = base + "/cut/"
    with pytest.raises(ChecksumError) as err:
        load_dataset("mnist", "test", download=True, cache_dir=str(cache), mirrors=[url],
                     checksums=md5, use_tfds=False)
    msg = str(err.value)
    assert url + FILES["test"][0] in msg and md5[FILES["test"][0]] in msg
    assert "checksum mismatch" in msg and "truncated" in msg
    assert _leftovers(cache / "mnist") == []


def test_download_short_transfer_fails_and_leaves_nothing(server, isolated_env):
    base, md5 = server
    cache = isolated_env / "cache"
    with pytest.raises(DownloadError, match="truncated download: server announced") as err:
        load_dataset("mnist", "test", download=True, cache_dir=str(cache),
                     mirrors=[base + "/short/"], checksums=md5, use_tfds=False)
    assert base + "/short/" + FILES["test"][0] in str(err.value)
    assert _leftovers(cache / "mnist") == []


def test_download_wrong_checksum_fails_and_leaves_nothing(server, isolated_env):
    base, md5 = server
    cache = isolated_env / "cache"
    wrong = {fn: "0" * 32 for fn in md5}
    with pytest.raises(ChecksumError) as err:
        load_dataset("mnist", "test", download=True, cache_dir=str(cache),
                     mirrors=[base + "/good/"], checksums=wrong, use_tfds=False)
    msg = str(err.value)
    fn = FILES["test"][0]
    assert f"{base}/good/{fn}" in msg
    assert f"expected MD5 {'0' * 32}, got {md5[fn]}" in msg
    assert _leftovers(cache / "mnist") == []


def test_download_falls_back_to_next_mirror(server, isolated_env):
    base, md5 = server
    cache = isolated_env / "cache"
    refused, missing = _closed_port_url(), base + "/missing/"
    images, labels = load_dataset(
        "mnist", "test", download=True, cache_dir=str(cache),
        mirrors=[refused, missing, base + "/good/"], checksums=md5, use_tfds=False)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert _leftovers(cache / "mnist") == sorted(FILES["test"])


def test_download_all_mirrors_down(server, isolated_env):
    base, md5 = server
    refused, missing = _closed_port_url(), base + "/missing/"
    with pytest.raises(DownloadError) as err:
        load_dataset("mnist", "test", download=True, cache_dir=str(isolated_env / "c"),
                     mirrors=[refused, missing], checksums=md5, use_tfds=False)
    msg = str(err.value)
    assert not isinstance(err.value, ChecksumError)
    assert refused + FILES["test"][0] in msg and "cannot connect" in msg
    assert missing + FILES["test"][0] + ": HTTP 404" in msg


# -------------------------------------------------------------- episodes
@pytest.fixture(scope="module")
def mnist_test(data_dir):
    return make_dataset("mnist", "test", pool=4)


@pytest.fixture(scope="module")
def index_data():
    """Images that hold their own index, so episodes reveal which rows they drew."""
    n = 50
    images = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
    labels = jnp.arange(n, dtype=jnp.int32) % 10
    return Dataset(images=images, labels=labels, num_classes=10, name="index")


def test_normalisation_and_pooling(data_dir):
    images, _ = load_dataset("mnist", "test")
    full = make_dataset("mnist", "test", pool=1)
    assert full.images.shape == (10000, 784) and full.images.dtype == jnp.float32
    assert full.labels.dtype == jnp.int32 and full.name == "mnist"
    assert abs(float(full.images.mean())) < 0.05
    assert abs(float(full.images.std()) - 1.0) < 0.05
    for pool, dim in ((1, 784), (2, 196), (4, 49)):
        x = normalize_images(images[:64], pool=pool)
        assert x.shape == (64, dim)
    # Pooling averages blocks of normalised pixels.
    x1 = np.asarray(normalize_images(images[:2], pool=1)).reshape(2, 28, 28)
    x4 = np.asarray(normalize_images(images[:2], pool=4)).reshape(2, 7, 7)
    np.testing.assert_allclose(x4[1, 3, 2], x1[1, 12:16, 8:12].mean(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pool=3"):
        normalize_images(images[:2], pool=3)


def test_episode_shapes_and_determinism(mnist_test):
    k1, k2 = jax.random.key(1), jax.random.key(2)
    x, y = sample_episode(k1, mnist_test, 16)
    assert x.shape == (16, 49) and y.shape == (16, 10)
    assert x.dtype == jnp.float32 and y.dtype == jnp.float32
    np.testing.assert_array_equal(y.sum(axis=1), 1.0)
    assert set(np.unique(np.asarray(y)).tolist()) <= {0.0, 1.0}
    x_again, y_again = sample_episode(k1, mnist_test, 16)
    np.testing.assert_array_equal(x, x_again)
    np.testing.assert_array_equal(y, y_again)
    x_other, _ = sample_episode(k2, mnist_test, 16)
    assert not np.array_equal(x, x_other)
    # A bare (images, labels) pair works too.
    xp, yp = sample_episode(k1, (mnist_test.images, mnist_test.labels), 16)
    np.testing.assert_array_equal(xp, x)
    np.testing.assert_array_equal(yp, y)


def test_episode_draws_without_replacement(index_data):
    x, y = sample_episode(jax.random.key(0), index_data, 50)
    idx = np.asarray(x[:, 0]).astype(int)
    assert sorted(idx.tolist()) == list(range(50))  # every row exactly once
    np.testing.assert_array_equal(np.argmax(y, axis=1), idx % 10)
    x_long, _ = sample_episode(jax.random.key(0), index_data, 80)  # T > N: with replacement
    assert x_long.shape == (80, 3) and np.asarray(x_long).max() < 50


def test_label_permutation_is_a_permutation(index_data):
    moved = False
    for seed in range(3):
        key = jax.random.key(seed)
        x, y = sample_episode(key, index_data, 50)
        xp, yp = sample_episode(key, index_data, 50, permute_labels=True)
        np.testing.assert_array_equal(x, xp)  # same examples, only relabelled
        old, new = np.argmax(np.asarray(y), 1), np.argmax(np.asarray(yp), 1)
        mapping = {}
        for o, n in zip(old.tolist(), new.tolist()):
            assert mapping.setdefault(o, n) == n  # one class -> one class
        assert len(set(mapping.values())) == len(mapping)  # injective
        moved |= any(o != n for o, n in mapping.items())
    assert moved  # the classes really were shuffled


def test_random_projection(mnist_test):
    key = jax.random.key(3)
    x, y = sample_episode(key, mnist_test, 16)
    xp, yp = sample_episode(key, mnist_test, 16, random_projection=True)
    np.testing.assert_array_equal(y, yp)
    assert xp.shape == x.shape and not np.allclose(x, xp)
    ratio = float((xp ** 2).sum() / (x ** 2).sum())
    assert 0.5 < ratio < 1.5  # N(0, 1/D) entries roughly preserve the scale
    xq, _ = sample_episode(jax.random.key(4), mnist_test, 16, random_projection=True)
    assert not np.allclose(xp, xq)


def test_jit_and_vmap(mnist_test):
    key = jax.random.key(5)
    xb, yb = sample_episodes(key, mnist_test, 16, 4, permute_labels=True)
    assert xb.shape == (4, 16, 49) and yb.shape == (4, 16, 10)
    keys = jax.random.split(key, 4)
    for i in range(4):  # the batch is exactly the per-key episodes
        xi, yi = sample_episode(keys[i], mnist_test, 16, permute_labels=True)
        np.testing.assert_allclose(xb[i], xi)
        np.testing.assert_array_equal(yb[i], yi)
    assert not np.array_equal(xb[0], xb[1])
    # Composes with a caller's own jit and vmap (length static by closure).
    fn = jax.jit(jax.vmap(lambda k, d: sample_episode(k, d, 16), in_axes=(0, None)))
    xv, yv = fn(keys, mnist_test)
    assert xv.shape == (4, 16, 49) and yv.shape == (4, 16, 10)
    np.testing.assert_allclose(xv[2], sample_episode(keys[2], mnist_test, 16)[0])


def test_synthetic_dataset():
    ds = synthetic_dataset(jax.random.key(0), 200, 12, num_classes=5)
    assert isinstance(ds, Dataset) and ds.name == "synthetic"
    assert ds.images.shape == (200, 12) and ds.images.dtype == jnp.float32
    assert ds.labels.shape == (200,) and ds.labels.dtype == jnp.int32
    assert 0 <= int(ds.labels.min()) and int(ds.labels.max()) <= 4
    assert ds.num_examples == 200 and ds.input_dim == 12 and ds.num_classes == 5
    same = synthetic_dataset(jax.random.key(0), 200, 12, num_classes=5)
    np.testing.assert_array_equal(ds.images, same.images)
    x, y = sample_episode(jax.random.key(1), ds, 16)
    assert x.shape == (16, 12) and y.shape == (16, 5)
