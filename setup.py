"""Installs vsml_jax: Variable Shared Meta Learning in JAX."""
from setuptools import find_packages, setup

setup(
    name="vsml_jax",
    version="0.1.0",
    description="Variable Shared Meta Learning (VS-ML) in JAX: learning algorithms "
                "that run in the forward dynamics of weight-shared tiny LSTMs.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vsml_jax", "vsml_jax.*", "experiments", "experiments.*"]),
    package_data={"vsml_jax": ["pretrained/*.msgpack", "pretrained/*.json"],
                  "experiments": ["configs/*.flags"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "evosax>=0.2",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.89",
        "absl-py>=2.0",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",   # TensorBoard event files without TensorFlow
        "psutil>=5.9",         # workdir lock: is the holder's process still alive?
    ],
    extras_require={
        # tensorboard reads events back; pytest-xdist runs the suite on 2 cores.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "tensorboard>=2.15"],
        "tfds": ["tensorflow-datasets>=4.9"],
        # Accelerator builds of jaxlib; see BUILD.md.
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # Compilers for planning runs on machines without the hardware
        # (experiments.plan; BUILD.md): libtpu / the CUDA plugin of this jax.
        "tpu-aot": ["jax[tpu]==0.10.2"],
        "gpu-aot": ["jax[cuda13]==0.10.2"],
    },
)
