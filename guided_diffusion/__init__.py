"""Data-free knowledge distillation of pixel-space diffusion models (DKDM, TCCD, RDD), guided-diffusion style."""
