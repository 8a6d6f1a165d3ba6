"""Any data set, wherever a data set is named: specs, files, resizing, mixtures.

Every data set here is built on the fly in tmp_path: IDX folders (gzipped and
plain), .npz files (grey uint8 and colour float, 5 and 26 classes, 32x32) and,
when tensorflow-datasets is installed, a tiny tfds set prepared offline.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from vsml_jax import evaluation
from vsml_jax.baselines import meta_rnn
from vsml_jax.data import (
    GREY_WEIGHTS,
    PIXEL_MEAN,
    PIXEL_STD,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    IDXError,
    make_dataset,
    make_mixture,
    normalize,
    normalize_images,
    sample_episodes,
    split_spec,
)
from vsml_jax.meta.objective import EpisodeSpec, sample_batch
from vsml_jax.pretrained import LearnerFileError, load_learner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# ------------------------------------------------------------------ builders
def _idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of a uint8 array: magic, dtype 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(arr, np.uint8).tobytes()


def write_idx_dir(folder, splits, gz: bool):
    """splits: {split: (images uint8 [N, H, W], labels [N])} in the MNIST layout."""
    os.makedirs(folder, exist_ok=True)
    for split, (images, labels) in splits.items():
        for fn, arr in zip(IDX_FILES[split], (images, labels)):
            payload = _idx_bytes(arr)
            if gz:
                with gzip.open(os.path.join(folder, fn + ".gz"), "wb") as f:
                    f.write(payload)
            else:
                with open(os.path.join(folder, fn), "wb") as f:
                    f.write(payload)
    return str(folder)


def random_split(rng, n, shape, classes, dtype=np.uint8):
    """(images, labels) with every class present."""
    if dtype == np.uint8:
        images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    else:
        images = rng.random((n,) + shape).astype(dtype)
    labels = np.arange(n) % classes
    return images, labels


def write_npz(path, train, test, **extra):
    np.savez(path, x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1],
             **extra)
    return str(path)


@pytest.fixture
def no_env_data(monkeypatch, tmp_path):
    """No $VSML_DATA_DIR / cache from the environment: only what a test names."""
    monkeypatch.delenv("VSML_DATA_DIR", raising=False)
    monkeypatch.delenv("VSML_DATA_MIRROR", raising=False)
    monkeypatch.setenv("VSML_CACHE_DIR", str(tmp_path / "cache"))


# ------------------------------------------------------------------- grammar
def test_spec_grammar():
    assert split_spec("mnist") == ["mnist"]
    assert split_spec("mnist,fashion_mnist") == ["mnist", "fashion_mnist"]
    assert split_spec("mnist + npz:a.npz") == ["mnist", "npz:a.npz"]
    assert split_spec("tfds:cifar10:3.0.2") == ["tfds:cifar10:3.0.2"]
    with pytest.raises(ValueError, match=r"'cifar10' is unknown \(did you mean tfds:cifar10"):
        split_spec("cifar10")
    with pytest.raises(ValueError, match="empty part"):
        split_spec("mnist,")
    with pytest.raises(ValueError, match="give the npz after"):
        split_spec("npz:")
    with pytest.raises(ValueError, match="synthetic_dataset"):
        make_dataset("synthetic", "train")


# ------------------------------------------------------------------------ idx
def test_idx_folder_gz_and_plain(tmp_path):
    rng = np.random.default_rng(0)
    train = random_split(rng, 40, (28, 28), 5)
    test = random_split(rng, 15, (28, 28), 5)
    gz = write_idx_dir(tmp_path / "gz", {"train": train, "test": test}, gz=True)
    plain = write_idx_dir(tmp_path / "plain", {"train": train, "test": test}, gz=False)
    for folder in (gz, plain):
        ds = make_dataset(f"idx:{folder}", "train", pool=4)
        assert ds.images.shape == (40, 49) and ds.num_classes == 5
        assert ds.source == folder and ds.name == f"idx:{folder}"
        # 28x28 with an integer pool: exactly the MNIST pipeline.
        np.testing.assert_array_equal(ds.images, normalize_images(train[0], pool=4))
        np.testing.assert_array_equal(ds.labels, train[1])
        full = make_dataset(f"idx:{folder}", "test", input_size=784)
        assert full.images.shape == (15, 784) and full.num_classes == 5
    # Classes count over both splits: a test split that lacks class 4 still has 5.
    few = write_idx_dir(tmp_path / "few", {"train": train,
                                           "test": (test[0][:4], test[1][:4])}, gz=True)
    assert make_dataset(f"idx:{few}", "test").num_classes == 5


def test_idx_real_mnist_folder_matches_builtin(data_dir):
    folder = os.path.join(data_dir, "mnist")
    a = make_dataset(f"idx:{folder}", "test", pool=4)
    b = make_dataset("mnist", "test", data_dir=data_dir, pool=4)
    assert a.num_classes == b.num_classes == 10
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_idx_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        make_dataset(f"idx:{tmp_path / 'nowhere'}", "train")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "folder does not exist" in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    rng = np.random.default_rng(1)
    images, labels = random_split(rng, 20, (28, 28), 4)
    folder = write_idx_dir(tmp_path / "one", {"train": (images, labels + 1)}, gz=True)
    with pytest.raises(DatasetFormatError, match="counted from 1: subtract 1"):
        make_dataset(f"idx:{folder}", "train")
    with pytest.raises(DatasetNotFoundError, match="the test split is not there"):
        make_dataset(f"idx:{folder}", "test")
    folder = write_idx_dir(tmp_path / "cut", {"train": (images, labels[:15])}, gz=False)
    with pytest.raises(IDXError, match="20 images but .* 15 labels"):
        make_dataset(f"idx:{folder}", "train")


# ------------------------------------------------------------------------ npz
def test_npz_grey_uint8_26_classes_32x32(tmp_path):
    rng = np.random.default_rng(2)
    train = random_split(rng, 52, (32, 32), 26)
    test = random_split(rng, 30, (32, 32), 26)
    # Constant images show the scale: resizing keeps a constant, only the
    # standardisation changes it.
    train[0][0] = 255
    train[0][1] = 0
    path = write_npz(tmp_path / "letters.npz", train, test)
    ds = make_dataset(f"npz:{path}", "train", input_size=49)
    assert ds.images.shape == (52, 49) and ds.images.dtype == jnp.float32
    assert ds.num_classes == 26 and ds.source == path
    np.testing.assert_allclose(ds.images[0], (1 - PIXEL_MEAN) / PIXEL_STD, rtol=1e-6)
    np.testing.assert_allclose(ds.images[1], -PIXEL_MEAN / PIXEL_STD, rtol=1e-6)
    # The resizer is jax.image.resize (antialiased linear) on [0, 1] pixels.
    want = jax.image.resize(train[0].astype(np.float32) / 255, (52, 7, 7), "linear",
                            antialias=True)
    np.testing.assert_allclose(ds.images, ((want - PIXEL_MEAN) / PIXEL_STD).reshape(52, 49),
                               rtol=1e-5, atol=1e-5)
    # pool=4 means 7x7 too; 28x28 (input_size 784) is an upsampling... of 32: down.
    np.testing.assert_array_equal(make_dataset(f"npz:{path}", "train", pool=4).images,
                                  ds.images)
    assert make_dataset(f"npz:{path}", "test", pool=1).images.shape == (30, 784)
    assert make_dataset(f"npz:{path}", "test", input_size=1024).images.shape == (30, 1024)


def test_npz_colour_float_5_classes(tmp_path):
    rng = np.random.default_rng(3)
    train = random_split(rng, 20, (32, 32, 3), 5, dtype=np.float32)
    test = random_split(rng, 10, (32, 32, 3), 5, dtype=np.float32)
    train[0][0] = 0.0
    train[0][0, ..., 0] = 1.0  # pure red
    train[0][1] = 0.0
    train[0][1, ..., 2] = 1.0  # pure blue
    path = write_npz(tmp_path / "colour.npz", train, test)
    ds = make_dataset(f"npz:{path}", "train", input_size=49)
    assert ds.images.shape == (20, 49) and ds.num_classes == 5
    red, _, blue = GREY_WEIGHTS
    np.testing.assert_allclose(ds.images[0], (red - PIXEL_MEAN) / PIXEL_STD, rtol=1e-5)
    np.testing.assert_allclose(ds.images[1], (blue - PIXEL_MEAN) / PIXEL_STD, rtol=1e-5)
    # Grey is the luma of the [0, 1] values, then the same resize as grey input.
    luma = train[0] @ np.asarray(GREY_WEIGHTS, np.float32)
    np.testing.assert_allclose(ds.images, normalize(luma, input_size=49), rtol=1e-5,
                               atol=1e-5)
    # [N, H, W, 1] is grey; uint8 colour is divided by 255 first.
    np.testing.assert_allclose(normalize(luma[..., None], input_size=49),
                               normalize(luma, input_size=49))
    as_uint8 = np.round(train[0] * 255).astype(np.uint8)
    np.testing.assert_allclose(normalize(as_uint8, input_size=49), ds.images, atol=0.02)


def test_npz_errors(tmp_path):
    rng = np.random.default_rng(4)
    train, test = random_split(rng, 12, (8, 8), 3), random_split(rng, 6, (8, 8), 3)
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=train[0], y_train=train[1], x_test=test[0])
    with pytest.raises(DatasetFormatError) as err:
        make_dataset(f"npz:{path}", "train")
    msg = str(err.value)
    assert str(path) in msg and "missing key(s) y_test" in msg and "np.savez" in msg

    write_npz(path, train, (test[0], test[1] - 1))
    with pytest.raises(DatasetFormatError, match=r"class indices 0\.\.C-1, found -1\.\.2"):
        make_dataset(f"npz:{path}", "test")
    write_npz(path, train, (test[0], test[1][:4]))
    with pytest.raises(DatasetFormatError, match="x_test holds 6 images but y_test holds 4"):
        make_dataset(f"npz:{path}", "test")
    write_npz(path, (train[0].reshape(12, 64), train[1]), test)
    with pytest.raises(DatasetFormatError, match=r"shape \(12, 64\); expected \[N, H, W\]"):
        make_dataset(f"npz:{path}", "train")
    write_npz(path, (train[0].astype(np.float32), train[1]), test)
    with pytest.raises(ValueError, match="look like 0..255 values: divide by 255"):
        make_dataset(f"npz:{path}", "train")
    write_npz(path, train, (test[0], np.eye(3)[test[1]]))
    with pytest.raises(DatasetFormatError, match="not one-hot rows"):
        make_dataset(f"npz:{path}", "test")
    np.save(tmp_path / "one.npy", train[0])
    with pytest.raises(DatasetFormatError, match="holds a single array"):
        make_dataset(f"npz:{tmp_path / 'one.npy'}", "train")
    with pytest.raises(DatasetNotFoundError, match=f"npz:{tmp_path / 'no.npz'} does not exist"):
        make_dataset(f"npz:{tmp_path / 'no.npz'}", "train")


def test_explicit_data_dir_missing_is_an_error(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("VSML_DATA_DIR", data_dir)  # the data is there, but not named
    with pytest.raises(DatasetNotFoundError) as err:
        make_dataset("mnist", "test", data_dir=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "mnist") in msg and "t10k-images-idx3-ubyte.gz" in msg
    assert "the only place looked at" in msg


# -------------------------------------------------------------------- mixtures
def _index_dataset(start, n, classes, name):
    """Images that hold their own row number, so episodes reveal their rows."""
    rows = jnp.arange(start, start + n, dtype=jnp.float32)
    return Dataset(images=rows[:, None] * jnp.ones((1, 4)),
                   labels=jnp.arange(n, dtype=jnp.int32) % classes, num_classes=classes,
                   name=name, source=f"/data/{name}")


def test_mixture_sampled_inside_jit_draws_one_part_per_episode():
    a, b = _index_dataset(0, 30, 5, "a"), _index_dataset(30, 50, 26, "b")
    mix = make_mixture([a, b])
    assert mix.num_classes == 26 and mix.num_examples == 80 and mix.name == "a+b"
    assert [p.size for p in mix.parts] == [30, 50] and mix.source == "/data/a; /data/b"

    @jax.jit
    def draw(key, data):
        return sample_episodes(key, data, 20, 64, permute_labels=True)

    x, y = draw(jax.random.key(0), mix)
    assert x.shape == (64, 20, 4) and y.shape == (64, 20, 26)
    rows = np.asarray(x[..., 0]).astype(int)
    in_a = (rows < 30).all(axis=1)
    in_b = (rows >= 30).all(axis=1)
    assert (in_a | in_b).all()                  # every episode from one data set
    assert 16 < in_a.sum() < 48                  # both, about equally often
    assert all(len(set(r)) == 20 for r in rows)  # without replacement within a part
    labels = np.argmax(np.asarray(y), -1)
    # Permuted among the mixture's 26 classes; an episode of `a` uses 5 of them.
    assert all(len(set(labels[i])) <= 5 for i in np.flatnonzero(in_a))
    assert labels[in_b].max() <= 25
    # meta.objective.sample_batch keeps its signature and takes the mixture;
    # episodes longer than the smallest part are drawn with replacement, still
    # from one part each.
    xs, ys = sample_batch(jax.random.key(2), mix, EpisodeSpec(length=40, batch=8))
    assert xs.shape == (8, 40, 4) and ys.shape == (8, 40, 26)
    r = np.asarray(xs[..., 0])
    assert ((r < 30).all(axis=1) | (r >= 30).all(axis=1)).all()
    with pytest.raises(ValueError, match="different input sizes"):
        make_mixture([a, dataclasses.replace(b, images=b.images[:, :3])])
    assert make_mixture([a]) is a  # a single data set stays as it is


def test_mixture_spec_and_streams(tmp_path):
    rng = np.random.default_rng(5)
    grey = write_npz(tmp_path / "g.npz", random_split(rng, 30, (28, 28), 5),
                     random_split(rng, 20, (28, 28), 5))
    colour = write_npz(tmp_path / "c.npz", random_split(rng, 40, (32, 32, 3), 26,
                                                        np.float32),
                       random_split(rng, 26, (32, 32, 3), 26, np.float32))
    mix = make_dataset(f"npz:{grey},npz:{colour}", "test", input_size=49)
    assert mix.input_dim == 49 and mix.num_classes == 26
    assert [(p.name, p.size, p.num_classes) for p in mix.parts] == [
        (f"npz:{grey}", 20, 5), (f"npz:{colour}", 26, 26)]
    assert mix == mix and make_dataset(f"npz:{grey}+npz:{colour}", "test",
                                       input_size=49).parts == mix.parts
    streams = evaluation.make_streams(mix, list(range(12)), 15)
    firsts = streams.indices < 20
    assert (firsts.all(axis=1) | (~firsts).all(axis=1)).all()
    assert 0 < firsts.all(axis=1).sum() < 12
    x, y = evaluation.held_out_set(mix, 9)
    assert x.shape == (9, 49) and np.asarray(y)[:5].max() < 5
    info = evaluation.describe_dataset(mix)
    assert [p["source"] for p in info["parts"]] == [grey, colour]


# -------------------------------------------------------------------- learners
def _write_learner(directory, name, learner, params):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "params.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(params))
    config = {k: (list(v) if isinstance(v, tuple) else v)
              for k, v in dataclasses.asdict(learner.config).items()}
    with open(os.path.join(directory, "learner.json"), "w") as f:
        json.dump({"learner": name, "config": config, "flags": {"pool": 4}}, f)


def test_learners_across_class_counts(tmp_path):
    ten = load_learner("pretrained:mnist", input_size=49)
    for c in (5, 26):
        other = load_learner("pretrained:mnist", input_size=49, num_classes=c)
        assert other.learner.config.layer_sizes == (49, c)
        for p, q in zip(jax.tree_util.tree_leaves(ten.params),
                        jax.tree_util.tree_leaves(other.params)):
            np.testing.assert_array_equal(p, q)  # the same V_M
    # (experiments.evaluate runs it on 5 classes below.)

    rnn = meta_rnn.meta_rnn_learner(49, 10, hidden_size=4)
    _write_learner(tmp_path / "rnn", "meta_rnn", rnn, rnn.init_params(jax.random.key(0)))
    assert load_learner(str(tmp_path / "rnn"), num_classes=10).learner.config.num_classes == 10
    with pytest.raises(LearnerFileError) as err:
        load_learner(str(tmp_path / "rnn"), num_classes=5)
    msg = str(err.value)
    assert "meta_rnn learner cannot run on 5 classes (trained for 10)" in msg
    assert "(10,) -> (5,)" in msg and "meta-train a meta_rnn learner" in msg
    assert "VS-ML learner" in msg


# ------------------------------------------------------------ entry points
def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_evaluate_pretrained_mnist_on_a_5_class_npz(tmp_path):
    rng = np.random.default_rng(6)
    path = write_npz(tmp_path / "five.npz",
                     random_split(rng, 60, (32, 32, 3), 5, np.float32),
                     random_split(rng, 80, (32, 32, 3), 5, np.float32))
    out_dir = tmp_path / "out"
    spec = f"npz:{path}"
    cmd = [sys.executable, "-m", "experiments.evaluate", "--checkpoint=pretrained:mnist",
           f"--datasets={spec}", "--pool=4", "--episode_length=50", "--seeds=2",
           "--baselines=nearest_mean", "--download", f"--out_dir={out_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    res = summary["results"][spec]
    assert set(res) == {"pretrained:mnist", "nearest_mean"}
    assert res["pretrained:mnist"]["config"]["layer_sizes"] == [49, 5]
    assert res["nearest_mean"]["config"]["num_classes"] == 5
    for r in res.values():
        acc = r["metrics"]["cum_acc@50"]["per_seed"]
        assert len(acc) == 2 and all(0 <= a <= 1 for a in acc)
    data = summary["data"][spec]
    assert data["num_classes"] == 5 and data["input_size"] == 49
    assert data["stream"]["source"] == path and data["stream"]["num_examples"] == 80
    assert summary["settings"]["download"] is True  # accepted, nothing to download
    curves = np.load(out_dir / "curves.npz")
    assert curves[f"{spec}/pretrained:mnist/cum_acc"].shape == (2, 50)


def test_evaluate_download_flag_downloads_into_data_dir(tmp_path):
    """--download reaches the downloader, which fetches into --data_dir (here
    from a mirror where nothing listens, so it fails and says where)."""
    mirror = _closed_port_url()
    env = dict(os.environ, VSML_DATA_MIRROR=mirror, VSML_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "experiments.evaluate", "--datasets=mnist", "--pool=4",
           "--baselines=nearest_mean", "--episode_length=5", "--seeds=1",
           f"--data_dir={tmp_path / 'mine'}", f"--out_dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd + ["--download"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode != 0
    assert f"could not download t10k-images-idx3-ubyte.gz to {tmp_path / 'mine' / 'mnist'}" \
        in proc.stderr, proc.stderr[-2000:]
    assert f"{mirror}t10k-images-idx3-ubyte.gz: cannot connect" in proc.stderr


# ----------------------------------------------------------------------- tfds
def _tfds_builder_class(tfds, file_format, image_feature):
    """A tiny 5-class builder of 32x32 RGB images that needs no download."""
    # Not registered: tfds:NAME then finds the set from its files alone, like
    # a set prepared by another program.
    class VsmlTinyTestSet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": image_feature, "label": tfds.features.ClassLabel(num_classes=5)}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(30, 0),
                    "test": self._generate_examples(10, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                          "label": i % 5}
    return VsmlTinyTestSet


def _tfds_variants():
    """(file format, image feature) pairs this installation can write and read."""
    tfds = pytest.importorskip("tensorflow_datasets")
    variants = [("array_record", tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8))]
    try:
        import tensorflow  # noqa: F401  (tfrecord and PNG-encoded images need it)
        variants.append(("tfrecord", tfds.features.Image(shape=(32, 32, 3))))
    except ImportError:
        pass
    return tfds, variants


def test_tfds_prepared_offline(tmp_path):
    """A tiny tfds set prepared offline, read by tfds:NAME: as a data source
    (array_record) and, with TensorFlow, through as_dataset (tfrecord, PNG)."""
    tfds, variants = _tfds_variants()
    name = "vsml_tiny_test_set"
    for file_format, feature in variants:
        root = tmp_path / file_format
        _tfds_builder_class(tfds, file_format, feature)(
            data_dir=str(root), file_format=file_format).download_and_prepare()
        ds = make_dataset(f"tfds:{name}", "train", data_dir=str(root), input_size=49)
        assert ds.images.shape == (30, 49) and ds.num_classes == 5
        assert str(root) in ds.source
        assert sorted(np.bincount(np.asarray(ds.labels)).tolist()) == [6] * 5
        test = make_dataset(f"tfds:{name}", "test", data_dir=str(root))
        assert test.images.shape == (10, 784)
        # The stored pixels, made grey and resized like any other source.
        rng = np.random.default_rng(1)
        first = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        rows = np.asarray(test.images)
        assert np.isclose(rows, np.asarray(normalize(first[None]))).all(axis=1).sum() == 1
    empty = str(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="finds no data set") as err:
        make_dataset(f"tfds:{name}", "train", data_dir=empty)
    assert f"no prepared copy is in {empty}" in str(err.value)
    # A set tfds knows (its catalog's MNIST builder) that is not prepared there.
    with pytest.raises(DatasetNotFoundError, match="not prepared") as err:
        make_dataset("tfds:mnist", "train", data_dir=empty)
    assert empty in str(err.value) and "download_and_prepare()" in str(err.value)
