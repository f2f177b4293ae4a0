"""The pipeline behind ``lightning-prune``: build, evaluate, (train/adapt), prune, fine-tune, compact.

Every stage is a Lightning ``Trainer`` run configured by the composed Hydra config; results go to the
run directory: ``metrics.json``, ``pruning_history.{csv,json}``, ``pruning_curve.csv``, PNG plots and
``compact_model.pt`` (when :mod:`lightning_prune.compaction` is available).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune.app.lightning_module import ClassificationModule
from lightning_prune.callbacks import TaylorPruningCallback

log = logging.getLogger("lightning_prune")

METRICS_JSON = "metrics.json"
CURVE_CSV = "pruning_curve.csv"
COMPACT_FILE = "compact_model.pt"


class StopWhenPruned(Callback):
    """Ends the pruning stage as soon as the pruning callback has reached its target."""

    def __init__(self, pruning: TaylorPruningCallback) -> None:
        self.pruning = pruning

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.pruning.done:
            trainer.should_stop = True


class PruningCurve(Callback):
    """Validation accuracy and loss on a few fixed batches, measured every ``every`` pruning steps."""

    def __init__(self, pruning: TaylorPruningCallback, batches: list, every: int = 1) -> None:
        self.pruning, self.batches, self.every = pruning, batches, max(1, every)
        self.rows: list[dict[str, Any]] = []
        self._seen = 0

    @torch.no_grad()
    def _probe(self, pl_module: ClassificationModule) -> tuple[float, float]:
        training = pl_module.training
        pl_module.eval()
        correct, total, loss_sum = 0, 0, 0.0
        for x, y in self.batches:
            x, y = x.to(pl_module.device), y.to(pl_module.device)
            logits = pl_module(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += y.numel()
        pl_module.train(training)
        return correct / max(total, 1), loss_sum / max(total, 1)

    def _record(self, trainer: pl.Trainer, pl_module: ClassificationModule) -> None:
        p = self.pruning
        last = p.history[-1] if p.history else None
        top1, loss = self._probe(pl_module)
        self.rows.append({
            "step": trainer.global_step,
            "neurons_pruned": p.num_pruned,
            "neurons_remaining": p.neurons_remaining,
            "flops": last.flops if last else p.initial_flops,
            "params": last.params if last else p.initial_params,
            "train_loss": last.loss if last else None,
            "val_top1": top1,
            "val_loss": loss,
        })  # fmt: skip

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruning.graph is not None and not self.rows:
            self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        n = len(self.pruning.history)
        if n == self._seen:
            return
        self._seen = n
        if n % self.every == 0 or self.pruning.done:
            self._record(trainer, pl_module)


def measure_cost(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, int]:
    """(FLOPs per example as ``torch.utils.flop_counter`` counts them, parameter count) of ``model``."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(training)
    return counter.get_total_flops() / 2, sum(p.numel() for p in model.parameters())


def _stage_runs(stage: DictConfig | None) -> bool:
    if stage is None or not stage.get("enabled", True):
        return False
    max_steps = stage.get("max_steps", -1)
    max_epochs = stage.get("max_epochs", 0)
    return (max_steps is not None and max_steps > 0) or (max_steps in (-1, None) and (max_epochs or 0) > 0)


def _trainer_kwargs(stage: DictConfig | None) -> dict[str, Any]:
    if stage is None:
        return {}
    kwargs = OmegaConf.to_container(stage, resolve=True)
    kwargs.pop("enabled", None)
    return {k: v for k, v in kwargs.items() if v is not None}


