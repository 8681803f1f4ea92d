"""Infrastructure under the ADM core: checkpoints and atomic writes, precision, compile and CUDA graphs,
the run-dir lock. Nothing here imports a distillation method."""
