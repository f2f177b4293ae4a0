"""Criteria registry: criteria are looked up by name, and new ones plug in with ``register_criterion``."""

from __future__ import annotations

import inspect
from typing import Any

from lightning_prune.errors import PruningConfigurationError
from lightning_prune.importance.base import Criterion

_CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(name: str):
    """Class decorator adding a :class:`Criterion` subclass to the registry under ``name``."""

    def add(cls: type[Criterion]) -> type[Criterion]:
        if name in _CRITERIA and _CRITERIA[name] is not cls:
            raise ValueError(f"criterion {name!r} is already registered by {_CRITERIA[name].__qualname__}")
        cls.name = name
        _CRITERIA[name] = cls
        return cls

    return add


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(criterion: str | Criterion, **kwargs: Any) -> Criterion:
    """A criterion instance from its registered name (or the instance itself)."""
    if isinstance(criterion, Criterion):
        return criterion
    if criterion not in _CRITERIA:
        raise PruningConfigurationError(
            f"unknown criterion {criterion!r}; registered criteria: {', '.join(available_criteria())}"
        )
    cls = _CRITERIA[criterion]
    try:
        return cls(**kwargs)
    except TypeError as err:
        accepted = [p for p in inspect.signature(cls).parameters.values() if p.kind is not p.VAR_POSITIONAL]
        raise PruningConfigurationError(
            f"criterion {criterion!r} does not accept criterion_kwargs {kwargs} ({err}); it accepts "
            f"{', '.join(str(p) for p in accepted) or 'no arguments'}"
        ) from err
