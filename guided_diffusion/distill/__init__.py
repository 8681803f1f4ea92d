"""The distillation methods (DKDM, TCCD, relational terms, progressive distillation, RDD as its authors
ran it), one module each, and the one way to assemble a run (`run.build_run`). docs/DESIGN.md."""
