"""Side by side with Torch-Pruning: top-1 of the pretrained CIFAR ResNet-56 pruned to the same FLOPs.

Rows (``--rows``):

* ``none``: no fine-tuning, ``--target`` (1.52x) fewer FLOPs, importance from 512 training images (8
  batches of 64, the same images for both tools and for BatchNorm recalibration);
* ``ft160`` / ``ft1500``: ``--ft-target`` (2.0x) fewer FLOPs and that many SGD steps (lr 0.01, momentum
  0.9, weight decay 5e-4, batch 64, random crop with 4-pixel padding and horizontal flip) on the
  CIFAR-10 training JPEGs. Torch-Pruning prunes once, then trains the small network; we run
  ``TaylorPruningCallback`` in a ``lightning.Trainer`` with our best settings and with the paper's
  schedule (``OUR_FT``).

Torch-Pruning 1.6 (``pip install -e ".[bench]"``) prunes block-internal channels only (the stem, every
block's second conv and the classifier are ``ignored_layers``): it cannot prune the zero-padded option-A
shortcuts. Its pruning ratio is searched so that the FLOPs ratio lands in [target, 1.01 x target].
We remove the fewest lowest-scoring neurons that reach the target (``CostModel``), one shot or
iteratively (importance re-estimated every ``--step`` fraction of the prunable neurons).

Both compacted networks are counted by the same counter (``torch.utils.flop_counter``, one image, a
multiply-add counts 2) and scored on the first ``--test-per-class`` test JPEGs of each class.
``seconds`` is the wall time of the method (importance, pruning, recalibration, training), not of the
test. Writes ``benchmarks/results/vs_torch_pruning.json``.

    python benchmarks/vs_torch_pruning.py [--rows none ft160 ft1500] [--test-per-class 1000] [--methods ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune import TaylorPruningCallback, build_dependency_graph, compact, estimate_importance
from lightning_prune import prune_once, recalibrate_batchnorm
from lightning_prune.app.lightning_module import ClassificationModule
from lightning_prune.data import cifar10_jpeg_archive, load_cifar10_jpeg_subset, shared_data_dir
from lightning_prune.models import cifar_resnet56
from lightning_prune.pruner import CostModel, NeuronSelector, fewest_reaching

RESULTS = Path(__file__).resolve().parent / "results" / "vs_torch_pruning.json"
ROWS = {"none": 0, "ft160": 160, "ft1500": 1500}
EXAMPLE = torch.zeros(1, 3, 32, 32)
GROUP_MAGNITUDE = {"p": 2, "reduction": "mean", "normalize": "mean"}


# ----------------------------------------------------------------------------- shared measurements
def pretrained() -> nn.Module:
    path = next((shared_data_dir() / "pretrained").glob("resnet56-*.th"))
    return cifar_resnet56(path).eval()


def flops(model: nn.Module) -> float:
    """FLOPs of one 32x32 image (a multiply-add counts 2)."""
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(EXAMPLE)
    return float(counter.get_total_flops())


def top1(model: nn.Module, test: TensorDataset) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in DataLoader(test, batch_size=500):
            correct += int((model(x).argmax(1) == y).sum())
    return 100.0 * correct / len(test)


def calibration_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """512 training images (a seeded draw from the first 52 per class), in 8 batches of 64."""
    data = load_cifar10_jpeg_subset(cifar10_jpeg_archive(), "train", per_class=52)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:512]
    x, y = data.tensors[0][order], data.tensors[1][order]
    return list(zip(x.split(64), y.split(64)))


class Augmented(Dataset):
    """Random crop (4-pixel zero padding) and horizontal flip of normalised image tensors."""

    def __init__(self, data: TensorDataset) -> None:
        self.x, self.y = data.tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.pad(self.x[i], (4, 4, 4, 4))
        top, left = torch.randint(0, 9, (2,)).tolist()
        x = x[:, top : top + 32, left : left + 32]
        return (x.flip(2) if torch.rand(()) < 0.5 else x), self.y[i]


def train_loader(seed: int) -> DataLoader:
    data = load_cifar10_jpeg_subset(cifar10_jpeg_archive(), "train", per_class=None)
    return DataLoader(Augmented(data), batch_size=64, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


# ----------------------------------------------------------------------------- Torch-Pruning
def tp_importance(name: str):
    import torch_pruning as tp

    return {
        "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "magnitude_l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
    }[name.removesuffix("_uniform")]()


def tp_prune(model: nn.Module, method: str, ratio: float) -> nn.Module:
    """``model`` (with gradients in ``.grad`` for taylor) pruned in place by Torch-Pruning at ``ratio``."""
    import torch_pruning as tp

    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    ignored = [model.conv1, model.linear] + [b.conv2 for b in blocks]  # block-internal channels only
    pruner = tp.pruner.MetaPruner(model, EXAMPLE, importance=tp_importance(method), pruning_ratio=ratio,
                                  global_pruning=not method.endswith("_uniform"), ignored_layers=ignored)  # fmt: skip
    pruner.step()
    return model


def with_gradients(model: nn.Module, batches) -> nn.Module:
    """``model`` with the loss gradient summed over ``batches`` in every ``.grad``."""
    model.zero_grad()
    for x, y in batches:
        F.cross_entropy(model(x), y, reduction="sum").div(512).backward()
    return model


def copy_with_grads(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    for p, q in zip(model.parameters(), clone.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return clone


def tp_to_target(method: str, target: float, batches) -> tuple[nn.Module, float]:
    """The Torch-Pruning network whose FLOPs ratio lies in [target, 1.01 target] (bisection on the ratio)."""
    base = pretrained()
    base_flops = flops(base)
    if method.startswith("taylor"):
        with_gradients(base, batches)
    low, high, best = 0.0, 0.95, None
    for _ in range(30):
        ratio = (low + high) / 2
        model = tp_prune(copy_with_grads(base), method, ratio)
        reached = base_flops / flops(model)
        if reached < target:
            low = ratio
        else:
            high, best = ratio, model
            if reached <= 1.01 * target:
                break
    model = best if best is not None else model
    model.zero_grad(set_to_none=True)
    return model, base_flops / flops(model)


def tp_rows(methods: list[str], target: float, batches, test, recalibrate: bool) -> list[dict]:
    rows = []
    for method in methods:
        start = time.perf_counter()
        model, ratio = tp_to_target(method, target, batches)
        seconds = time.perf_counter() - start
        rows.append(row("torch-pruning", method, target, ratio, 0, top1(model, test), seconds))
        if recalibrate:
            rows.append(recalibrated_row("torch-pruning", method + " + bn recalibration (ours)", model, batches,
                                         test, target, ratio, seconds))  # fmt: skip
    return rows


def recalibrated_row(tool: str, method: str, model: nn.Module, batches, test, target: float, ratio: float,
                     seconds: float) -> dict:  # fmt: skip
    """The row of ``model`` after BatchNorm recalibration on ``batches`` (its time added to ``seconds``)."""
    start = time.perf_counter()
    recalibrate_batchnorm(model, batches)
    seconds += time.perf_counter() - start
    return row(tool, method, target, ratio, 0, top1(model, test), seconds)


# ----------------------------------------------------------------------------- ours
def ours_prune(criterion: str, target: float, batches, step: float | None, recalibrate: bool,
               kwargs: dict[str, Any] | None = None, prune_residual: bool = True) -> nn.Module:  # fmt: skip
    """The compacted network: one shot (``step`` None) or ``step`` of the prunable neurons at a time,
    importance re-estimated (and BatchNorm recalibrated, if asked) after each step."""
    model = pretrained()
    graph = build_dependency_graph(model, EXAMPLE, prune_residual=prune_residual)
    cost, selector = CostModel(model, EXAMPLE, graph), NeuronSelector(graph)
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    goal = cost.flops(alive) / target
    while cost.flops(alive) > goal:
        scores = estimate_importance(model, batches, criterion, graph=graph, criterion_kwargs=kwargs, alive=alive)
        values = torch.nan_to_num(scores.neurons, nan=float("inf"))
        most = graph.num_prunable if step is None else max(1, round(step * graph.num_prunable))
        chosen = selector.select(values, alive, most)
        if chosen.numel() == 0:
            break

        def flops_after(count: int) -> float:
            left = alive.clone()
            left[chosen[:count]] = False
            return cost.flops(left)

        masks = prune_once(model, scores, num=fewest_reaching(flops_after, chosen.numel(), goal), alive=alive)
        alive = graph.alive_from_masks(masks)
        if recalibrate:
            recalibrate_batchnorm(model, batches)
    return compact(model, masks, graph=graph).eval()


# name -> (criterion, step (None: one shot), criterion_kwargs, prune_residual); group_magnitude is measured
# best on block-internal neurons (its per-group normalisation prunes the residual stream too much)
OUR_METHODS: dict[str, tuple[str, float | None, dict[str, Any] | None, bool]] = {
    "weight_norm": ("weight_norm", None, None, True),
    "group_magnitude, no residual": ("group_magnitude", None, GROUP_MAGNITUDE, False),
    "taylor_fo_bn": ("taylor_fo_bn", None, None, True),
    "taylor_fo_bn iterative": ("taylor_fo_bn", 0.04, None, True),
}


def our_rows(methods: list[str], target: float, batches, test, base_flops: float) -> list[dict]:
    """Each method without and with BatchNorm recalibration (after every step when iterative)."""
    rows = []
    for method in methods:
        criterion, step, kwargs, residual = OUR_METHODS[method]
        for recalibrate in (False, True) if step is not None else (False,):
            start = time.perf_counter()
            model = ours_prune(criterion, target, batches, step, recalibrate, kwargs, residual)
            seconds = time.perf_counter() - start
            ratio = base_flops / flops(model)
            name = method + (" + bn recalibration" if recalibrate else "")
            rows.append(row("lightning-prune", name, target, ratio, 0, top1(model, test), seconds))
            if step is None:  # one shot: recalibrate the same pruned network
                rows.append(recalibrated_row("lightning-prune", method + " + bn recalibration", model, batches,
                                             test, target, ratio, seconds))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- fine-tuning rows
def train(model: nn.Module, steps: int, seed: int) -> nn.Module:
    """``steps`` SGD steps on augmented training batches."""
    torch.manual_seed(seed)
    optimizer = sgd(model.parameters())
    model.train()
    for step, (x, y) in enumerate(train_loader(seed)):
        if step == steps:
            break
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def tp_finetuned(method: str, target: float, steps: int, batches, test, seed: int) -> dict:
    start = time.perf_counter()
    model, ratio = tp_to_target(method, target, batches)
    train(model, steps, seed)
    return row("torch-pruning", f"{method}, one shot + fine-tuning", target, ratio, steps, top1(model, test),
               time.perf_counter() - start)  # fmt: skip


# our fine-tuning settings per budget (optimizer steps): "best" prunes over the first 4% (1,500 steps) to
# quarter (160 steps) of the steps (cubic schedule, exact stop at the target) then trains the compact network;
# "paper" is the paper's schedule, a fixed number of neurons every 10 steps (2% of them; 5% at 160 steps,
# where 2% cannot reach the target in time) on the masked network to the end
OUR_FT: dict[str, dict[int, dict[str, Any]]] = {
    "best": {160: {"prune_every_n_batches": 4, "pruning_steps": 40, "compact_when_done": True},
             1500: {"prune_every_n_batches": 2, "pruning_steps": 60, "compact_when_done": True}},
    "paper": {160: {"prune_every_n_batches": 10, "neurons_per_step": 0.05},
              1500: {"prune_every_n_batches": 10, "neurons_per_step": 0.02}},
}  # fmt: skip


def ours_finetuned(target: float, steps: int, test, base_flops: float, seed: int, **options: Any) -> dict:
    """``TaylorPruningCallback`` (taylor_fo_bn) with ``options`` for ``steps`` steps."""
    options = {"criterion": "taylor_fo_bn", **options}
    start = time.perf_counter()
    torch.manual_seed(seed)
    module = ClassificationModule(pretrained().train(), optimizer=sgd)  # Lightning keeps the modules' modes
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "compact.pt")
        callback = TaylorPruningCallback(target_flops_ratio=1 / target, compact_on_fit_end=True, compact_path=path,
                                         history_dir=tmp, **options)  # fmt: skip
        trainer = pl.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, accelerator="cpu", default_root_dir=tmp)  # fmt: skip
        trainer.fit(module, train_dataloaders=train_loader(seed))
    model = callback.compact_model.eval()
    method = ", ".join(f"{k}={v}" for k, v in options.items()) + ", callback"
    return row("lightning-prune", method, target, base_flops / flops(model), steps, top1(model, test),
               time.perf_counter() - start)  # fmt: skip


# ----------------------------------------------------------------------------- table
def row(tool: str, method: str, target: float, ratio: float, steps: int, accuracy: float, seconds: float) -> dict:
    r = {"tool": tool, "method": method, "target": target, "flops_ratio": round(ratio, 4), "steps": steps,
         "top1": round(accuracy, 2), "seconds": round(seconds, 1)}  # fmt: skip
    line = f"| {tool} | {method} | {target:.2f}x | {ratio:.3f}x | {steps} | {accuracy:.2f} | {seconds:.0f} |"
    print(line, flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=["none"])
    parser.add_argument("--target", type=float, default=1.52, help="FLOPs ratio without fine-tuning")
    parser.add_argument("--ft-target", type=float, default=2.0, help="FLOPs ratio of the fine-tuning rows")
    parser.add_argument("--test-per-class", type=int, default=200, help="test images per class (1000: all)")
    parser.add_argument("--tp-methods", nargs="+", default=["magnitude", "taylor", "bn_scale", "magnitude_uniform"])
    parser.add_argument("--tp-ft-method", default="magnitude")
    parser.add_argument("--methods", nargs="+", choices=list(OUR_METHODS), default=list(OUR_METHODS))
    parser.add_argument("--our-ft", nargs="+", choices=list(OUR_FT), default=list(OUR_FT), help="our fine-tuning rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    test = load_cifar10_jpeg_subset(cifar10_jpeg_archive(), "test", per_class=args.test_per_class)
    batches = calibration_batches(args.seed)
    base = pretrained()
    base_flops = flops(base)
    print(f"ResNet-56: {base_flops / 1e6:.1f} MFLOPs, top-1 {top1(base, test):.2f} on {len(test)} test images")
    print("| tool | method | target | FLOPs ratio | steps | top-1 | seconds |\n|---|---|---|---|---|---|---|")
    rows = []
    for name in args.rows:
        steps = ROWS[name]
        if steps == 0:
            rows += tp_rows(args.tp_methods, args.target, batches, test, recalibrate=True)
            rows += our_rows(args.methods, args.target, batches, test, base_flops)
            continue
        rows.append(tp_finetuned(args.tp_ft_method, args.ft_target, steps, batches, test, args.seed))
        for setting in args.our_ft:
            rows.append(ours_finetuned(args.ft_target, steps, test, base_flops, args.seed, **OUR_FT[setting][steps]))
    save(args, rows, len(test))


def save(args: argparse.Namespace, rows: list[dict], test_images: int) -> None:
    """Merge ``rows`` into the JSON (rows of other row kinds, test sizes or seeds are kept)."""
    previous = json.loads(args.output.read_text())["rows"] if args.output.is_file() else []
    rows = [{**r, "test_images": test_images, "seed": args.seed} for r in rows]

    def key(r: dict) -> tuple:
        return r["tool"], r["method"], r["target"], r["steps"], r.get("test_images"), r.get("seed", 0)

    keys = {key(r) for r in rows}
    kept = [r for r in previous if key(r) not in keys]
    meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
            "note": "top1 on test_images CIFAR-10 JPEG test images (the first tenth of each class); FLOPs from "
                    "torch.utils.flop_counter on the compacted networks; seconds exclude the test; seed: of the "
                    "data order and calibration draw (0 where absent)"}  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    rows = kept + rows
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
