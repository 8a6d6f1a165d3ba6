"""Shared test setup.

Eight virtual CPU devices so sharding is exercised on every machine; this must
happen before JAX initialises its backend, hence at import time here.
"""
import os

import jax

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir():
    """The IDX data folder (CI points VSML_DATA_DIR at the shared MNIST/Fashion copy)."""
    path = os.environ.get("VSML_DATA_DIR")
    if not path or not os.path.isdir(os.path.join(path, "mnist")):
        pytest.fail(f"VSML_DATA_DIR={path!r} is not a folder with mnist/ and fashion_mnist/ "
                    "IDX files; point it there (CI uses ../shared/data, see BUILD.md). "
                    "The data tests run on real files.")
    return path


@pytest.fixture(scope="session")
def clusters():
    """3 Gaussian clusters in 6-D: with permuted labels, learnable only online.

    Built with numpy: no JAX compilation needed for the test data.
    """
    import jax.numpy as jnp
    import numpy as np
    from vsml_jax.data import Dataset
    rng = np.random.default_rng(0)
    protos = 2.0 * rng.normal(size=(3, 6))
    labels = rng.integers(0, 3, size=90)
    images = protos[labels] + 0.3 * rng.normal(size=(90, 6))
    return Dataset(images=jnp.asarray(images, jnp.float32),
                   labels=jnp.asarray(labels, jnp.int32), num_classes=3, name="clusters")
