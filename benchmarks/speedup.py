"""Measured CPU speed-up of compact models against the FLOPs they save.

Networks and how neurons are chosen:

* ResNet-56 (CIFAR input, the shared pretrained weights): ``taylor_fo_bn`` importance on 500 real
  training images, the method the callback runs (``weight_norm`` when the shared data is missing);
* torchvision ResNet-50 (224 input, random weights: nothing is downloaded): the ``random`` criterion,
  since random weights carry no importance; the global ranking then takes about the same share of
  every layer, channels tied by residual additions less often.

The fewest lowest-scoring neurons are removed (global ranking, every layer keeps a channel) for the
compact model's FLOPs to fall by about 30% and 50%, with widths as they come (``round_to 1``) and
rounded up to a multiple of 16 (``round_to 16``, oneDNN's channel block for float32 on AVX-512; the
search then counts the FLOPs after rounding). The model is then compacted with
``lightning_prune.compact``.

Latency is the best wall-clock time over repeats after warm-up, ``torch.inference_mode``, original and
compact timed alternately so that both see the same machine, at batch 1 and 64, in three modes applied
alike to both networks:

* ``eager``: the modules as they are;
* ``deploy``: ``lightning_prune.optimize_for_inference`` (BatchNorm folded, channels-last weights);
* ``compile``: ``torch.compile`` (inductor, with freezing), when a C++ compiler is found.

FLOPs come from ``torch.utils.flop_counter`` (per image, a multiply-add counts 2). For ResNet-56 the
JSON also holds one fine-tuning step (forward, backward, SGD) at batch 64 of the masked and of the
compact model.

    python benchmarks/speedup.py [--threads 2] [--quick] [--modes eager deploy compile] [--round-to 1 16]

Writes ``benchmarks/results/speedup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune import build_dependency_graph, compact, get_criterion, optimize_for_inference
from lightning_prune.compaction import round_alive
from lightning_prune.data import cifar10_jpeg_archive, load_cifar10_jpeg_subset, shared_data_dir
from lightning_prune.importance import estimate_importance
from lightning_prune.models import cifar_resnet56, load_cifar_resnet_weights
from lightning_prune.pruner import CostModel, NeuronMasks, NeuronSelector, neuron_scores

RESULTS = Path(__file__).resolve().parent / "results" / "speedup.json"
MODES = ("eager", "deploy", "compile")


def flops_per_image(model: nn.Module, size: int) -> float:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prepare(model: nn.Module, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network as run in ``mode`` (see the module docstring)."""
    model = model.eval()
    if mode == "deploy":
        return optimize_for_inference(model)
    if mode == "compile":
        return torch.compile(model, dynamic=False)
    return model


