"""The distillation methods (DKDM, TCCD, relational terms, progressive distillation, RDD as its authors
ran it), one module each, and the one way to assemble a run (`run.build_run`). docs/DESIGN.md.

Importing the package registers DKDM's `teacher:` section and its methods' YAML sections
(`objective.register`), so that the config loader accepts `teacher:`, `tccd:`, `relational:` and
`step_distill:` sections; every script imports it before loading a config."""

from ..config import register_teacher_section
from . import progressive, relational, tccd
from .dkdm import settings as dkdm_settings
from .objective import register

register_teacher_section(dkdm_settings.SCHEMA)

register("tccd", tccd.defaults, tccd.build)
register("relational", relational.defaults, relational.build)
register("step_distill", progressive.defaults)
