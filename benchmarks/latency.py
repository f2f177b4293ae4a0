"""Latency-targeted against FLOPs-targeted iterative Taylor pruning, on this CPU (issue 13).

Networks: CIFAR ResNet-56 (the shared pretrained weights, 32x32 input; importance from 512 training
images, top-1 on 2,000 test JPEGs without fine-tuning) and torchvision ResNet-50 (224x224 input, random
weights, nothing downloaded; importance from synthetic random batches, no accuracy).

Both arms run ``--steps`` (5) iterative steps of ``taylor_fo_bn`` importance (ResNet-56: on
``--importance-batches`` (2) batches of 64 training images; ResNet-50: ``--r50-images`` random images;
re-estimated on the masked network after each step, removed neurons zeroed) and end compacted
(``lightning_prune.compact``):

* ``flops``: at step ``s`` the fewest lowest-scoring neurons go for the FLOPs to fall to
  ``1 - (1 - target) s / steps`` of the full network's: the FLOPs ratio ends at the target;
* ``latency``: at step ``s`` ``LatencySelector`` keeps the most important neurons whose latency the
  table (``LatencyTable`` at the batch size of the row) predicts at most ``1 - (1 - target) s / steps``
  of the full network's latency (measured when the table is built): the predicted latency ratio ends
  at the target. One network per batch size (the table is per batch size). With ``--calibrate`` the
  table is first calibrated (``LatencyTable.calibrated``) on the measured full network and one
  compacted to half width, and the budget is a fraction of the measured full latency.
  Then, as the callback's ``latency_feedback`` (``--feedback`` rounds, 0: none): after each step whose
  prediction falls halfway from the last measurement to the target, the compact network and the masked
  full-width one are timed in turn and, if the compact one is faster than predicted, the table is
  calibrated on both; after the last step they are timed
  again and, more than 2% above the target, the table is calibrated on both and one more step removes
  neurons under it.

Each compacted network is measured: eager latency (median of ``--repeats`` runs after warm-up, in
``torch.inference_mode``), the same after ``torch.jit.optimize_for_inference(torch.jit.script(model))``
(``trace`` when scripting fails; the error is recorded when both do), FLOPs of one image
(``torch.utils.flop_counter``, a multiply-add counts 2). The FLOPs arm's network is measured at both
batch sizes, each latency arm's at its own. The full network is measured before and after the arms
(their mean is the reference for the milliseconds). Latency ratios are paired: each network and the full
one are timed in turn ``--rounds`` (5) times and the median of the rounds' ratios is reported, so that a
change of the machine's load during the run does not enter them. ``speedup / flops reduction`` = (full
latency / latency) / (full FLOPs / FLOPs).

``--channels-last``: the networks, their inputs and the table in ``torch.channels_last`` (rows marked
``"memory_format": "channels_last"``); on this CPU oneDNN runs narrow convolutions faster so.

``--check`` instead compares the table's prediction with the measured latency of compacted networks
at random widths (every gated layer keeps a uniform random fraction in [0.25, 1] of its channels).

    python benchmarks/latency.py [--models resnet56 resnet50] [--batches 1 64] [--targets 0.7 0.5]
    python benchmarks/latency.py --check [--models resnet56] [--masks 6]

Writes ``benchmarks/results/latency.json`` (rows merged by key) and prints a Markdown table.
Timings on a CPU shared with other jobs: run with ``--threads 1`` (the default), since an intra-op
thread waiting for a busy core stretches every op to a scheduler time slice. Run it with glibc keeping
freed memory (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1000000000000 python benchmarks/latency.py
...``; each row records ``allocator``): under the default every forward page-faults its activations in
again, which makes timings slow and noisy (``lightning_prune.latency.allocator``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune import LatencySelector, LatencyTable, build_dependency_graph, compact, estimate_importance
from lightning_prune.compaction import masks_from_alive
from lightning_prune.latency.allocator import KEEP_FREED_MEMORY, cpu_allocator
from lightning_prune.importance import apply_alive
from lightning_prune.pruner import CostModel, NeuronSelector, fewest_reaching

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"


# ----------------------------------------------------------------------------- networks
class Net:
    """A network of the benchmark: how to build it, its input size and its importance batches."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.size = 32 if name == "resnet56" else 224
        self.example = torch.zeros(1, 3, self.size, self.size)
        self.width_step = args.width_step or (8 if name == "resnet56" else 32)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self._batches: list[Any] | None = None
        self._test = None

    def build(self) -> nn.Module:
        if self.name == "resnet56":
            from vs_torch_pruning import pretrained

            return pretrained()
        torch.manual_seed(0)
        return torchvision.models.resnet50().eval()

    def batches(self) -> list[Any]:
        if self._batches is None:
            if self.name == "resnet56":
                from vs_torch_pruning import calibration_batches

                self._batches = calibration_batches(0)[: self.args.importance_batches]
            else:
                g = torch.Generator().manual_seed(0)
                self._batches = [
                    (torch.randn(self.args.r50_images, 3, 224, 224, generator=g),
                     torch.randint(0, 1000, (self.args.r50_images,), generator=g))
                ]  # fmt: skip
        return self._batches

    def top1(self, model: nn.Module) -> float | None:
        if self.name != "resnet56" or self.args.no_accuracy:
            return None
        from vs_torch_pruning import top1

        if self._test is None:
            from lightning_prune.data import cifar10_jpeg_archive, load_cifar10_jpeg_subset

            self._test = load_cifar10_jpeg_subset(cifar10_jpeg_archive(), "test", per_class=200)
        return round(top1(model, self._test), 2)

    @property
    def format_key(self) -> dict[str, str]:
        """What a row records of the memory format: nothing for the default (rows of earlier runs match)."""
        return {"memory_format": "channels_last"} if self.args.channels_last else {}

    def input(self, batch: int) -> torch.Tensor:
        """A random batch in the benchmark's memory format."""
        return torch.randn(batch, 3, self.size, self.size).contiguous(memory_format=self.memory_format)

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` in eval mode and the benchmark's memory format (in place)."""
        return model.eval().to(memory_format=self.memory_format)

    def repeats(self, batch: int) -> int:
        if self.name == "resnet50" and batch > 8:
            return self.args.r50_repeats_large
        return self.args.repeats

    def table(self, model: nn.Module, graph, batch: int) -> LatencyTable:
        start = time.perf_counter()
        table = LatencyTable.build(model, self.example, graph, batch_size=batch, width_step=self.width_step,
                                   memory_format=self.memory_format, warmup=2, repeats=min(self.repeats(batch), 10),
                                   cache_dir=self.args.cache_dir, progress=True)  # fmt: skip
        print(f"  table {self.name} batch {batch}: {table.measurements} timings taken "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        return table


# ----------------------------------------------------------------------------- measurements
def median_seconds(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, repeats: int, warmup: int = 2) -> float:
    times = []
    with torch.inference_mode():
        for run in range(warmup + repeats):
            start = time.perf_counter()
            fn(x)
            if run >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def jit_optimized(model: nn.Module, x: torch.Tensor) -> tuple[Any, str | None]:
    """``torch.jit.optimize_for_inference`` of the scripted (else traced) model, and the error if both fail."""
    errors = []
    for how in ("script", "trace"):
        try:
            with torch.no_grad():
                module = torch.jit.script(model.eval()) if how == "script" else torch.jit.trace(model.eval(), x)
                return torch.jit.optimize_for_inference(module), None
        except Exception as err:  # noqa: BLE001 - any failure is recorded
            errors.append(f"{how}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return None, "; ".join(errors)


def flops(model: nn.Module, size: int) -> float:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def measure(model: nn.Module, net: Net, batch: int) -> dict[str, Any]:
    """Eager and ``optimize_for_inference`` latency at ``batch`` (seconds)."""
    x = net.input(batch)
    repeats = net.repeats(batch)
    result: dict[str, Any] = {"eager": median_seconds(net.place(model), x, repeats)}
    optimized, error = jit_optimized(model, x)
    result["jit"] = median_seconds(optimized, x, repeats) if optimized is not None else None
    if error is not None:
        result["jit_error"] = error
    return result


def paired_ratios(model: nn.Module, base: nn.Module, net: Net, batch: int) -> dict[str, float | None]:
    """Latency of ``model`` over that of the full network ``base``, eager and ``optimize_for_inference``: both
    timed in turn ``--rounds`` times, the median of the rounds' ratios (a change of the machine's load
    between the rounds affects both alike)."""
    x, model, base = net.input(batch), net.place(model), net.place(base)
    repeats = net.repeats(batch)
    ratios: dict[str, float | None] = {}
    for mode in ("eager", "jit"):
        pair = [model, base] if mode == "eager" else [jit_optimized(m, x)[0] for m in (model, base)]
        if any(m is None for m in pair):
            ratios[mode] = None
            continue
        rounds = [median_seconds(pair[0], x, repeats) / median_seconds(pair[1], x, repeats)
                  for _ in range(net.args.rounds)]  # fmt: skip
        ratios[mode] = statistics.median(rounds)
    return ratios


# ----------------------------------------------------------------------------- pruning
def iterative_prune(net: Net, arm: str, target: float, table: LatencyTable | None) -> tuple[nn.Module, dict]:
    """The compacted network of ``arm`` (``flops`` or ``latency``) at ``target``, and what the models predicted."""
    model = net.build()
    graph = build_dependency_graph(model, net.example)
    cost = CostModel(model, net.example, graph)
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    full_flops = cost.flops(alive)
    selector = NeuronSelector(graph)
    latency_selector = LatencySelector(graph, table) if arm == "latency" else None
    full_predicted = table.predict(alive) if table is not None else None
    info: dict[str, Any] = {}
    steps = net.args.steps
    for step in range(1, steps + 1):
        fraction = 1 - (1 - target) * step / steps
        scores = estimate_importance(model, net.batches(), "taylor_fo_bn", graph=graph, alive=alive).neurons
        if arm == "flops":
            goal = fraction * full_flops
            if cost.flops(alive) <= goal:
                continue
            chosen = selector.select(torch.nan_to_num(scores, nan=float("inf")), alive, graph.num_prunable)

            def flops_after(count: int, chosen: torch.Tensor = chosen) -> float:
                left = alive.clone()
                left[chosen[:count]] = False
                return cost.flops(left)

            alive = alive.clone()
            alive[chosen[: fewest_reaching(flops_after, chosen.numel(), goal)]] = False
        else:
            alive = latency_selector.select(torch.nan_to_num(scores, nan=0.0), alive, fraction * full_predicted)
        apply_alive(graph, alive)
        if arm == "latency":
            approach = info.setdefault("approach_measured_ratios", [])
            halfway = target + (1 - target) / 2 ** (len(approach) + 1)  # from the last measurement to the target
            predicted = table.predict(alive) / full_predicted
            if len(approach) < net.args.feedback and target < predicted <= halfway:
                calibrated, ratio = calibrate_on(net, model, graph, alive, table)
                approach.append(ratio)
                if ratio < predicted:  # faster than predicted; slower is left to the feedback at the target
                    table, latency_selector = calibrated, LatencySelector(graph, calibrated)
                    full_predicted = table.predict(torch.ones_like(alive))
    if arm == "latency" and net.args.feedback:
        alive, table, more = feedback(net, model, graph, alive, table, target)
        info.update(more)
        full_predicted = table.predict(torch.ones_like(alive))
    compacted = compact(model, masks_from_alive(graph, alive), graph=graph).eval()
    info["flops_model_ratio"] = round(cost.flops(alive) / full_flops, 4)
    if table is not None:
        info["predicted_latency_ratio"] = round(table.predict(alive) / full_predicted, 4)
    return compacted, info


def measured_pair(net: Net, model: nn.Module, graph, alive: torch.Tensor, table: LatencyTable) -> list[float]:
    """Seconds of the masked full-width ``model`` and of it compacted to ``alive``, timed in turn as the
    callback times them (``LatencyTable.measure``)."""
    small = compact(model, masks_from_alive(graph, alive), graph=graph).eval()
    return table.measure([model, small], net.example, repeats=net.repeats(table.env["batch"]))


def calibrate_on(net: Net, model: nn.Module, graph, alive: torch.Tensor,
                 table: LatencyTable) -> tuple[LatencyTable, float]:  # fmt: skip
    """The callback's measurement on the way: ``table`` calibrated on the compact network at ``alive`` and the
    masked full-width one, timed in turn; and their measured ratio (the caller keeps the calibration only
    when the compact network is faster than predicted)."""
    full_s, small_s = measured_pair(net, model, graph, alive, table)
    print(f"  on the way {net.name} batch {table.env['batch']}: measured ratio {small_s / full_s:.4f}, predicted "
          f"{table.predict(alive) / table.predict(torch.ones_like(alive)):.4f}", flush=True)  # fmt: skip
    return table.calibrated(alive, small_s, full_s), round(small_s / full_s, 4)


def feedback(net: Net, model: nn.Module, graph, alive: torch.Tensor, table: LatencyTable,
             target: float) -> tuple[torch.Tensor, LatencyTable, dict]:  # fmt: skip
    """The callback's ``latency_feedback``: time the compact and the masked full-width network in turn
    (``LatencyTable.measure``); while the measured ratio is more than 2% above ``target`` (at most
    ``--feedback`` times), calibrate the table on both and remove more under it (one more importance estimate
    and knapsack)."""
    batch = table.env["batch"]
    rounds = []
    for _ in range(net.args.feedback):
        full_s, small_s = measured_pair(net, model, graph, alive, table)
        rounds.append(round(small_s / full_s, 4))
        if small_s <= (target + 0.02) * full_s:
            break
        table = table.calibrated(alive, small_s, full_s)
        scores = estimate_importance(model, net.batches(), "taylor_fo_bn", graph=graph, alive=alive).neurons
        budget = target * table.predict(torch.ones_like(alive))
        alive = LatencySelector(graph, table).select(torch.nan_to_num(scores, nan=0.0), alive, budget)
        apply_alive(graph, alive)
    print(f"  feedback {net.name} batch {batch}: measured ratios {rounds}", flush=True)
    return alive, table, {"feedback_measured_ratios": rounds}


# ----------------------------------------------------------------------------- the check
def random_alive(graph, generator: torch.Generator, low: float = 0.25, high: float = 1.0) -> torch.Tensor:
    """Every gated layer keeps a uniform random fraction in [``low``, ``high``] of its prunable channels (at
    least one), drawn at the first gate of each set of tied neurons (a residual stream: its first gate
    decides it)."""
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    decided = torch.zeros(graph.num_neurons, dtype=torch.bool)
    for gate in graph.gates.values():
        neurons = gate.neurons[graph.prunable[gate.neurons] & ~decided[gate.neurons]].unique()
        if not neurons.numel():
            continue
        fraction = low + (high - low) * float(torch.rand((), generator=generator))
        keep = max(1, round(fraction * neurons.numel()))
        order = torch.randperm(neurons.numel(), generator=generator)
        alive[neurons[order[keep:]]] = False
        decided[neurons] = True
    return alive


def calibrate(net: Net, model: nn.Module, graph, table: LatencyTable, batch: int, full_ms: float) -> LatencyTable:
    """``table`` calibrated on the full network (``full_ms`` measured) and one compacted at half width."""
    half = random_alive(graph, torch.Generator().manual_seed(12345), 0.5, 0.5)
    compacted = compact(model, masks_from_alive(graph, half), graph=graph).eval()
    measured = median_seconds(net.place(compacted), net.input(batch), net.repeats(batch))
    calibrated = table.calibrated(half, measured, full_ms / 1e3)
    print(f"  calibration {net.name} batch {batch}: {calibrated.env['calibration']} (half width: predicted "
          f"{1e3 * table.predict(half):.2f} ms, measured {1e3 * measured:.2f} ms)", flush=True)  # fmt: skip
    return calibrated


def check(net: Net, batch: int, masks: int) -> list[dict]:
    """Predicted against measured latency of the full network and ``masks`` random compacted ones, raw
    and calibrated (on the full network and a half-width one, not among the random ones)."""
    model = net.build()
    graph = build_dependency_graph(model, net.example)
    table = net.table(model, graph, batch)
    full = torch.ones(graph.num_neurons, dtype=torch.bool)
    x = net.input(batch)
    full_ms = 1e3 * median_seconds(net.place(model), x, net.repeats(batch))
    calibrated = calibrate(net, model, graph, table, batch, full_ms)
    generator = torch.Generator().manual_seed(batch)
    rows = []
    for index in range(masks + 1):
        alive = full if index == 0 else random_alive(graph, generator)
        compacted = compact(model, masks_from_alive(graph, alive), graph=graph).eval()
        measured = full_ms / 1e3 if index == 0 else median_seconds(net.place(compacted), x, net.repeats(batch))
        predicted, fitted = table.predict(alive), calibrated.predict(alive)
        row = {"kind": "check", "net": net.name, "batch": batch, "mask": index, **net.format_key,
               "flops_ratio": round(flops(compacted, net.size) / flops(model, net.size), 4),
               "measured_ms": round(1e3 * measured, 3), "predicted_ms": round(1e3 * predicted, 3),
               "predicted_over_measured": round(predicted / measured, 3),
               "calibrated_ms": round(1e3 * fitted, 3), "calibrated_over_measured": round(fitted / measured, 3),
               "calibration": calibrated.env["calibration"]}  # fmt: skip
        print(f"| {net.name} | {batch} | {index} | {row['flops_ratio']:.3f} | {row['measured_ms']:.2f} | "
              f"{row['predicted_ms']:.2f} | {row['predicted_over_measured']:.3f} | {row['calibrated_ms']:.2f} | "
              f"{row['calibrated_over_measured']:.3f} |", flush=True)  # fmt: skip
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the benchmark
def bench(net: Net, batches: list[int], targets: list[float]) -> list[dict]:
    base = net.build()
    base_flops = flops(base, net.size)
    base_top1 = net.top1(base)
    graph = build_dependency_graph(base, net.example)
    print(f"  {net.name}: {base_flops / 1e6:.1f} MFLOPs, top-1 {base_top1}", flush=True)
    reference = {b: measure(base, net, b) for b in batches}
    tables = {b: net.table(base, graph, b) for b in batches}
    if net.args.calibrate:
        tables = {b: calibrate(net, base, graph, t, b, 1e3 * reference[b]["eager"]) for b, t in tables.items()}
    networks = []  # (arm, target, table batch or None, model, info, seconds)
    for target in targets:
        for arm, table_batch in [("flops", None)] + [("latency", b) for b in batches]:
            start = time.perf_counter()
            model, info = iterative_prune(net, arm, target, tables.get(table_batch))
            networks.append((arm, target, table_batch, model, info, time.perf_counter() - start))
            print(f"  pruned {net.name} {arm} {target} (table batch {table_batch}): {info} "
                  f"({networks[-1][-1]:.0f} s)", flush=True)  # fmt: skip
    rows = []
    for arm, target, table_batch, model, info, seconds in networks:
        model_flops = flops(model, net.size)
        accuracy = net.top1(model)
        for batch in [table_batch] if table_batch is not None else batches:
            latency = measure(model, net, batch)
            paired = paired_ratios(model, base, net, batch)
            rows.append({"kind": "bench", "net": net.name, "arm": arm, "target": target, "batch": batch,
                         **net.format_key, "threads": torch.get_num_threads(), "allocator": cpu_allocator(),
                         "flops_ratio": round(model_flops / base_flops, 4), **info,
                         "eager_ms": round(1e3 * latency["eager"], 3),
                         "jit_ms": None if latency["jit"] is None else round(1e3 * latency["jit"], 3),
                         **({"jit_error": latency["jit_error"]} if "jit_error" in latency else {}),
                         "top1": accuracy, "prune_seconds": round(seconds, 1),
                         **{f"{mode}_latency_ratio_paired": None if r is None else round(r, 4)
                            for mode, r in paired.items()},
                         **({"calibrated": net.args.calibrate} if arm == "latency" else {})})  # fmt: skip
    again = {b: measure(base, net, b) for b in batches}
    for b in batches:
        full = {mode: statistics.mean([reference[b][mode], again[b][mode]]) if reference[b][mode] else None
                for mode in ("eager", "jit")}  # fmt: skip
        rows.insert(0, {"kind": "bench", "net": net.name, "arm": "full", "target": 1.0, "batch": b, **net.format_key,
                        "threads": torch.get_num_threads(), "allocator": cpu_allocator(),
                        "flops_ratio": 1.0, "eager_ms": round(1e3 * full["eager"], 3),
                        "eager_ms_before_after": [round(1e3 * reference[b]["eager"], 3),
                                                  round(1e3 * again[b]["eager"], 3)],
                        "jit_ms": None if full["jit"] is None else round(1e3 * full["jit"], 3),
                        "top1": base_top1, "predicted_full_ms": round(1e3 * tables[b].predict(
                            torch.ones(graph.num_neurons, dtype=torch.bool)), 3)})  # fmt: skip
    for row in rows:
        full = next(r for r in rows if r["arm"] == "full" and r["batch"] == row["batch"])  # same format
        for mode in ("eager", "jit"):
            if row[f"{mode}_ms"] and full[f"{mode}_ms"]:
                ratio = row.get(f"{mode}_latency_ratio_paired") or row[f"{mode}_ms"] / full[f"{mode}_ms"]
                row[f"{mode}_latency_ratio"] = round(ratio, 4)
                row[f"{mode}_speedup_over_flops_reduction"] = round(row["flops_ratio"] / ratio, 3)
    return rows


HEADER = ("| net | arm | target | batch | FLOPs ratio | predicted latency ratio | eager latency ratio | "
          "eager speedup ÷ FLOPs red. | jit latency ratio | jit speedup ÷ FLOPs red. | top-1 |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip


def markdown(row: dict) -> str:
    def f(key: str, digits: int = 3) -> str:
        value = row.get(key)
        return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    arm = row["arm"] + (" (calibrated)" if row.get("calibrated") else "")
    arm += ", channels_last" if row.get("memory_format") else ""
    return (f"| {row['net']} | {arm} | {row['target']} | {row['batch']} | {f('flops_ratio')} | "
            f"{f('predicted_latency_ratio')} | {f('eager_latency_ratio')} | "
            f"{f('eager_speedup_over_flops_reduction', 2)} | {f('jit_latency_ratio')} | "
            f"{f('jit_speedup_over_flops_reduction', 2)} | {f('top1', 2)} |")  # fmt: skip


def save(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    """Merge ``rows`` into the JSON: rows of the same kind, network, arm, target and batch are replaced."""

    def key(r: dict) -> tuple:
        return (r["kind"], r["net"], r.get("arm"), r.get("target"), r["batch"], r.get("mask"), r.get("calibrated"),
                r.get("memory_format"))

    previous = json.loads(path.read_text())["rows"] if path.is_file() else []
    keys = {key(r) for r in rows}
    load = os.getloadavg()
    meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
            "allocator": cpu_allocator(),
            "cpus": os.cpu_count(), "load_average_at_end": [round(v, 2) for v in load],
            "steps": args.steps, "repeats": args.repeats, "rounds": args.rounds, "calibrate": args.calibrate,
            "importance_batches": args.importance_batches, "r50_repeats_large": args.r50_repeats_large,
            "note": "latencies are medians in ms; ratios against the full network at the same batch and mode; "
                    "FLOPs of one image from torch.utils.flop_counter; top-1 on 2,000 CIFAR-10 test JPEGs "
                    "without fine-tuning"}  # fmt: skip
    rows = [r for r in previous if key(r) not in keys] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("resnet56", "resnet50"), default=["resnet56", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5])
    parser.add_argument("--steps", type=int, default=5, help="iterative pruning steps")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per latency")
    parser.add_argument("--r50-repeats-large", type=int, default=3, help="timed runs of ResNet-50 at batch > 8")
    parser.add_argument("--r50-images", type=int, default=8, help="synthetic images for ResNet-50 importance")
    parser.add_argument("--importance-batches", type=int, default=2, help="ResNet-56 batches of 64 for importance")
    parser.add_argument("--calibrate", action="store_true",
                        help="latency arm: the table calibrated on the full and a half-width network (default: raw)")
    parser.add_argument("--width-step", type=int, default=None, help="table step (default 8; ResNet-50: 32)")
    parser.add_argument("--feedback", type=int, default=3,
                        help="latency arm: measured-latency feedback rounds, as the callback's latency_feedback")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds of each network and the full one")
    parser.add_argument("--channels-last", action="store_true",
                        help="networks, inputs and the table in torch.channels_last (default: contiguous)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--check", action="store_true", help="predicted against measured latency only")
    parser.add_argument("--masks", type=int, default=6, help="random masks of --check")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[dict] = []
    print(f"threads {torch.get_num_threads()}, allocator {cpu_allocator()}, load average {os.getloadavg()}",
          flush=True)  # fmt: skip
    if cpu_allocator() == "default":
        print(f"  (under glibc's default malloc: slower, noisier timings; run with {KEEP_FREED_MEMORY})", flush=True)
    for name in args.models:
        net = Net(name, args)
        for batch in args.batches if args.check else [None]:
            if args.check:
                print("| net | batch | mask | FLOPs ratio | measured ms | predicted ms | predicted / measured | "
                      "calibrated ms | calibrated / measured |\n|---|---|---|---|---|---|---|---|---|", flush=True)
                rows += check(net, batch, args.masks)
            else:
                new = bench(net, args.batches, args.targets)
                print(HEADER)
                for row in new:
                    print(markdown(row))
                rows += new
            save(args.output, rows, args)


if __name__ == "__main__":
    main()
