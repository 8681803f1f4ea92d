"""Dataset tools: CIFAR-10 download to PNGs, real/synthetic mixing, the digits data set."""
