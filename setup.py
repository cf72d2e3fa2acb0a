from setuptools import find_packages, setup

setup(
    name="kljax",
    version="0.1.0",
    description="KL-regularized learning in JAX: RL policy gradient, distillation and Q-sharp "
    "objectives with gradient-proven tests, one config system from CPU to pods.",
    packages=find_packages(include=["kljax", "kljax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-datasets>=4.9.9,<5",
        "array-record>=0.8",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.1,<2",
        "chex>=0.1.90,<0.2",
        "absl-py>=2.1,<3",
        "numpy>=2.0,<3",
        "safetensors>=0.4,<1",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        "tensorboardX>=2.6,<3",
        "scikit-learn>=1.4,<2",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "hypothesis>=6.100,<7", "transformers>=4.45,<6", "torch>=2.4,<3"],
        # Peers for benchmarks/ (issue 9); versions verified installable with jax 0.10.2 here.
        "bench": ["pytest-benchmark>=4", "torch>=2.4,<3", "transformers>=4.45,<6", "trl>=1.16,<2",
                  "google-tunix>=0.1.7,<0.2"],
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        # TPU compiler for `kljax.aot` (compiling for a TPU topology on a machine without one); the
        # version verified with jax 0.10.2.
        "aot": ["libtpu==0.0.52"],
    },
)
