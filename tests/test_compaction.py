"""Physical compaction: the compact model computes what the masked one does, for every supported
architecture; saving, loading, exporting, rounding widths, and the callback's fit-end compaction."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import Classifier, NetOnly, SmallResNet, synthetic_loader, trainer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune import (
    CompactionError,
    CompactModelMismatchError,
    PruningConfigurationError,
    TaylorPruningCallback,
    compact,
    load_compact,
    save_compact,
)
from lightning_prune.compaction import (
    alive_from_masks,
    compact_info,
    export_onnx,
    export_program,
    onnx_available,
    round_masks,
)
from lightning_prune.dependency import build_dependency_graph
from lightning_prune.pruner import NeuronMasks
from lightning_prune.models import LeNet3, cifar_resnet20, cifar_resnet56, load_cifar_resnet_weights, preact_resnet18

TV = torchvision.models

# name -> (factory, input size); torchvision models get CIFAR-sized inputs to keep the suite fast
MODELS = {
    "lenet3": (LeNet3, 32),
    "vgg11_bn": (lambda: TV.vgg11_bn(num_classes=10), 32),
    "preact_resnet18": (preact_resnet18, 32),
    "cifar_resnet20": (cifar_resnet20, 32),
    "cifar_resnet56": (cifar_resnet56, 32),
    "resnet18": (lambda: TV.resnet18(num_classes=10), 32),
    "resnet50": (lambda: TV.resnet50(num_classes=10), 32),
    "resnet101": (lambda: TV.resnet101(num_classes=10), 32),
    "densenet121": (lambda: TV.densenet121(num_classes=10), 32),
    "densenet201": (lambda: TV.densenet201(num_classes=10), 32),
    "mobilenet_v2": (lambda: TV.mobilenet_v2(num_classes=10), 32),
}
PRETRAINED = {"cifar_resnet20": 20, "cifar_resnet56": 56}
RETRACE = {"lenet3", "cifar_resnet56", "mobilenet_v2"}
# Taylor importance (the default) prunes in two steps on the small networks; the large ones prune in one
# step, by random importance where Taylor's global ranking on random data would spare some kind of layer
# (VGG: it takes every neuron from the 4096-wide classifier first) or leave an all-zero output (MobileNetV2).
CALLBACK_SETTINGS = {
    "lenet3": {"steps": 2},
    "cifar_resnet20": {"steps": 2},
    "cifar_resnet56": {"steps": 2},
    "vgg11_bn": {"criterion": "random", "criterion_kwargs": {"seed": 0}},
    "resnet101": {"criterion": "random", "criterion_kwargs": {"seed": 0}},
    "mobilenet_v2": {"criterion": "random", "criterion_kwargs": {"seed": 0}},  # Taylor empties its last stage
    "densenet201": {"criterion": "random", "criterion_kwargs": {"seed": 0}},
}


def build(name: str, data_dir: Path | None = None) -> nn.Module:
    factory, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    if name in PRETRAINED and data_dir is not None:
        path = sorted((data_dir / "pretrained").glob(f"resnet{PRETRAINED[name]}-*.th"))[0]
        load_cifar_resnet_weights(model, path)
    elif any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        calibrate_batchnorm(model, MODELS[name][1])
    return model


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, size: int) -> None:
    """Running statistics of one random batch: with the initial ones, some freshly initialised networks
    (MobileNetV2) output almost exactly zero in eval mode, which would make any comparison pass."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics
    model.train()(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2)))
    for m in norms:
        m.momentum = 0.1


def prune_with_callback(model: nn.Module, size: int, steps: int = 1, keep_ratio: float = 0.6, **callback_kwargs):
    """Run the real callback on synthetic data: ``steps`` optimizer steps, one pruning step after each.

    The learning rate is 0: batches of two CIFAR-sized images leave a single value per channel at the
    last stages, where training-mode BatchNorm gives exploding gradients. The callback still gets its
    gradients, masks and zeroes the removed weights."""
    callback = TaylorPruningCallback(
        prune_every_n_batches=1,
        neurons_per_step=(1 - keep_ratio) / steps + 1e-3,
        keep_ratio=keep_ratio,
        module_name="model",
        **callback_kwargs,
    )
    module = Classifier(model, lr=0.0, example=torch.zeros(2, 3, size, size))
    trainer(max_steps=steps, callbacks=[callback]).fit(module, synthetic_loader(n=2 * steps, batch_size=2, size=size))
    assert callback.num_pruned > 0
    return callback


