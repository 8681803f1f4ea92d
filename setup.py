"""Editable install of the package (`pip install -e .`); tools/install.sh installs the pinned requirements."""

from setuptools import find_packages, setup

setup(
    name="guided-diffusion-kd",
    version="0.1.0",
    description="Data-free knowledge distillation of pixel-space diffusion models (DKDM, TCCD, RDD)",
    packages=find_packages(
        include=["guided_diffusion", "guided_diffusion.*", "evaluations", "evaluations.*"]
    ),
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "omegaconf", "tqdm", "blobfile"],
)
