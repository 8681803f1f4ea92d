"""The package and what it imports. Pins live in constraints.txt; tools/install.sh installs with them."""

from setuptools import find_packages, setup

setup(
    name="guided-diffusion-kd",
    version="0.1.0",
    description="Data-free knowledge distillation of pixel-space diffusion models (DKDM, TCCD, RDD)",
    packages=find_packages(
        include=["guided_diffusion", "guided_diffusion.*", "evaluations", "evaluations.*", "datasets"]
    ),
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "scipy", "pillow", "omegaconf", "tqdm"],
    extras_require={
        "mpi": ["mpich", "mpi4py"],  # mpiexec launches (dist_util falls back to one process without it)
        "demo": ["scikit-learn", "matplotlib", "thop", "torchvision"],  # digits data, plots, FLOP counts
        "rdd": ["timm"],  # the ImageNet classifier of RDD's relational losses
        "wandb": ["wandb"],  # --wandb logging
        "tf": ["tensorflow-cpu"],  # evaluator --features tf: ADM's TensorFlow graph and arithmetic
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "ruff", "mutmut"],
    },
)
