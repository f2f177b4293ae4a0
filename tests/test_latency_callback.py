"""``target_latency_ratio``: the callback keeps the most important neurons under a latency budget that falls
along the schedule, with the table measured once (or taken from the checkpoint on resume)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import SmallResNet, synthetic_loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_prune import LatencyTable, PruningConfigurationError, TaylorPruningCallback


class UserModule(pl.LightningModule):
    """As users write it: no ``forward``, no ``example_input_array``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallResNet(width=16)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _fit(cb, steps: int = 16, ckpt_path=None, checkpoint=None) -> UserModule:
    torch.manual_seed(0)
    module = UserModule()
    callbacks = [cb] + ([checkpoint] if checkpoint else [])
    trainer(callbacks=callbacks, max_steps=steps, enable_checkpointing=checkpoint is not None).fit(
        module, synthetic_loader(), ckpt_path=ckpt_path
    )
    return module


def test_each_step_meets_its_latency_budget_at_widths_where_latency_drops(counted):
    cb = TaylorPruningCallback(target_latency_ratio=0.6, prune_every_n_batches=2, pruning_steps=8, schedule="linear",
                               latency_feedback=0)  # fmt: skip
    _fit(cb)
    # the table's layers, its network at full and at half width in turn 3 times (2 measurements), and, once
    # pruned, the full-width and the compact network in turn 3 times (the synthetic timer gives any network 1 ms)
    assert counted and cb.latency_table.measurements == len(counted) - 4 - 6
    assert isinstance(counted[-1], torch.fx.GraphModule) and cb.measured_latency == pytest.approx(1e-3)
    assert [r.step for r in cb.history] == [2, 4, 6, 8]
    for i, record in enumerate(cb.history, start=1):  # the budget falls linearly to 0.6 at step 4
        assert record.latency <= (1 - i / 4 * 0.4) * cb.initial_latency + 1e-12
    assert cb.done and cb.stop_reason.startswith("latency target reached")
    assert cb.history[-1].latency == pytest.approx(cb.latency_table.predict(cb.graph.alive_from_masks(cb.masks)))
    for name, mask in cb.masks.items():  # whole blocks of 8 channels go: the table's width steps
        assert int(mask.sum()) % 8 == 0, name


def test_latency_and_flops_targets_are_both_met(layered):
    cb = TaylorPruningCallback(target_latency_ratio=0.9, target_flops_ratio=0.5, prune_every_n_batches=2, pruning_steps=8)
    _fit(cb)
    last = cb.history[-1]
    assert last.latency <= 0.9 * cb.initial_latency and last.flops <= 0.5 * cb.initial_flops
    assert cb.stop_reason.startswith("FLOPs and latency targets reached")


def test_resume_takes_the_table_from_the_checkpoint_and_ends_where_the_uninterrupted_run_does(counted, tmp_path):
    def callback():
        return TaylorPruningCallback(target_latency_ratio=0.6, prune_every_n_batches=2, pruning_steps=8,
                                     schedule="linear", latency_feedback=0)

    whole = callback()
    _fit(whole)
    assert [r.step for r in whole.history] == [2, 4, 6, 8]  # two pruning steps after the checkpoint
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _fit(callback(), steps=4, checkpoint=checkpoint)
    counted.clear()
    resumed = callback()
    _fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert len(counted) == 6 and isinstance(counted[1], torch.fx.GraphModule)  # the checkpoint's table: only
    # the full-width and the compact network are timed (in turn, 3 times)
    assert [r.as_dict() for r in resumed.history] == [r.as_dict() for r in whole.history]
    assert all(torch.equal(resumed.masks[n], whole.masks[n]) for n in whole.masks)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_latency_ratio": 1.5}, "target_latency_ratio must be in"),
    ({"target_latency_ratio": 0.5, "latency_width_step": 0}, "latency_width_step"),
    ({"target_latency_ratio": 0.5, "latency_batch_size": 0}, "latency_batch_size"),
    ({"target_latency_ratio": 0.5, "latency_feedback": -1}, "latency_feedback"),
])  # fmt: skip
def test_invalid_latency_arguments(kwargs, match):
    with pytest.raises(PruningConfigurationError, match=match):
        TaylorPruningCallback(**kwargs)


def test_a_latency_target_out_of_reach_is_refused_naming_the_reachable_ratio(counted):
    with pytest.raises(PruningConfigurationError, match=r"target_latency_ratio=0.05 is out of reach.* >= 0\.\d+"):
        _fit(TaylorPruningCallback(target_latency_ratio=0.05, prune_every_n_batches=2, pruning_steps=8))


