"""``compact_when_done``: the rest of the fit trains the compact network, and computes what the masked
one would have."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Classifier, SmallCNN, SmallResNet, synthetic_loader, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import fx

from lightning_prune import PruningConfigurationError, TaylorPruningCallback


class UserModule(Classifier):
    """No forward, no example_input_array: ``training_step`` calls ``self.net``."""

    def __init__(self, optimizer: str = "sgd") -> None:
        torch.manual_seed(0)
        super().__init__(SmallResNet(width=8).double(), optimizer=optimizer)
        self.net = self.model
        del self.model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _run(compact_when_done: bool, optimizer: str = "sgd", epochs: int = 4, ckpt_path=None, checkpoint=None):
    module, losses = UserModule(optimizer), Losses()
    pruning = TaylorPruningCallback(
        prune_every_n_batches=2, neurons_per_step=3, num_to_prune=9, reset_momentum=False,
        compact_when_done=compact_when_done,
    )  # fmt: skip
    callbacks = [pruning, losses] + ([checkpoint] if checkpoint else [])
    trainer(callbacks=callbacks, max_epochs=epochs, enable_checkpointing=checkpoint is not None).fit(
        module, synthetic_loader(dtype=torch.float64), ckpt_path=ckpt_path
    )
    return module, pruning, losses.losses


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_loss_curve_goes_on_where_the_masked_one_was(optimizer):
    """Pruning ends at step 6 of 16; from step 7 the compact network trains, its momentum (or Adam moments)
    cut from the masked one's: every later loss and the final outputs equal the masked run's (float64)."""
    masked, masked_pruning, masked_losses = _run(False, optimizer)
    small, pruning, losses = _run(True, optimizer)
    assert [r.step for r in pruning.history] == [2, 4, 6] and pruning.compacted
    assert isinstance(small.net, fx.GraphModule)
    assert sum(p.numel() for p in small.net.parameters()) < sum(p.numel() for p in masked.net.parameters())
    optimizer_params = {p for group in small.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == set(small.net.parameters())
    assert len(losses) == 16
    assert losses == pytest.approx(masked_losses, rel=1e-10, abs=0)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    masked.eval(), small.eval()
    with torch.no_grad():
        assert torch.allclose(small.net(x), masked.net(x), rtol=1e-9, atol=1e-10)
    assert pruning.compact() is small.net


def test_resume_after_compaction_loads_into_a_new_full_network(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full, _, full_losses = _run(True, checkpoint=checkpoint)
    after = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)  # step 8: compacted at step 6
    assert next(v for k, v in after["callbacks"].items() if "TaylorPruningCallback" in k)["compacted"]
    resumed, pruning, losses = _run(True, ckpt_path=tmp_path / "epoch=1.ckpt")
    assert pruning.compacted and pruning.num_pruned == 9 and [r.step for r in pruning.history] == [2, 4, 6]
    assert losses == pytest.approx(full_losses[8:], rel=1e-10, abs=0)
    for (n, a), (_, b) in zip(full.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), n
    assert pruning.masks.keys() and all(torch.equal(pruning.masks[k], v) for k, v in _masks(full).items())


def _masks(module):
    cb = next(c for c in module.trainer.callbacks if isinstance(c, TaylorPruningCallback))
    return cb.masks


class LayersOnTheModule(Classifier):
    """A LightningModule whose layers are its own attributes: no network attribute to replace."""

    def __init__(self) -> None:
        super().__init__(SmallCNN(), example=torch.randn(2, 3, 16, 16))
        self.extra = torch.nn.Linear(10, 10)

    def forward(self, x):
        return self.extra(self.model(x))


def test_a_network_without_its_own_attribute_is_refused_with_what_to_do():
    pruning = TaylorPruningCallback(num_to_prune=2, compact_when_done=True)
    with pytest.raises(PruningConfigurationError, match="one attribute of LayersOnTheModule"):
        trainer(callbacks=[pruning], max_steps=2).fit(LayersOnTheModule(), synthetic_loader())
