"""Physical compaction of a pruned network: smaller layers, saved, loaded and exported."""

from lightning_prune.compaction.compact import (
    CompactionError,
    PruningMasks,
    alive_from_masks,
    architecture_fingerprint,
    compact,
    compact_info,
    masks_from_alive,
    round_alive,
    round_masks,
)
from lightning_prune.compaction.inference import optimize_for_inference
from lightning_prune.compaction.export import export_onnx, export_program, onnx_available
from lightning_prune.compaction.serialization import CompactModelMismatchError, load_compact, save_compact

__all__ = [
    "CompactModelMismatchError",
    "CompactionError",
    "PruningMasks",
    "alive_from_masks",
    "architecture_fingerprint",
    "compact",
    "compact_info",
    "export_onnx",
    "export_program",
    "load_compact",
    "masks_from_alive",
    "onnx_available",
    "optimize_for_inference",
    "round_alive",
    "round_masks",
    "save_compact",
]