class Pipeline:
    """One run of a recipe. ``run()`` executes the stages and returns the metrics dict."""

    def __init__(self, cfg: DictConfig, output_dir: str | Path) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.metrics: dict[str, Any] = {"recipe": cfg.get("name"), "stages": {}}
        self.pruning: TaylorPruningCallback | None = None
        self.curve: PruningCurve | None = None
        self.compact_model: nn.Module | None = None
        self._start = time.time()

    # -- building --------------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        pl.seed_everything(cfg.seed, workers=True)
        self.datamodule = instantiate(cfg.data)
        if hasattr(self.datamodule, "check"):
            self.datamodule.check()  # missing data: a clear error before anything is built
        model = instantiate(cfg.model)
        scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
        self.module = ClassificationModule(
            model,
            optimizer=instantiate(cfg.optimizer),
            scheduler=scheduler,
            loss=instantiate(cfg.loss) if cfg.get("loss") else None,
            num_classes=self.datamodule.num_classes,
            input_shape=self.datamodule.input_shape,
            scheduler_interval=cfg.module.scheduler_interval,
        )
        world = self._trainer("probe-world-size", fit=False).world_size
        per_device = self.datamodule.set_world_size(world)
        self.metrics.update({
            "model": cfg.model.get("_target_"),
            "data": cfg.data.get("_target_"),
            "criterion": cfg.pruning.criterion if cfg.pruning.enabled else None,
            "seed": cfg.seed,
            "world_size": world,
            "batch_size": self.datamodule.batch_size,
            "per_device_batch_size": per_device,
        })  # fmt: skip

    def _trainer(self, stage: str, fit: bool, callbacks: list[Callback] | None = None, **kwargs: Any) -> pl.Trainer:
        trainer_cfg = OmegaConf.to_container(self.cfg.trainer, resolve=True)
        trainer_cfg.update(kwargs)
        logger = CSVLogger(self.output_dir, name="logs", version=stage) if fit else False
        return pl.Trainer(default_root_dir=self.output_dir, logger=logger, callbacks=callbacks or [], **trainer_cfg)

    # -- stages ----------------------------------------------------------------------------------------------
    def evaluate(self, stage: str, module: ClassificationModule | None = None, cost: tuple[float, int] | None = None) -> dict:
        module = module or self.module
        ev = self.cfg.stages.evaluate
        start = time.time()
        trainer = self._trainer(f"eval-{stage}", fit=False, limit_val_batches=ev.get("limit_batches") or 1.0)
        results = trainer.validate(module, datamodule=self.datamodule, verbose=False)[0]
        flops, params = cost if cost is not None else self._cost(module)
        record = {
            "top1": float(results["val/top1"]),
            "top5": float(results["val/top5"]) if "val/top5" in results else None,
            "loss": float(results["val/loss"]),
            "flops": flops,
            "params": params,
            **self._neurons(),
            "eval_time_s": round(time.time() - start, 2),
            "elapsed_s": round(time.time() - self._start, 2),
        }
        self.metrics["stages"][stage] = record
        log.info("%s: top-1 %.4f, loss %.4f, %.4g FLOPs, %d parameters", stage, record["top1"], record["loss"],
                 flops, params)  # fmt: skip
        return record

    def _cost(self, module: ClassificationModule) -> tuple[float, int]:
        p = self.pruning
        if p is not None and p.history:
            return p.history[-1].flops, p.history[-1].params
        return measure_cost(module.model, tuple(self.datamodule.input_shape))

    def _neurons(self) -> dict[str, Any]:
        p = self.pruning
        if p is None or p.graph is None:
            return {"neurons_kept": None, "neurons_kept_ratio": 1.0}
        total = p.graph.num_prunable
        return {"neurons_kept": p.neurons_remaining, "neurons_kept_ratio": p.neurons_remaining / total}

    def fit(self, stage: str, stage_cfg: DictConfig, callbacks: list[Callback]) -> float:
        start = time.time()
        trainer = self._trainer(stage, fit=True, callbacks=callbacks, **_trainer_kwargs(stage_cfg))
        trainer.fit(self.module, datamodule=self.datamodule)
        elapsed = time.time() - start
        self.metrics.setdefault("fit_time_s", {})[stage] = round(elapsed, 2)
        self.metrics.setdefault("fit_steps", {})[stage] = trainer.global_step
        return elapsed

    def make_pruning_callback(self) -> TaylorPruningCallback:
        p = OmegaConf.to_container(self.cfg.pruning, resolve=True)
        p.pop("enabled", None)
        p.pop("curve", None)
        p.setdefault("history_dir", str(self.output_dir))
        if p.get("history_dir") is None:
            p["history_dir"] = str(self.output_dir)
        p.setdefault("example_input", self.module.example_input_array)
        if p.get("criterion") == "random":  # the run's seed draws the random ranking unless given
            p["criterion_kwargs"] = {"seed": self.cfg.seed, **(p.get("criterion_kwargs") or {})}
        return TaylorPruningCallback(module_name="model", **p)

    def _probe_batches(self) -> list:
        """``pruning.curve.samples`` validation examples drawn at random (seeded, so every class is
        represented even when the validation set is sorted by class), for the accuracy-while-pruning curve."""
        n = self.cfg.pruning.get("curve", {}).get("samples", 256)
        if not n:
            return []
        dataset = self.datamodule.val_set
        if dataset is None:
            self.datamodule.setup("validate")
            dataset = self.datamodule.val_set
        generator = torch.Generator().manual_seed(self.cfg.seed)
        indices = torch.randperm(len(dataset), generator=generator)[:n].tolist()
        batch = self.datamodule.eval_batch_size or self.datamodule.per_device_batch_size
        loader = DataLoader(Subset(dataset, indices), batch_size=batch, shuffle=False)
        return list(loader)

    def prune(self) -> None:
        cfg = self.cfg
        self.pruning = self.make_pruning_callback()
        curve_cfg = cfg.pruning.get("curve", {})
        batches = self._probe_batches()
        self.curve = PruningCurve(self.pruning, batches, every=curve_cfg.get("every", 1)) if batches else None
        callbacks = [self.pruning, *([self.curve] if self.curve else []), StopWhenPruned(self.pruning)]
        self.fit("prune", cfg.stages.prune, callbacks)
        p = self.pruning
        self.metrics["pruning"] = {
            "criterion": p.criterion.name,
            "neurons_prunable": p.graph.num_prunable if p.graph is not None else None,
            "neurons_pruned": p.num_pruned,
            "pruning_steps": len(p.history),
            "target_reached": p.done,
            "stop_reason": p.stop_reason or "stage ended before the pruning target",
            "initial_flops": p.initial_flops,
            "initial_params": p.initial_params,
            "graph": p.graph.describe() if p.graph is not None else None,
        }
        if not p.done:
            log.warning("the prune stage ended before the pruning target (%d of the neurons removed); raise "
                        "stages.prune.max_epochs/max_steps", p.num_pruned)  # fmt: skip

    def compact(self) -> None:
        try:
            from lightning_prune.compaction import compact, save_compact
        except ImportError:
            self.metrics["compact"] = {"skipped": "lightning_prune.compaction is not available"}
            return
        p = self.pruning
        start = time.time()
        model = self.module.model
        compact_model = model if p.compacted else compact(model, p.compact_masks, graph=p.graph)
        path = None
        if rank_zero_only.rank == 0:
            path = save_compact(compact_model, self.output_dir / COMPACT_FILE)
        self.compact_model = compact_model
        input_shape = tuple(self.datamodule.input_shape)
        flops, params = measure_cost(compact_model, input_shape)
        module = ClassificationModule(compact_model, num_classes=self.datamodule.num_classes, input_shape=input_shape,
                                      loss=self.module.loss_fn)  # fmt: skip
        record = self.evaluate("compact", module=module, cost=(flops, params))
        record["file"] = str(path) if path is not None else None
        record["compact_time_s"] = round(time.time() - start, 2)
        masked = self.metrics["stages"].get("finetuned") or self.metrics["stages"].get("pruned")
        if masked is not None:
            record["top1_matches_masked"] = abs(record["top1"] - masked["top1"]) < 1e-3

    # -- the whole run ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.build()
        if cfg.stages.evaluate.get("initial", True):
            self.evaluate("initial")
        if _stage_runs(cfg.stages.train):
            self.fit("train", cfg.stages.train, [])
            self.evaluate("trained")
        if cfg.pruning.enabled and _stage_runs(cfg.stages.prune):
            self.prune()
            self.evaluate("pruned")
            if _stage_runs(cfg.stages.finetune):
                self.fit("finetune", cfg.stages.finetune, [self.pruning])
                self.evaluate("finetuned")
            if cfg.stages.get("compact", True) and self.pruning.num_pruned:
                self.compact()
        elif _stage_runs(cfg.stages.finetune):
            self.fit("finetune", cfg.stages.finetune, [])
            self.evaluate("finetuned")
        self.finish()
        return self.metrics

    def finish(self) -> None:
        stages = self.metrics["stages"]
        last = next((stages[s] for s in ("compact", "finetuned", "pruned", "trained", "initial") if s in stages), None)
        first = next(iter(stages.values()), None)
        self.metrics["wall_time_s"] = round(time.time() - self._start, 2)
        if last is not None:
            self.metrics["final"] = {
                k: last[k] for k in ("top1", "top5", "loss", "flops", "params", "neurons_kept", "neurons_kept_ratio")
            }
            self.metrics["final"]["wall_time_s"] = self.metrics["wall_time_s"]
            if first is not None and first["flops"]:
                self.metrics["final"]["flops_ratio"] = last["flops"] / first["flops"]
                self.metrics["final"]["params_ratio"] = last["params"] / first["params"]
        if rank_zero_only.rank != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / METRICS_JSON).write_text(json.dumps(self.metrics, indent=2))
        if self.curve is not None and self.curve.rows:
            write_rows(self.curve.rows, self.output_dir / CURVE_CSV)
        if self.cfg.get("plots", True):
            from lightning_prune.app.plots import plot_run

            try:
                plot_run(self.output_dir)
            except Exception as err:  # a plot must never lose the run's results
                log.warning("plotting failed: %s", err)
        log.info("results in %s", self.output_dir)


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run the recipe ``cfg`` writing into ``output_dir``; returns the metrics."""
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    return Pipeline(cfg, output_dir).run()
