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
