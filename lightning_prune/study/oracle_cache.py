"""The oracle of a study's model and data, cached on disk (the expensive part of a correlation study)."""

from __future__ import annotations

import dataclasses
from typing import Any

from lightning_prune.importance.estimate import graph_for
from lightning_prune.oracle import oracle_importance
from lightning_prune.study.common import batches_of, build_model, cached, load_split


def oracle_key(model: str, dataset: str, split: str, images: int, seed: int, placement: str) -> dict[str, Any]:
    return {"model": model, "dataset": dataset, "split": split, "images": images, "seed": seed,
            "placement": placement}  # fmt: skip


def cached_oracle(model_name: str, dataset: str, split: str, images: int, seed: int, batch_size: int,
                  placement: str = "after_bn", use_cache: bool = True, model=None) -> dict[str, Any]:  # fmt: skip
    def compute() -> dict[str, Any]:
        model_ = model if model is not None else build_model(model_name, seed)
        batches = batches_of(load_split(dataset, split, images, seed), batch_size)
        graph = graph_for(model_, batches[0], placement=placement)
        scores = oracle_importance(model_, batches, graph=graph)
        return dataclasses.asdict(scores)

    return cached("oracle", oracle_key(model_name, dataset, split, images, seed, placement), compute, use_cache)


if __name__ == "__main__":
    import argparse
    import json

    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    r = cached_oracle(a.model, "cifar10", "train", a.images, a.seed, a.batch_size)
    print(json.dumps({k: v for k, v in r.items() if k not in ("signed", "squared")}))
