"""The distillation methods (DKDM, TCCD, relational terms, progressive distillation, RDD as its authors
ran it), one module each, and the one way to assemble a run (`run.build_run`). docs/DESIGN.md.

Importing the package registers its methods' YAML sections (`objective.register`), so that the config loader
accepts `tccd:`, `relational:` and `step_distill:` sections; every script imports it before loading one."""

from . import progressive, relational, tccd
from .objective import register

register("tccd", tccd.defaults, tccd.build)
register("relational", relational.defaults, relational.build)
register("step_distill", progressive.defaults)
