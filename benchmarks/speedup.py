"""Measured CPU speed-up of compact models against the FLOPs they save.

For ResNet-56 (CIFAR input, shared pretrained weights when found) and torchvision ResNet-50 (224 input,
random weights: nothing is downloaded), neurons are removed by the ``weight_norm`` criterion (l2 norm
of the producing filter, global ranking, every layer keeps a channel) until the FLOPs drop by about
30% and 50%, as counted by the callback's cost model; the model is then compacted with
``lightning_prune.compact``. The table gives FLOPs (``torch.utils.flop_counter``, per image, a
multiply-add counts 2), parameters, and CPU latency (best wall-clock time over repeats after warm-up,
``torch.inference_mode``; medians and process CPU times are in the JSON) at batch 1 and 64 of the original and the compact model, the measured
speed-up next to the FLOPs ratio, and for ResNet-56 one fine-tuning step (forward, backward, SGD) at
batch 64 of the masked and of the compact model.

    python benchmarks/speedup.py [--threads 2] [--quick]

Writes ``benchmarks/results/speedup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune import build_dependency_graph, compact, get_criterion
from lightning_prune.data import shared_data_dir
from lightning_prune.models import cifar_resnet56, load_cifar_resnet_weights
from lightning_prune.pruner import CostModel, NeuronMasks, NeuronSelector, neuron_scores

RESULTS = Path(__file__).resolve().parent / "results" / "speedup.json"


def flops_per_image(model: nn.Module, size: int) -> float:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def latency(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    """Seconds per forward: the best and the median wall-clock time over ``repeats``, and the median
    process CPU time (all threads), which a busy machine disturbs less than wall-clock time."""
    model.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        wall, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            model(x)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"best": min(wall), "median": statistics.median(wall), "cpu": statistics.median(cpu)}


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


def prune_to_flops(model: nn.Module, size: int, reduction: float) -> tuple[dict[str, torch.Tensor], Any]:
    """Masks removing the lowest-``weight_norm`` neurons until FLOPs fall by ``reduction``."""
    example = torch.zeros(1, 3, size, size)
    graph = build_dependency_graph(model, example)
    cost = CostModel(model, example, graph)
    scores = neuron_scores(graph, get_criterion("weight_norm").static_scores(graph))
    selector = NeuronSelector(graph, min_channels=1)
    everyone = torch.ones(graph.num_neurons, dtype=torch.bool)
    target = (1 - reduction) * cost.flops(everyone)

    def alive_after(count: int) -> torch.Tensor:
        alive = everyone.clone()
        alive[selector.select(scores, everyone, count)] = False
        return alive

    low, high = 0, graph.num_prunable  # binary search for the fewest removals reaching the target
    while low < high:
        mid = (low + high) // 2
        if cost.flops(alive_after(mid)) <= target:
            high = mid
        else:
            low = mid + 1
    alive = alive_after(low)
    return {name: alive[g.neurons] for name, g in graph.gates.items()}, graph


def run_case(name: str, build, size: int, reductions: list[float], reps: dict[int, int], train: bool) -> list[dict]:
    rows = []
    original = build().eval()
    base_flops, base_params = flops_per_image(original, size), params(original)
    base_latency = {b: latency(original, torch.randn(b, 3, size, size), *reps[b]) for b in reps}
    base_train = train_step_time(original, torch.randn(64, 3, size, size), 3) if train else None
    for reduction in reductions:
        model = build().eval()
        masks, graph = prune_to_flops(model, size, reduction)
        zeroer = NeuronMasks(graph)
        zeroer.update(~graph.alive_from_masks(masks))
        zeroer.zero_parameters()  # the masked model, as the callback leaves it
        small = compact(model, masks, graph=graph).eval()
        x = torch.randn(4, 3, size, size)
        with torch.inference_mode():
            diff = float((model(x) - small(x)).abs().max())
        row: dict[str, Any] = {
            "model": name,
            "input": f"{size}x{size}",
            "target_flops_reduction": reduction,
            "flops_original": base_flops,
            "flops_compact": flops_per_image(small, size),
            "params_original": base_params,
            "params_compact": params(small),
            "max_abs_diff_float32": diff,
        }
        row["flops_ratio"] = row["flops_original"] / row["flops_compact"]
        for b in reps:
            compact_latency = latency(small, torch.randn(b, 3, size, size), *reps[b])
            for stat in ("best", "median", "cpu"):
                suffix = "" if stat == "best" else f"_{stat}"
                row[f"latency_b{b}_original_ms{suffix}"] = 1e3 * base_latency[b][stat]
                row[f"latency_b{b}_compact_ms{suffix}"] = 1e3 * compact_latency[stat]
                row[f"speedup_b{b}{suffix}"] = base_latency[b][stat] / compact_latency[stat]
        row["speedup_b64_over_flops_ratio"] = row["speedup_b64"] / row["flops_ratio"]
        if train:
            masked_step = train_step_time(model, torch.randn(64, 3, size, size), 3, zeroer)
            compact_step = train_step_time(small, torch.randn(64, 3, size, size), 3)
            row["train_step_b64_original_ms"] = 1e3 * base_train
            row["train_step_b64_masked_ms"] = 1e3 * masked_step
            row["train_step_b64_compact_ms"] = 1e3 * compact_step
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (
    "| model | FLOPs cut (target) | GFLOPs orig -> compact | params (M) orig -> compact | FLOPs ratio "
    "| b1 ms orig -> compact | b1 speed-up | b64 ms orig -> compact | b64 speed-up | b64 speed-up / FLOPs ratio "
    "| b64 CPU-time speed-up | train step b64 ms masked -> compact |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: dict[str, Any]) -> str:
    train = (
        f"{r['train_step_b64_masked_ms']:.0f} -> {r['train_step_b64_compact_ms']:.0f}"
        if "train_step_b64_masked_ms" in r
        else "-"
    )
    cut = 1 - r["flops_compact"] / r["flops_original"]
    return (
        f"| {r['model']} ({r['input']}) | {cut:.1%} ({r['target_flops_reduction']:.0%}) "
        f"| {r['flops_original'] / 1e9:.3f} -> {r['flops_compact'] / 1e9:.3f} "
        f"| {r['params_original'] / 1e6:.2f} -> {r['params_compact'] / 1e6:.2f} | {r['flops_ratio']:.2f}x "
        f"| {r['latency_b1_original_ms']:.1f} -> {r['latency_b1_compact_ms']:.1f} | {r['speedup_b1']:.2f}x "
        f"| {r['latency_b64_original_ms']:.0f} -> {r['latency_b64_compact_ms']:.0f} | {r['speedup_b64']:.2f}x "
        f"| {r['speedup_b64_over_flops_ratio']:.2f} | {r['speedup_b64_cpu']:.2f}x | {train} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_at_start = os.getloadavg()
    print(f"threads {args.threads}, load average {load_at_start[0]:.1f} on {os.cpu_count()} cores", flush=True)

    pretrained = sorted((shared_data_dir() / "pretrained").glob("resnet56-*.th"))

    def resnet56() -> nn.Module:
        model = cifar_resnet56()
        if pretrained:
            load_cifar_resnet_weights(model, pretrained[0])
        return model

    def resnet50() -> nn.Module:
        torch.manual_seed(0)
        return torchvision.models.resnet50()

    quick = args.quick
    print(HEADER, flush=True)
    # (repeats, warm-up runs) per batch size
    rows = run_case("ResNet-56" + (" pretrained" if pretrained else ""), resnet56, 32, [0.3, 0.5],
                    {1: (10, 2) if quick else (50, 5), 64: (3, 1) if quick else (10, 2)}, train=True)  # fmt: skip
    rows += run_case("ResNet-50", resnet50, 224, [0.3, 0.5],
                     {1: (3, 1) if quick else (10, 2), 64: (1, 1) if quick else (3, 1)}, train=False)  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "criterion": "weight_norm",
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "note": "latency_*_ms: best wall-clock time over repeats after warm-up (_median: median; _cpu: median "
        "process CPU time, all threads); FLOPs per image from torch.utils.flop_counter",
    }
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