def max_diff(masked: nn.Module, compacted: nn.Module, size: int, batch: int = 2, inplace: bool = False) -> float:
    """Largest output difference in eval mode, in float64 (float32 rounding differs once sums get shorter)."""
    if not inplace:
        masked, compacted = copy.deepcopy(masked), copy.deepcopy(compacted)
    masked, compacted = masked.double().eval(), compacted.double().eval()
    x = torch.randn(batch, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = masked(x)
        assert expected.abs().max() > 1e-3, "the masked network's output is ~0: the comparison would be vacuous"
        return float((expected - compacted(x)).abs().max())


def shrunk_kinds(original: nn.Module, compacted: nn.Module) -> set[str]:
    """Which kinds of layer lost channels: conv, depthwise, linear, batchnorm."""
    new = dict(compacted.named_modules())
    kinds = set()
    for name, m in original.named_modules():
        c = new.get(name)
        if isinstance(m, nn.Conv2d) and c is not None:
            if c.out_channels < m.out_channels or c.in_channels < m.in_channels:
                kinds.add("depthwise" if m.groups > 1 else "conv")
        elif isinstance(m, nn.Linear) and c is not None and c.in_features < m.in_features:
            kinds.add("linear")
        elif isinstance(m, nn.BatchNorm2d) and c is not None and c.num_features < m.num_features:
            kinds.add("batchnorm")
    return kinds


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_compact_matches_masked(name: str, request: pytest.FixtureRequest) -> None:
    # the pretrained ResNets come from the shared data folder: conftest's fixture skips without it, and fails
    # under CI=true; the other networks need no data
    data_dir = request.getfixturevalue("data_dir") if name in PRETRAINED else None
    model = build(name, data_dir)
    size = MODELS[name][1]
    callback = prune_with_callback(model, size, **CALLBACK_SETTINGS.get(name, {}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if name in RETRACE:  # the public path: trace again from an example input
        compacted = compact(model, callback.masks, torch.zeros(1, 3, size, size), prefix="model.")
    else:
        compacted = compact(model, callback.masks, graph=callback.graph)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "compact() altered its input"
    assert num_params(compacted) < num_params(model)
    kinds = shrunk_kinds(model, compacted)
    diff = max_diff(model, compacted, size, inplace=True)
    assert diff <= 1e-5, f"{name}: masked and compact outputs differ by {diff:.3g}"
    expected = {"conv", "batchnorm"} if name != "lenet3" else {"conv", "linear"}
    if name in ("lenet3", "vgg11_bn"):
        expected.add("linear")
    if name == "mobilenet_v2":
        expected.add("depthwise")
    assert expected <= kinds, f"{name}: only {kinds} shrank"


def test_compact_with_graph_of_callback_and_float32() -> None:
    model = cifar_resnet20()
    callback = prune_with_callback(model, 32)
    compacted = compact(model, callback.masks, graph=callback.graph)
    model.eval(), compacted.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), compacted(x), atol=1e-5, rtol=0)
    assert compacted.training is False and compact_info(compacted)["prefix"] == "model."


def test_option_a_shortcut_with_removed_channels() -> None:
    """Removed channels on both sides of a zero-padding shortcut: the addition scatters the kept ones."""
    model = cifar_resnet20().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -1, 1)
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = build_dependency_graph(model, x)
    from lightning_prune.pruner import NeuronMasks, NeuronSelector

    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    scores = torch.rand(graph.num_neurons, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alive[NeuronSelector(graph).select(scores, alive, graph.num_prunable // 2)] = False
    masks = {n: alive[g.neurons] for n, g in graph.gates.items()}
    zeroer = NeuronMasks(graph)
    zeroer.update(~alive)
    zeroer.zero_parameters()
    compacted = compact(model, masks, x)
    model.eval(), compacted.eval()
    with torch.no_grad():
        assert float((model(x) - compacted(x)).abs().max()) <= 1e-10
    # the strided blocks read a narrower input than they write: 16 -> 32 channels with padding
    get = compacted.get_submodule
    assert get("layer2.0.conv1").in_channels == get("layer1.2.bn2").num_features < 16
    assert get("layer2.0.bn2").num_features < 32
    assert any(n.target == "index_add" for n in compacted.graph.nodes)


def test_round_to_multiple_keeps_equivalence() -> None:
    model = cifar_resnet56()
    callback = prune_with_callback(model, 32, keep_ratio=0.5)
    compacted = compact(model, callback.masks, graph=callback.graph, round_to=8, scores=callback.importance)
    originals = dict(model.named_modules())
    for name, m in compacted.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 8 == 0 or m.out_channels == originals[name].out_channels, name
    plain = compact(model, callback.masks, graph=callback.graph)
    assert num_params(plain) <= num_params(compacted) < num_params(model)
    assert max_diff(model, compacted, 32) <= 1e-5


def test_round_masks_revives_most_important_first() -> None:
    model = LeNet3()
    graph = build_dependency_graph(model, torch.zeros(1, 3, 32, 32))
    masks = {n: torch.ones(g.channels, dtype=torch.bool) for n, g in graph.gates.items()}
    masks["conv1"][:5] = False  # 11 of 16 kept -> 16 with a multiple of 8
    masks["conv2"][:3] = False  # 29 of 32 kept -> 32
    scores = {n: torch.zeros(g.channels) for n, g in graph.gates.items()}
    rounded = round_masks(masks, graph, 4, scores)
    assert int(rounded["conv1"].sum()) == 12 and int(rounded["conv2"].sum()) == 32
    scores["conv1"][3] = 10.0
    rounded = round_masks(masks, graph, 4, scores)
    assert bool(rounded["conv1"][3]) and int(rounded["conv1"].sum()) == 12
    with pytest.raises(CompactionError, match="round_to"):
        round_masks(masks, graph, 0)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = cifar_resnet20()
    callback = prune_with_callback(model, 32)
    compacted = compact(model, callback.masks, graph=callback.graph)
    path = save_compact(copy.deepcopy(compacted), tmp_path / "resnet20.pt")  # a copy keeps what save needs
    loaded = load_compact(cifar_resnet20(), path)  # fresh base: its weights don't matter
    assert type(loaded).__name__ == type(compacted).__name__
    saved = compacted.state_dict()
    assert saved.keys() == loaded.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    compacted.eval(), loaded.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(compacted(x), loaded(x))
    assert torch.load(path, weights_only=True)["format"] == "lightning-prune-compact"


def test_load_into_wrong_base_model_fails_clearly(tmp_path: Path) -> None:
    model = cifar_resnet20()
    graph = build_dependency_graph(model, torch.zeros(1, 3, 32, 32))
    masks = {n: torch.arange(g.channels) % 2 == 0 for n, g in graph.gates.items()}
    path = save_compact(compact(model, masks, graph=graph), tmp_path / "r20.pt")
    with pytest.raises(CompactModelMismatchError, match=r"CifarResNet.*fingerprint.*CifarResNet.*fingerprint"):
        load_compact(cifar_resnet56(), path)
    with pytest.raises(CompactModelMismatchError, match=r"compact .*CifarResNet.*base model given is a .*LeNet3"):
        load_compact(LeNet3(), path)
    with pytest.raises(CompactModelMismatchError):
        load_compact(cifar_resnet20(num_classes=100), path)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(CompactionError, match="not a lightning-prune compact model"):
        load_compact(cifar_resnet20(), tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError):
        load_compact(cifar_resnet20(), tmp_path / "missing.pt")
    with pytest.raises(CompactionError, match="not a compact model"):
        save_compact(model, tmp_path / "x.pt")


def test_bad_masks_fail_clearly() -> None:
    model = LeNet3()
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(CompactionError, match="matches no layer.*prefix"):
        compact(model, {"model.conv9": torch.ones(16, dtype=torch.bool)}, x)
    with pytest.raises(CompactionError, match="has 15 entries, the layer has 16"):
        compact(model, {"conv1": torch.ones(15, dtype=torch.bool)}, x)
    with pytest.raises(CompactionError, match="example input to trace LeNet3.*example_input="):
        compact(model, {})
    with pytest.raises(PruningConfigurationError, match="compact_round_to"):
        TaylorPruningCallback(keep_ratio=0.5, compact_round_to=0)


def _small_masked(name: str):
    model = build(name)
    size = MODELS[name][1]
    graph = build_dependency_graph(model, torch.zeros(1, 3, size, size))
    masks = {n: torch.arange(g.channels) % 2 == 0 for n, g in graph.gates.items()}
    return model, compact(model, masks, graph=graph).eval(), size


def test_torch_export(tmp_path: Path) -> None:
    _, compacted, size = _small_masked("cifar_resnet20")
    x = torch.randn(2, 3, size, size)
    program = export_program(compacted, x, tmp_path / "model.pt2")
    reloaded = torch.export.load(tmp_path / "model.pt2")
    with torch.no_grad():
        expected = compacted(x)
        assert torch.allclose(program.module()(x), expected, atol=1e-5)
        assert torch.allclose(reloaded.module()(x), expected, atol=1e-5)


@pytest.mark.skipif(not onnx_available(), reason='ONNX export needs the optional extra: pip install ".[onnx]"')
def test_onnx_export(tmp_path: Path) -> None:
    import onnx

    from onnx.reference import ReferenceEvaluator

    _, compacted, size = _small_masked("cifar_resnet20")
    path = export_onnx(compacted, torch.randn(1, 3, size, size), tmp_path / "model.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    # the exported graph computes the compact model: run it with ONNX's own reference interpreter
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = compacted(x)
    assert expected.abs().max() > 1e-3  # not a vacuous comparison
    session = ReferenceEvaluator(proto)
    (got,) = session.run(None, {proto.graph.input[0].name: x.numpy()})
    assert got.shape == tuple(expected.shape)
    assert torch.allclose(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


def test_onnx_export_without_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lightning_prune.compaction.export as export

    monkeypatch.setattr(export, "onnx_available", lambda: False)
    with pytest.raises(ImportError, match=r"lightning-prune\[onnx\]"):
        export.export_onnx(nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "m.onnx")


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_callback_compacts_on_fit_end_and_compact_model_fine_tunes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = SmallResNet(width=8)
    callback = TaylorPruningCallback(
        prune_every_n_batches=1, neurons_per_step=0.2, keep_ratio=0.5, module_name="model",
        compact_on_fit_end=True, compact_path=str(tmp_path / "out" / "compact.pt"), compact_round_to=2,
    )  # fmt: skip
    module = Classifier(network, lr=0.01, example=torch.zeros(2, 3, 16, 16))
    trainer(max_steps=4, callbacks=[callback]).fit(module, synthetic_loader(n=32, batch_size=8, size=16))
    assert callback.done and callback.compact_model is not None
    assert Path(callback.compact_file) == tmp_path / "out" / "compact.pt" and Path(callback.compact_file).is_file()
    compacted = callback.compact_model
    assert max_diff(network, compacted, 16) <= 1e-5
    loaded = load_compact(SmallResNet(width=8), callback.compact_file)
    assert max_diff(compacted, loaded, 16) == 0.0
    x = torch.zeros(1, 3, 16, 16)
    assert _flops(compacted, x) < 0.8 * _flops(network, x)

    # next stage: fine-tune the compact network in place of the masked one
    module.model = compacted
    before = {k: v.clone() for k, v in compacted.state_dict().items()}
    trainer(max_steps=3).fit(module, synthetic_loader(n=24, batch_size=8, size=16, seed=1))
    after = compacted.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_flops_target_counts_the_rounded_widths(tmp_path: Path) -> None:
    """With compact_round_to, pruning goes on until the compact model (widths rounded up) meets the
    FLOPs target, and the FLOPs logged are the compact model's own."""
    torch.manual_seed(0)
    network = SmallResNet(width=16)
    callback = TaylorPruningCallback(
        prune_every_n_batches=1, neurons_per_step=3, keep_ratio=0.1, target_flops_ratio=0.6, module_name="model",
        compact_on_fit_end=True, compact_path=str(tmp_path / "compact.pt"), compact_round_to=4,
    )  # fmt: skip
    module = Classifier(network, lr=0.01, example=torch.zeros(2, 3, 16, 16))
    trainer(max_steps=16, callbacks=[callback]).fit(module, synthetic_loader(n=128, batch_size=8, size=16))
    assert callback.done and "FLOPs target" in callback.stop_reason
    compacted, x = callback.compact_model, torch.zeros(1, 3, 16, 16)
    assert max_diff(network, compacted, 16) <= 1e-5  # first: _flops runs a training-mode forward
    assert _flops(compacted, x) == pytest.approx(callback.history[-1].flops, rel=1e-9)
    assert _flops(compacted, x) <= 0.6 * _flops(network, x)
    unrounded = compact(network, callback.masks, graph=callback.graph)
    assert _flops(unrounded, x) < _flops(compacted, x), "the rounding revived nothing: the test proves nothing"
    for name, m in compacted.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 4 == 0 or m.out_channels == network.get_submodule(name).out_channels, name


def test_callback_default_compact_path_is_log_dir(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = TaylorPruningCallback(
        prune_every_n_batches=1, neurons_per_step=0.3, keep_ratio=0.7, module_name="model", compact_on_fit_end=True
    )
    module = Classifier(SmallResNet(width=8), lr=0.01, example=torch.zeros(2, 3, 16, 16))
    fit = trainer(max_steps=2, callbacks=[callback], default_root_dir=str(tmp_path))
    fit.fit(module, synthetic_loader(n=16, batch_size=8, size=16))
    expected = Path(fit.log_dir or fit.default_root_dir) / "compact_model.pt"
    assert Path(callback.compact_file) == expected and expected.is_file()


def _pruned(pattern: str, tmp_path: Path | None = None, **callback_kwargs):
    """A SmallResNet pruned by the callback in a LightningModule: ``"forward"`` (a forward and an
    example_input_array, so the LightningModule itself is traced), ``"module_name"`` (the network named),
    ``"no_forward"`` (the network found at its first call)."""
    torch.manual_seed(0)
    net = SmallResNet(width=8)
    if pattern == "no_forward":
        lit = NetOnly(net)
    else:
        lit = Classifier(net, lr=0.01, example=torch.zeros(2, 3, 16, 16) if pattern == "forward" else None)
    callback = TaylorPruningCallback(
        prune_every_n_batches=1, neurons_per_step=0.2, keep_ratio=0.6,
        module_name="model" if pattern == "module_name" else None,
        compact_on_fit_end=tmp_path is not None, compact_path=str(tmp_path / "compact.pt") if tmp_path else None,
        **callback_kwargs,
    )  # fmt: skip
    trainer(max_steps=3, callbacks=[callback]).fit(lit, synthetic_loader(n=24, batch_size=8, size=16))
    assert callback.num_pruned > 0
    return lit, net, callback


@pytest.mark.parametrize("pattern", ["forward", "module_name", "no_forward"])
def test_compact_with_the_model_and_masks_alone(pattern: str) -> None:
    """compact(model, masks) as the README writes it: the LightningModule or its network, callback masks
    (they record the traced input) or plain ones (the LightningModule's example_input_array)."""
    lit, net, callback = _pruned(pattern)
    masks = callback.masks
    saved = io.BytesIO()
    torch.save(masks, saved)  # still a plain dict of bool tensors
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[n], m) for n, m in masks.items())
    for model in (lit, net):
        if pattern == "forward" and model is net:  # traced on the LightningModule's forward: its input, not net's
            with pytest.raises(CompactionError, match="pass the LightningModule.*example_input="):
                compact(net, masks)
            continue
        compacted = compact(model, masks)
        assert type(compacted).__name__ == "CompactSmallResNet" and max_diff(net, compacted, 16) <= 1e-5
    plain = dict(masks)
    if pattern == "forward":
        assert max_diff(net, compact(lit, plain), 16) <= 1e-5  # example_input_array
    else:
        with pytest.raises(CompactionError, match="needs an example input to trace SmallResNet.*example_input="):
            compact(lit, plain)
    with pytest.raises(CompactionError, match="needs an example input to trace SmallResNet.*example_input="):
        compact(net, plain)
    # names relative to the LightningModule ("model.stem.1"): the prefix is stripped
    assert max_diff(net, compact(net, plain, torch.zeros(1, 3, 16, 16)), 16) <= 1e-5
    assert max_diff(net, callback.compact(), 16) <= 1e-5


def test_callback_masks_record_the_gate_placement() -> None:
    """Masks on Conv outputs (gates before BatchNorm) are not taken for masks breaking Conv-BatchNorm ties."""
    _, net, callback = _pruned("module_name", gate_placement="before_bn")
    assert "model.stem.0" in callback.masks
    assert max_diff(net, compact(net, callback.masks), 16) <= 1e-5


def test_masks_that_break_a_residual_tie_fail_clearly() -> None:
    """stem.1, block1.bn2 and block2.bn2 are summed by identity shortcuts, block3.bn2 and its projection
    block3.proj.1 by the strided block's addition: masking one of them alone is refused, naming the others."""
    torch.manual_seed(0)
    model = SmallResNet(width=8)
    calibrate_batchnorm(model, 16)
    x = torch.zeros(1, 3, 16, 16)
    first5 = torch.arange(8) < 5
    tied = r"remove block1\.bn2\[5\] but not .*stem\.1\[5\] \(no mask\).*block2\.bn2\[5\] \(no mask\).*complete_ties"
    with pytest.raises(CompactionError, match=tied):
        compact(model, {"block1.bn2": first5}, x)
    with pytest.raises(CompactionError, match=r"remove block3\.proj\.1\[10\] but not block3\.bn2\[10\] \(no mask\)"):
        compact(model, {"block3.proj.1": torch.arange(16) < 10}, x)
    tie = {"stem.1": first5, "block1.bn2": first5, "block2.bn2": torch.ones(8, dtype=torch.bool)}
    with pytest.raises(CompactionError, match=r"block2\.bn2\[5\] \(kept\)"):
        compact(model, tie, x)
    # asked for: the neuron goes from every layer it is tied to, exactly as the callback would remove it
    completed = compact(model, {"block1.bn2": first5}, x, complete_ties=True)
    assert all(completed.get_submodule(n).num_features == 5 for n in ("stem.1", "block1.bn2", "block2.bn2"))
    masked = copy.deepcopy(model)
    graph = build_dependency_graph(masked, x)
    zeroer = NeuronMasks(graph)
    zeroer.update(~alive_from_masks(graph, {"block1.bn2": first5}, complete_ties=True))
    zeroer.zero_parameters()
    assert max_diff(masked, completed, 16) <= 1e-10
    consistent = {**tie, "block2.bn2": first5}
    assert max_diff(masked, compact(model, consistent, x), 16) <= 1e-10


def _net_class(module: str, width: int = 8) -> type[nn.Module]:
    """A small network class, as if defined in ``module`` (``__main__`` for a training script)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))

    Net.__module__ = module
    return Net


def test_load_compact_ignores_the_import_path(tmp_path: Path) -> None:
    """Trained as a script (``__main__.Net``), loaded from a package (``mymodels.Net``): the same architecture."""
    torch.manual_seed(0)
    trained = _net_class("__main__")()
    masks = {"bn": torch.arange(8) % 2 == 0}
    compacted = compact(trained, masks, torch.zeros(1, 3, 8, 8)).eval()
    path = save_compact(compacted, tmp_path / "net.pt")
    loaded = load_compact(_net_class("mymodels")(), path).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), compacted(x))
    other = r"compact __main__\..*Net .*base model given is a mymodels\..*Net "
    with pytest.raises(CompactModelMismatchError, match=other):
        load_compact(_net_class("mymodels", width=12)(), path)  # another layer size: another network


@pytest.mark.parametrize("pattern", ["forward", "no_forward"])
def test_callback_writes_the_network_and_it_fine_tunes_in_the_lightning_module(pattern: str, tmp_path: Path) -> None:
    """Without module_name the compact model is the network (not a copy of the LightningModule), it loads
    into a fresh network, and the documented next stage runs: put it back, fit with a new Trainer."""
    lit, net, callback = _pruned(pattern, tmp_path)
    assert type(callback.compact_model).__name__ == "CompactSmallResNet"
    assert max_diff(net, callback.compact_model, 16) <= 1e-5
    loaded = load_compact(SmallResNet(width=8), callback.compact_file)
    assert max_diff(callback.compact_model, loaded, 16) == 0.0

    # docs/compaction.md, "Fine-tuning the compact network"
    if pattern == "forward":
        lit.model = load_compact(SmallResNet(width=8), callback.compact_file)
    else:
        lit.net = load_compact(SmallResNet(width=8), callback.compact_file)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    trainer(max_steps=2).fit(lit, synthetic_loader(n=16, batch_size=8, size=16, seed=1))
    after = (lit.model if pattern == "forward" else lit.net).state_dict()
    assert after.keys() == before.keys() and all(after[k].shape == v.shape for k, v in before.items())
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