def test_latency_feedback_calibrates_the_table_on_the_way_and_lands_nearer_the_target(layered):
    # a layer costs at least 4 ms inside a network: the table, fitted through the full and the half-width
    # network, over-predicts the networks between them
    layered.floor = 4e-3
    trusting = TaylorPruningCallback(target_latency_ratio=0.6, prune_every_n_batches=2, pruning_steps=8,
                                     latency_feedback=0)  # fmt: skip
    _fit(trusting, steps=24)
    assert trusting.measured_latency / trusting._measured[1] < 0.95 * 0.6  # the table alone prunes too much
    cb = TaylorPruningCallback(target_latency_ratio=0.6, prune_every_n_batches=2, pruning_steps=8)
    _fit(cb, steps=24)
    full, small = cb._measured[1:]
    assert cb.done and abs(small / full - 0.6) < 0.03 * 0.6, (small / full, cb.stop_reason)
    assert cb._approach and small / full not in cb._approach  # measured on the way, then at the target
    assert "calibration" in cb.latency_table.env and cb._feedback_rounds == 1


def test_a_slow_measurement_on_the_way_does_not_make_the_later_steps_remove_more(layered, monkeypatch):
    # the table is exact (floor 0), but a load spike slows the compact network in the first measurement
    measure, spikes = LatencyTable.measure, [1.25]

    def spiked(self, models, example_input, *args, **kwargs):
        full, small = measure(self, models, example_input, *args, **kwargs)
        return [full, small * (spikes.pop() if spikes else 1.0)]

    monkeypatch.setattr(LatencyTable, "measure", spiked)
    cb = TaylorPruningCallback(target_latency_ratio=0.6, prune_every_n_batches=2, pruning_steps=8)
    _fit(cb, steps=24)
    full, small = cb._measured[1:]
    assert not spikes and cb._approach[0] > 0.85  # measured slow on the way (predicted <= 0.8)...
    assert "calibration" not in cb.latency_table.env  # ...and left to the check at the target
    # calibrated on it, the later steps removed nearly everything (0.23); the table's steps of 8 channels in
    # layers of 16 leave the last step at 0.55
    assert cb.done and small / full > 0.85 * 0.6, (small / full, cb._approach)


def test_latency_feedback_prunes_on_when_the_measured_latency_is_above_the_target(layered):
    layered.floor = 4.5e-3  # narrow layers inside the network cost more than the table says
    cb = TaylorPruningCallback(target_latency_ratio=0.6, prune_every_n_batches=2, pruning_steps=8)
    _fit(cb, steps=24)
    full, small = cb._measured[1:]
    # measured above the target once (more than 2%), calibrated and pruned on, then met
    assert cb._feedback_rounds == 2 and small / full <= 0.62 and cb.done, (small / full, cb.stop_reason)


def test_latency_is_measured_in_the_memory_format_and_dtype_the_network_will_run_in(counted):
    cb = TaylorPruningCallback(target_latency_ratio=0.6, prune_every_n_batches=2, pruning_steps=8,
                               latency_memory_format="channels_last", latency_dtype="torch.float64")  # fmt: skip
    _fit(cb)
    env = cb.latency_table.env
    assert env["memory_format"] == "torch.channels_last" and env["dtype"] == "torch.float64"
    assert cb.done and cb.measured_latency is not None


@pytest.mark.parametrize("kwargs, match", [
    ({"latency_memory_format": "channel_last"}, r"latency_memory_format must be a torch.memory_format .*'channel_"),
    ({"latency_dtype": "bf16"}, r"latency_dtype must be a torch.dtype or its name \(e.g. 'bfloat16'\), got 'bf16'"),
    ({"latency_dtype": torch.channels_last}, "latency_dtype must be a torch.dtype"),
])  # fmt: skip
def test_an_unknown_memory_format_or_dtype_is_refused_naming_it(kwargs, match):
    with pytest.raises(PruningConfigurationError, match=match):
        TaylorPruningCallback(target_latency_ratio=0.5, **kwargs)


def test_resume_after_a_calibration_on_the_way_ends_where_the_uninterrupted_run_does(layered, tmp_path):
    layered.floor = 4e-3  # measured latency differs from the table's: the feedback calibrates it

    def callback():
        return TaylorPruningCallback(target_latency_ratio=0.6, prune_every_n_batches=2, pruning_steps=8)

    whole = callback()
    _fit(whole, steps=24)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = callback()
    _fit(first, steps=4, checkpoint=checkpoint)
    assert first._approach  # calibrated before the checkpoint
    resumed = callback()
    _fit(resumed, steps=24, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert resumed._approach == whole._approach and resumed._feedback_rounds == whole._feedback_rounds
    assert resumed.latency_table.env["calibration"] == whole.latency_table.env["calibration"]
    assert [r.as_dict() for r in resumed.history] == [r.as_dict() for r in whole.history]
    assert all(torch.equal(resumed.masks[n], whole.masks[n]) for n in whole.masks)
