"""The one interface every distillation term implements, and the registry that finds terms by YAML section.

An objective is called as `terms = objective(student, batch)` once per microbatch. `batch` is the dict the
loop builds from the pool (x_t, t, x_tm1, weights, teacher_out, model_kwargs, step) plus what the base
objective left there (student_output, student_features). `terms["loss"]` is optimized: a per-item tensor is
weighted by the pool's keep weights and averaged, a scalar is added as it is. Every entry is logged, the
base objective's as they are and an extra objective's as `<section>_<key>`.

A method is a module that defines `defaults()` (its YAML keys with their defaults, the schema the config
loader checks) and `build(config, parts)` (its objective), and registers both under its YAML section with
`register` when it is imported; this package's own methods are registered by its `__init__`. State rule:
an objective that is an `nn.Module` is trained with the student and its state (heads, queues, buffers) is
saved in, and resumed from, the run's opt file; model files hold weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..config import register_section, unregister_section


@dataclass
class RunParts:
    """What a method's builder may use: the frozen teacher, the student, both diffusions, the pool (DKDM
    runs), the resolved config and the device."""

    teacher: nn.Module
    teacher_diffusion: Any
    student: nn.Module
    student_diffusion: Any
    cfg: Mapping[str, Any]
    device: torch.device
    pool: Any = None
    classifier_path: str = ""


class Objective(Protocol):
    """A term of the distillation loss. `base` objectives run the student themselves (one per run: DKDM's,
    or one that replaces it such as TCCD's); the others read `student_output`/`student_features` from the
    batch. `needs_features` asks the base objective to keep the student's UNet features."""

    base: bool
    needs_features: bool

    def __call__(self, student: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


@dataclass(frozen=True)
class Method:
    """A YAML section's schema (`defaults`) and, for terms of the DKDM loop, its objective builder."""

    section: str
    defaults: Callable[[], dict[str, Any]]
    build: Callable[[Mapping[str, Any], RunParts], Objective] | None = None


_REGISTERED: dict[str, Method] = {}


def register(
    section: str,
    defaults: Callable[[], dict[str, Any]],
    build: Callable[[Mapping[str, Any], RunParts], Objective] | None = None,
) -> Method:
    """Make `section:` a YAML section (schema `defaults()`) and, with `build`, a term of the DKDM loop."""
    method = Method(section, defaults, build)
    register_section(section, defaults)
    _REGISTERED[section] = method
    return method


def unregister(section: str) -> None:
    """Forget a method registered with `register` (tests)."""
    _REGISTERED.pop(section, None)
    unregister_section(section)


def find_method(section: str) -> Method | None:
    """The method registered under a YAML section, or None."""
    return _REGISTERED.get(section)


def known_sections() -> list[str]:
    """The section names registered methods own."""
    return sorted(_REGISTERED)


def build_objectives(
    sections: Mapping[str, Mapping[str, Any]], parts: RunParts
) -> dict[str, Objective]:
    """The objective of every method section in `sections`, by section name (YAML order)."""
    objectives = {}
    for section, config in sections.items():
        method = find_method(section)
        if method is None or method.build is None:
            raise ValueError(f"section '{section}' is not a term of the DKDM loop")
        objectives[section] = method.build(config, parts)
    return objectives


class FeatureProbe:
    """Calls a UNet like the diffusion does and keeps its last raw output, and its features when `keep`
    (the UNet's `return_features`); one wrapper for every method that reads the student or teacher."""

    def __init__(self, model: Any, keep: bool) -> None:
        self.model = model
        self.keep = keep
        self.output: torch.Tensor | None = None
        self.features: dict[str, Any] | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.keep:
            self.output, self.features = self.model(x, t, return_features=True, **kwargs)
        else:
            self.output = self.model(x, t, **kwargs)
        return self.output
