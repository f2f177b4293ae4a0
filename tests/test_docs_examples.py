"""The Python examples of the README and docs, run exactly as written.

Each block runs with the user's objects it names but does not define (a LightningModule ``model`` or
``lit`` whose network is ``lit.net``, a ``datamodule``, a ``loader``, ...): small networks and random data,
in a LightningModule with no ``forward`` and no ``example_input_array``, as users write them. Every
Python block of the docs is listed here, so a new one can't go untested.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import SmallResNet
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = {("docs/distributed.md", 0): "needs 8 GPUs"}


def blocks(path: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), re.S)


class UserModule(pl.LightningModule):
    """No forward, no example_input_array: the network is ``self.net``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallResNet(width=8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class UserData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return _loader()


def _loader(labels: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (80,), generator=g)
    return DataLoader(TensorDataset(x, y) if labels else TensorDataset(x), batch_size=16)


def _run(code: str, **names) -> dict:
    namespace = {"__name__": "docs_example", **names}
    exec(compile(code, "<docs example>", "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logs and files the examples write
    torch.manual_seed(0)


def test_every_python_block_is_covered():
    found = {(p, i) for p in ["README.md", *(f"docs/{f.name}" for f in sorted((ROOT / "docs").glob("*.md")))]
             for i in range(len(blocks(p)))}  # fmt: skip
    covered = {("README.md", 0), ("README.md", 1), ("docs/compaction.md", 0), ("docs/compaction.md", 1),
               ("docs/distributed.md", 1), ("docs/latency.md", 0), ("docs/latency.md", 1), ("docs/studies.md", 0),
               *NOT_RUN}  # fmt: skip
    assert found == covered


def test_readme_quick_start():
    ns = _run(blocks("README.md")[0], model=UserModule(), datamodule=UserData())
    pruning = ns["pruning"]
    # 56 prunable neurons, 2% (1) every 10 of the 25 optimizer steps (5 epochs of 5 batches)
    assert pruning.num_pruned == 2 and [r.step for r in pruning.history] == [10, 20]
    assert set(pruning.masks) == set(pruning.importance) and pruning.neurons_remaining == 54


def test_readme_lightning_cli_script():
    mypackage = types.ModuleType("mypackage")
    mypackage.MyModel, mypackage.MyDataModule = UserModule, UserData
    sys.modules["mypackage"] = mypackage
    try:
        ns = _run(blocks("README.md")[1])  # imported, not run as __main__ (tests/test_cli.py runs the YAML)
    finally:
        del sys.modules["mypackage"]
    assert ns["MyModel"] is UserModule


def test_compaction_docs():
    lit = UserModule()
    masks = {f"net.{name}": torch.arange(8) % 2 == 0 for name in ("stem.1", "block1.bn2", "block2.bn2")}
    x = torch.randn(2, 3, 16, 16)
    first, second = blocks("docs/compaction.md")
    ns = _run(first, lit=lit, datamodule=UserData(), masks=masks, x=x, Net=lambda: SmallResNet(width=8))
    callback, small = ns["callback"], ns["small"]
    assert callback.num_pruned > 0 and Path("small.pt2").is_file() and Path("small.onnx").is_file()
    lit.net.eval(), small.eval()
    with torch.no_grad():
        assert torch.allclose(small(x), lit.net(x), atol=1e-5)
    _run(second, lit=lit, datamodule=UserData(), callback=callback, pl=pl, lp=ns["lp"], Net=ns["Net"])
    assert type(lit.net).__name__ == "CompactSmallResNet"


def test_latency_docs(layered):
    """The table (timed by the tests' synthetic device), then the callback option in a fit."""
    model, example = SmallResNet(width=16), torch.randn(2, 3, 16, 16)
    table_block, callback_block = blocks("docs/latency.md")
    alive = torch.ones(lp_graph_neurons(model, example), dtype=torch.bool)
    ns = _run(table_block, model=model, example=example, alive=alive, torch=torch)
    assert ns["table"].predict(alive) > 0 and Path("latency.png").is_file()
    lit = UserModule()
    lit.net = SmallResNet(width=32)  # at width 8 no layer can shrink on the table's 8-channel grid: 0.5 is refused
    ns = _run(callback_block, lp=ns["lp"], pl=pl, lit=lit, datamodule=UserData())
    callback = ns["callback"]
    assert callback.done and callback.history[-1].latency <= 0.5 * callback.initial_latency
    assert callback.stop_reason.startswith("latency target reached"), callback.stop_reason


def lp_graph_neurons(model, example) -> int:
    from lightning_prune import build_dependency_graph

    return build_dependency_graph(model, example).num_neurons


def test_distributed_docs_masks_in_a_process_that_did_not_fit(tmp_path):
    """The ddp_spawn advice, in the role of the launching process: a callback object that saw nothing of
    the fit gets its masks from the checkpoint (tests/test_ddp.py runs it under ddp_spawn itself)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_prune import TaylorPruningCallback

    model, checkpoint = UserModule(), ModelCheckpoint(dirpath=tmp_path)
    pruning = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=2, num_to_prune=4)
    trainer = pl.Trainer(max_epochs=1, callbacks=[pruning, checkpoint], logger=False, enable_progress_bar=False)
    trainer.fit(model, UserData())
    launcher = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=2, num_to_prune=4)
    assert launcher.masks == {}
    ns = _run(blocks("docs/distributed.md")[1], checkpoint_callback=checkpoint, callback=launcher, model=model)
    assert launcher.masks.keys() == pruning.masks.keys()
    assert all(torch.equal(launcher.masks[k], pruning.masks[k]) for k in pruning.masks)
    x = torch.randn(4, 3, 16, 16)
    model.eval(), ns["small"].eval()
    with torch.no_grad():
        assert torch.allclose(ns["small"](x), model.net(x), atol=1e-5)
    assert sum(p.numel() for p in ns["small"].parameters()) < sum(p.numel() for p in model.net.parameters())


def test_studies_docs_without_a_trainer():
    model = SmallResNet(width=8)
    ns = _run(blocks("docs/studies.md")[0], model=model, loader=_loader(), images_only_loader=_loader(labels=False))
    assert ns["masks"] and set(ns["many"]) == {"taylor_fo_bn", "taylor_so", "obd", "apoz"}
    removed = sum(int((~m).sum()) for m in ns["masks"].values())
    assert removed > 0
