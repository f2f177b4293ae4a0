"""Architecture coverage: the callback on every torchvision classification model under 100M parameters and
on a set of timm models, used as a new user would.

Each model (``weights=None``/``pretrained=False``, 10 classes) sits in ``self.net`` of a LightningModule with
no ``forward`` and no ``example_input_array``; a CPU ``Trainer`` fits it on random images with
``TaylorPruningCallback(target_flops_ratio=0.5)`` pruning at every optimizer step. Per model: the prunable
share of the neurons, the FLOPs of ``callback.compact()`` over those of the original network (eval mode,
``FlopCounterMode``), the relative max difference between the compact and the masked network (float64,
eval mode), the seconds taken, and the first line of any error. The target is met at <= 0.55x.

    python benchmarks/coverage.py [--family torchvision|timm] [--models resnet18 convnext_atto ...]

Merges its rows into ``benchmarks/results/coverage.json`` (a rerun of some models replaces theirs) and
prints the Markdown table of every row, also written to ``benchmarks/results/coverage.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune import TaylorPruningCallback, recalibrate_batchnorm

RESULTS = Path(__file__).resolve().parent / "results" / "coverage.json"
TARGET, MET_AT, EXACT_AT = 0.5, 0.55, 1e-4
MAX_PARAMS = 100_000_000
NUM_CLASSES = 10

# torchvision: the input size, and the constructor arguments a user would give at that size
TORCHVISION_INPUT = {
    "inception_v3": 80,  # at least 75x75
    "maxvit_t": 224,  # 7x7 partitions after a 32x downsampling
}
TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False},  # else training mode returns a tuple of logits
    "inception_v3": {"aux_logits": False},
    **{f"vit_{v}": {"image_size": 64} for v in ("b_16", "b_32", "l_16", "l_32")},
}
# timm: the ones named in issue 10, then other representative families
TIMM_MODELS = (
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "convnext_atto", "convnext_nano", "efficientnet_b0",
    "regnety_002", "regnety_004", "resnet18d", "ghostnet_100", "mobilenetv3_small_100", "vit_small_patch16_224",
    "swin_tiny_patch4_window7_224", "resnet50d", "seresnext26d_32x4d", "efficientnet_lite0", "rexnet_100",
    "repvgg_a0", "dla34", "cspresnet50", "mobilevit_xxs", "edgenext_xx_small", "levit_128s",
)  # fmt: skip
TIMM_INPUT = {"swin_tiny_patch4_window7_224": 224, "levit_128s": 224}  # fixed attention-bias resolutions


@dataclass
class Spec:
    """How to build one model and feed it."""

    family: str
    name: str
    size: int = 64
    batch: int = 4
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        if self.family == "torchvision":
            return torchvision.models.get_model(self.name, weights=None, num_classes=NUM_CLASSES, **self.kwargs)
        import timm

        return timm.create_model(self.name, pretrained=False, num_classes=NUM_CLASSES, **self.kwargs)


def torchvision_spec(name: str) -> Spec:
    size = TORCHVISION_INPUT.get(name, 64)
    return Spec("torchvision", name, size, 2 if size >= 224 else 4, TORCHVISION_KWARGS.get(name, {}))


def timm_spec(name: str) -> Spec:
    size = TIMM_INPUT.get(name, 64)
    kwargs = {"img_size": size} if name.startswith(("vit_", "deit_", "swin_", "levit_")) else {}
    return Spec("timm", name, size, 2 if size >= 224 else 4, kwargs)


def torchvision_names() -> list[str]:
    """The classification models of ``torchvision.models`` with under ``MAX_PARAMS`` parameters (at 1000
    classes, as their weights' metadata says)."""
    return [
        name for name in torchvision.models.list_models(module=torchvision.models)
        if next(iter(torchvision.models.get_model_weights(name))).meta["num_params"] < MAX_PARAMS
    ]  # fmt: skip


class NetOnly(pl.LightningModule):
    """What a user writes: the network in ``self.net``, no ``forward``, no ``example_input_array``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward (MultiheadAttention's fast path off, so its matmuls are counted); the
    model goes back to its mode (the Trainer does not switch an eval-mode network back to training)."""
    fastpath, training = torch.backends.mha.get_fastpath_enabled(), model.training
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(training)
    return counter.get_total_flops()


def relative_max_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def prune_and_measure(
    model: nn.Module, size: int, batch: int = 4, steps: int = 4, seed: int = 0, into: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fit ``model`` for ``steps`` optimizer steps under ``TaylorPruningCallback(target_flops_ratio=0.5)``,
    pruning at every step and reaching the target at step ``steps - 1``; then, BatchNorm statistics
    re-estimated on 32 more random images, the compact model's FLOPs ratio and its relative max difference to the
    masked network, in float64 and eval mode. Fills ``into`` (returned) as it goes,
    so what was measured before an error stays; raises what the callback or the compact model raises."""
    result = {} if into is None else into
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, size, size)  # the callback's batch: Swin V2's bias MLP runs once a forward
    result["params"] = sum(p.numel() for p in model.parameters())
    initial_flops = count_flops(model, x)
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(batch * steps, 3, size, size, generator=gen),
                         torch.randint(0, NUM_CLASSES, (batch * steps,), generator=gen))  # fmt: skip
    callback = TaylorPruningCallback(target_flops_ratio=TARGET, prune_every_n_batches=1, pruning_steps=steps - 1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
        default_root_dir=tempfile.mkdtemp(prefix="lightning-prune-coverage-"),
    )  # fmt: skip
    loader = DataLoader(data, batch_size=batch)
    try:
        trainer.fit(NetOnly(model), loader)
    finally:
        if callback.graph is not None:
            result["prunable_share"] = callback.graph.num_prunable / callback.graph.num_neurons
    calibration = torch.randn(32, 3, size, size, generator=gen)  # a few small batches leave running statistics
    recalibrate_batchnorm(model, DataLoader(TensorDataset(calibration), batch_size=16))  # that blow up in eval
    small = callback.compact()
    result["flops_ratio"] = count_flops(small, x) / initial_flops
    result["target_met"] = result["flops_ratio"] <= MET_AT
    masked, small = model.eval().double(), small.eval().double()
    with torch.no_grad():
        expected = masked(x.double())
        result["output_scale"] = float(expected.abs().max())  # ~0 would make the comparison vacuous
        result["rel_error"] = relative_max_difference(small(x.double()), expected)
    result["exact"] = result["rel_error"] <= EXACT_AT
    return result


def run(spec: Spec, steps: int) -> dict[str, Any]:
    """One row of the table; an error is recorded (with what was measured before it), not raised."""
    row: dict[str, Any] = {"family": spec.family, "name": spec.name, "input": f"{spec.batch}x3x{spec.size}x{spec.size}"}
    start = time.perf_counter()
    try:
        prune_and_measure(spec.build(), spec.size, spec.batch, steps, into=row)
        row["error"] = None
    except Exception as err:  # noqa: BLE001 - the sweep records every failure and goes on
        lines = str(err).strip().splitlines() or [""]
        row["error"] = f"{type(err).__name__}: {lines[0]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["ok"] = row["error"] is None and row["exact"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| family | model | params (M) | input | prunable share | FLOPs reached | target <= 0.55x | "
             "rel. error | s | error |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        share, flops, error = r.get("prunable_share"), r.get("flops_ratio"), r.get("rel_error")
        lines.append(
            f"| {r['family']} | {r['name']} | {r.get('params', 0) / 1e6:.1f} | {r['input']} | "
            f"{'' if share is None else f'{share:.2f}'} | {'' if flops is None else f'{flops:.3f}'} | "
            f"{'' if flops is None else ('yes' if r['target_met'] else 'no')} | "
            f"{'' if error is None else f'{error:.1e}'} | {r['seconds']:.0f} | "
            f"{(r['error'] or '').replace('|', '/')[:160]} |"
        )  # fmt: skip
    met = sum(bool(r.get("target_met")) for r in rows)
    exact = sum(bool(r.get("exact")) for r in rows)
    failed = sum(r["error"] is not None for r in rows)
    lines.append(f"\n{len(rows)} models: {sum(r['ok'] for r in rows)} ok (ran and exact), {met} reach <= {MET_AT}x "
                 f"FLOPs, {exact} exact (<= {EXACT_AT:g}), {failed} failed.")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("torchvision", "timm"))
    parser.add_argument("--models", nargs="+", help="only these (names of either family)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps; the target is reached at steps - 1")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the callback's start-up log, per model
    specs = []
    if args.family in (None, "torchvision"):
        specs += [torchvision_spec(n) for n in torchvision_names()]
    if args.family in (None, "timm"):
        specs += [timm_spec(n) for n in TIMM_MODELS]
    if args.models:
        specs = [s for s in specs if s.name in args.models]
    rows = {(r["family"], r["name"]): r for r in json.loads(args.output.read_text())} if args.output.exists() else {}
    for spec in specs:
        row = run(spec, args.steps)
        rows[spec.family, spec.name] = row
        print(f"{spec.family}/{spec.name}: " + json.dumps({k: v for k, v in row.items() if k not in ("family", "name")}),
              flush=True)  # fmt: skip
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(list(rows.values()), indent=1) + "\n")
        gc.collect()
    markdown = table(list(rows.values()))
    args.output.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