def paired_latency(first, second, x: torch.Tensor, repeats: int, warmup: int) -> tuple[float, float]:
    """Best seconds per forward of two networks timed alternately on the same input."""
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for net, record in ((first, times[0]), (second, times[1])):
                start = time.perf_counter()
                net(x)
                if i >= warmup:
                    record.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def train_step_time(model: nn.Module, x: torch.Tensor, repeats: int, masks: NeuronMasks | None = None) -> float:
    """Median seconds of one fine-tuning step; the masked model also re-zeroes its removed weights."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if masks is not None:
            masks.zero_parameters()
        if i:
            times.append(time.perf_counter() - start)
    model.eval()
    return statistics.median(times)


def taylor_scores(model: nn.Module, graph) -> torch.Tensor:
    """``taylor_fo_bn`` per neuron on 50 training images per class of the shared CIFAR-10 archive."""
    data = load_cifar10_jpeg_subset(cifar10_jpeg_archive(), "train", per_class=50)
    loader = DataLoader(data, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    return estimate_importance(model, loader, "taylor_fo_bn", graph=graph).neurons


def prune_to_flops(
    model: nn.Module, size: int, reduction: float, scores: torch.Tensor, graph, round_to: int
) -> dict[str, torch.Tensor]:
    """Masks removing the fewest lowest-scoring neurons for FLOPs, after rounding widths up to a multiple
    of ``round_to``, to fall by ``reduction``."""
    example = torch.zeros(1, 3, size, size)
    cost = CostModel(model, example, graph)
    scores = torch.nan_to_num(scores.double(), nan=float("inf"))
    selector = NeuronSelector(graph, min_channels=1)
    everyone = torch.ones(graph.num_neurons, dtype=torch.bool)
    target = (1 - reduction) * cost.flops(everyone)

    def alive_after(count: int) -> torch.Tensor:
        alive = everyone.clone()
        alive[selector.select(scores, everyone, count)] = False
        return round_alive(graph, alive, round_to, scores)

    low, high = 0, graph.num_prunable  # binary search for the fewest removals reaching the target
    while low < high:
        mid = (low + high) // 2
        if cost.flops(alive_after(mid)) <= target:
            high = mid
        else:
            low = mid + 1
    alive = alive_after(low)
    return {name: alive[g.neurons] for name, g in graph.gates.items()}


def run_case(
    name: str, build, size: int, score_fn, args: argparse.Namespace, reps: dict[int, tuple[int, int]], train: bool
) -> list[dict]:
    rows = []
    original = build().eval()
    base_flops, base_params = flops_per_image(original, size), params(original)
    graph = build_dependency_graph(original, torch.zeros(1, 3, size, size))
    scores, criterion = score_fn(original, graph)
    base_train = train_step_time(original, torch.randn(64, 3, size, size), 3) if train else None
    prepared = {mode: prepare(original, mode) for mode in args.modes}
    for reduction in args.reductions:
        for round_to in args.round_to:
            masks = prune_to_flops(original, size, reduction, scores, graph, round_to)
            model = build().eval()  # masks are keyed by layer name: they apply to a fresh copy
            model_graph = build_dependency_graph(model, torch.zeros(1, 3, size, size))
            zeroer = NeuronMasks(model_graph)
            zeroer.update(~model_graph.alive_from_masks(masks))
            zeroer.zero_parameters()  # the masked model, as the callback leaves it
            small = compact(model, masks, graph=model_graph).eval()
            x = torch.randn(4, 3, size, size)
            with torch.inference_mode():
                diff = float((model(x) - small(x)).abs().max())
            if diff > 1e-3:
                raise RuntimeError(f"{name}: the compact model differs from the masked one by {diff:.3g}")
            row: dict[str, Any] = {
                "model": name,
                "input": f"{size}x{size}",
                "criterion": criterion,
                "target_flops_reduction": reduction,
                "round_to": round_to,
                "flops_original": base_flops,
                "flops_compact": flops_per_image(small, size),
                "params_original": base_params,
                "params_compact": params(small),
                "max_abs_diff_float32": diff,
                "widths": [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)],
            }
            row["flops_ratio"] = row["flops_original"] / row["flops_compact"]
            for mode in args.modes:
                fast = prepare(small, mode)
                with torch.inference_mode():
                    row[f"{mode}_max_abs_diff_to_masked"] = float((model(x) - fast(x)).abs().max())
                if row[f"{mode}_max_abs_diff_to_masked"] > 1e-3:
                    raise RuntimeError(f"{name} ({mode}): the prepared compact model differs from the masked one")
                for b, (repeats, warmup) in reps.items():
                    orig_s, compact_s = paired_latency(prepared[mode], fast, torch.randn(b, 3, size, size), repeats, warmup)
                    row[f"{mode}_b{b}_original_ms"] = 1e3 * orig_s
                    row[f"{mode}_b{b}_compact_ms"] = 1e3 * compact_s
                    row[f"{mode}_b{b}_speedup"] = orig_s / compact_s
                row[f"{mode}_b64_speedup_over_flops_ratio"] = row[f"{mode}_b64_speedup"] / row["flops_ratio"]
                print(format_row(row, mode), flush=True)
            if train and round_to == 1:
                row["train_step_b64_original_ms"] = 1e3 * base_train
                row["train_step_b64_masked_ms"] = 1e3 * train_step_time(model, torch.randn(64, 3, size, size), 3, zeroer)
                row["train_step_b64_compact_ms"] = 1e3 * train_step_time(small, torch.randn(64, 3, size, size), 3)
                print(f"train step b64: masked {row['train_step_b64_masked_ms']:.0f} ms, "
                      f"compact {row['train_step_b64_compact_ms']:.0f} ms", flush=True)  # fmt: skip
            rows.append(row)
    return rows


HEADER = (
    "| model | FLOPs cut (target) | round_to | GFLOPs orig -> compact | params (M) orig -> compact | FLOPs ratio "
    "| mode | b1 ms orig -> compact | b1 speed-up | b64 ms orig -> compact | b64 speed-up | b64 speed-up / FLOPs ratio |"
    "\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: dict[str, Any], mode: str) -> str:
    cut = 1 - r["flops_compact"] / r["flops_original"]
    return (
        f"| {r['model']} ({r['input']}) | {cut:.1%} ({r['target_flops_reduction']:.0%}) | {r['round_to']} "
        f"| {r['flops_original'] / 1e9:.3f} -> {r['flops_compact'] / 1e9:.3f} "
        f"| {r['params_original'] / 1e6:.2f} -> {r['params_compact'] / 1e6:.2f} | {r['flops_ratio']:.2f}x | {mode} "
        f"| {r[f'{mode}_b1_original_ms']:.1f} -> {r[f'{mode}_b1_compact_ms']:.1f} | {r[f'{mode}_b1_speedup']:.2f}x "
        f"| {r[f'{mode}_b64_original_ms']:.0f} -> {r[f'{mode}_b64_compact_ms']:.0f} | {r[f'{mode}_b64_speedup']:.2f}x "
        f"| **{r[f'{mode}_b64_speedup_over_flops_ratio']:.2f}** |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--round-to", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--models", nargs="+", choices=("resnet56", "resnet50"), default=["resnet56", "resnet50"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if "compile" in args.modes:
        if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
            print("no C++ compiler found: skipping the compile mode", flush=True)
            args.modes.remove("compile")
        else:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant weights: BatchNorm folding and weight prepacking
    load_at_start = os.getloadavg()
    print(f"threads {args.threads}, load average {load_at_start[0]:.1f} on {os.cpu_count()} cores", flush=True)

    pretrained = sorted((shared_data_dir() / "pretrained").glob("resnet56-*.th"))
    has_images = cifar10_jpeg_archive().is_file()

    def resnet56() -> nn.Module:
        model = cifar_resnet56()
        if pretrained:
            load_cifar_resnet_weights(model, pretrained[0])
        return model

    def resnet56_scores(model: nn.Module, graph) -> tuple[torch.Tensor, str]:
        if has_images:
            return taylor_scores(model, graph), "taylor_fo_bn (500 CIFAR-10 training images)"
        return neuron_scores(graph, get_criterion("weight_norm").static_scores(graph)), "weight_norm"

    def resnet50() -> nn.Module:
        torch.manual_seed(0)
        return torchvision.models.resnet50()

    def resnet50_scores(model: nn.Module, graph) -> tuple[torch.Tensor, str]:
        return neuron_scores(graph, get_criterion("random", seed=0).static_scores(graph)), "random (seed 0)"

    quick = args.quick
    print(HEADER, flush=True)
    rows = []
    # (repeats, warm-up runs) per batch size
    if "resnet56" in args.models:
        rows += run_case("ResNet-56" + (" pretrained" if pretrained else ""), resnet56, 32, resnet56_scores, args,
                         {1: (10, 2) if quick else (50, 5), 64: (3, 1) if quick else (10, 2)}, train=True)  # fmt: skip
    if "resnet50" in args.models:
        rows += run_case("ResNet-50", resnet50, 224, resnet50_scores, args,
                         {1: (3, 1) if quick else (10, 2), 64: (1, 1) if quick else (3, 1)}, train=False)  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "modes": args.modes,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "note": "<mode>_b<batch>_*_ms: best wall-clock time over repeats after warm-up, original and compact "
        "timed alternately; FLOPs per image from torch.utils.flop_counter",
    }
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
