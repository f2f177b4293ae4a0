"""The pruning history: one record per pruning step, written as JSON and CSV."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

HISTORY_JSON = "pruning_history.json"
HISTORY_CSV = "pruning_history.csv"


@dataclass
class PruningRecord:
    """What one pruning step removed, and the network it left."""

    step: int  # trainer.global_step (optimizer steps) when pruning ran
    epoch: int
    neurons_removed: int
    neurons_pruned: int  # total so far
    neurons_remaining: int  # prunable neurons still alive
    loss: float | None  # smoothed training loss
    flops: int  # per example, of the network with removed neurons cut out
    params: int
    removed: list[dict[str, int | str]] = field(default_factory=list)  # {"layer", "index"} per channel
    latency: float | None = None  # predicted seconds of the compact network (with a latency target)

    def as_dict(self) -> dict:
        return asdict(self)


def write_history(records: list[PruningRecord], directory: str | Path) -> None:
    """Write ``pruning_history.json`` (complete) and ``pruning_history.csv`` (one row per step)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / HISTORY_JSON).write_text(json.dumps([r.as_dict() for r in records], indent=1))
    columns = [c for c in PruningRecord.__dataclass_fields__ if c != "removed"] + ["removed"]
    with open(directory / HISTORY_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in records:
            row = r.as_dict()
            row["removed"] = " ".join(f"{x['layer']}:{x['index']}" for x in r.removed)
            writer.writerow([row[c] for c in columns])
