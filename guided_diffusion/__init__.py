"""Data-free knowledge distillation of pixel-space diffusion models (DKDM, TCCD, RDD).

A guided-diffusion-style package: UNet, Gaussian diffusion, training loops and the distillation methods.
"""
