"""Criterion entries of a study: a label, a registered criterion with its arguments, and options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_prune.importance import Criterion, get_criterion

#: every criterion of the literature the library implements, as the correlation study compares them
ALL_CRITERIA: list[dict[str, Any]] = [
    {"label": "taylor_fo_bn", "criterion": "taylor_fo_bn"},
    {"label": "taylor_fo_bn_fg", "criterion": "taylor_fo_bn_fg"},
    {"label": "taylor_fo_weight", "criterion": "taylor_fo_weight"},
    {"label": "taylor_fo_weight_group", "criterion": "taylor_fo_weight", "kwargs": {"form": "group"}},
    {"label": "taylor_so", "criterion": "taylor_so"},
    {"label": "obd", "criterion": "obd"},
    {"label": "obd_squared", "criterion": "obd", "kwargs": {"form": "squared"}},
    {"label": "taylor_output", "criterion": "taylor_output"},
    {"label": "activation_mean", "criterion": "activation_mean"},
    {"label": "apoz", "criterion": "apoz"},
    {"label": "taylor_fo_abs", "criterion": "taylor_fo_abs"},
    {"label": "taylor_fo_sq", "criterion": "taylor_fo_sq"},
    {"label": "taylor_fo_abs_random", "criterion": "taylor_fo_abs", "kwargs": {"gradient": "random"}},
    {"label": "taylor_fo_sq_random", "criterion": "taylor_fo_sq", "kwargs": {"gradient": "random"}},
    {"label": "taylor_fo_sq_random_norm", "criterion": "taylor_fo_sq",
     "kwargs": {"gradient": "random", "normalize_gradient": True}},  # fmt: skip
    {"label": "weight_norm", "criterion": "weight_norm"},
    {"label": "bn_scale", "criterion": "bn_scale"},
    {"label": "random", "criterion": "random"},
]


@dataclass
class CriterionEntry:
    label: str
    criterion: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    fixed: bool = False  # curve study: estimate once instead of after every step
    images: int | None = None  # curve study: images used to estimate (default: the study's)

    def build(self, seed: int = 0) -> Criterion:
        kwargs = dict(self.kwargs)
        if self.criterion == "random":
            kwargs.setdefault("seed", seed)
        return get_criterion(self.criterion, **kwargs)


def parse_entries(entries: Any) -> list[CriterionEntry]:
    """Entries from config: names (``"taylor_so"``, ``"taylor_so-fixed"``), dicts, or ``"all"``."""
    if entries == "all" or entries is None:
        entries = ALL_CRITERIA
    out = []
    for e in entries:
        if isinstance(e, str):
            fixed = e.endswith("-fixed")
            name = e.removesuffix("-fixed")
            match = next((dict(a) for a in ALL_CRITERIA if a["label"] == name), {"label": name, "criterion": name})
            out.append(CriterionEntry(label=e, criterion=match["criterion"], kwargs=dict(match.get("kwargs", {})),
                                      fixed=fixed))  # fmt: skip
        else:
            e = dict(e)
            label = e.get("label") or e["criterion"]
            out.append(CriterionEntry(label=label, criterion=e.get("criterion", label), kwargs=dict(e.get("kwargs") or {}),
                                      fixed=bool(e.get("fixed", False)), images=e.get("images")))  # fmt: skip
    return out
