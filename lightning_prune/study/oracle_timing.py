"""Time the oracle with and without activation reuse on a model and N images.

``python -m lightning_prune.study.oracle_timing resnet20 --images 1024`` times, for a few neurons of every
layer (neurons grouped by the first gated layer holding them), the oracle with the suffix re-run from
cached activations and with the whole network re-run, then extrapolates to every prunable neuron (each
layer's neurons cost what its sampled neurons cost). Times are CPU seconds of this process
(``time.process_time``, robust to other load on a shared machine; with one thread they equal wall-clock
seconds on an idle core). Writes JSON next to the printed summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_prune.importance.estimate import graph_for
from lightning_prune.oracle import oracle_importance
from lightning_prune.study.common import batches_of, build_model, load_split
from lightning_prune.study.correlation import home_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-layer", type=int, default=2, help="neurons timed per layer")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = build_model(a.model)
    batches = batches_of(load_split("cifar10", "train", a.images, 0), a.batch_size)
    graph = graph_for(model, batches[0])
    groups = home_layers(graph)
    rows = []
    bases = []
    for layer, neurons in groups.items():
        n = [int(v) for v in neurons[: a.per_layer]]
        times = {}
        # every call runs the network once (the base loss) besides the removals: time that part alone too
        t = time.process_time()
        oracle_importance(model, batches, graph=graph, neurons=[])
        base = time.process_time() - t
        bases.append(base)
        for reuse in (True, False):
            t = time.process_time()
            oracle_importance(model, batches, graph=graph, neurons=n, reuse_activations=reuse)
            times[reuse] = (time.process_time() - t - base) / len(n)
        rows.append({"layer": layer, "neurons": int(neurons.numel()), "sampled": len(n), "base_s": base,
                     "reuse_s_per_neuron": times[True], "full_s_per_neuron": times[False]})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    base = sum(bases) / len(bases)
    est_reuse = base + sum(r["neurons"] * max(r["reuse_s_per_neuron"], 0.0) for r in rows)
    est_full = base + sum(r["neurons"] * max(r["full_s_per_neuron"], 0.0) for r in rows)
    summary = {"model": a.model, "images": a.images, "neurons": int(graph.num_prunable), "threads": a.threads,
               "base_forward_s": base, "estimated_oracle_reuse_s": est_reuse, "estimated_oracle_full_s": est_full,
               "speedup": est_full / est_reuse if est_reuse > 0 else None, "layers": rows}  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "layers"}), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
