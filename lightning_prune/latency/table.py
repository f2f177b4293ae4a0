"""Per-layer latency measured on the target device, as a function of the layer's input and output widths."""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from lightning_prune.compaction.compact import architecture_fingerprint
from lightning_prune.data.cifar10_jpeg import default_cache_dir
from lightning_prune.dependency import DependencyGraph, build_dependency_graph
from lightning_prune.dependency.channels import ChannelTag
from lightning_prune.dependency.trace import as_call_args
from lightning_prune.latency.allocator import cpu_allocator, warn_if_freed_memory_is_returned


@dataclass(eq=False)
class LayerLatency:
    """Latency of one Conv/Linear layer, timed with the BatchNorm that directly reads its output and the
    elementwise activation after them (ReLU, ReLU6, SiLU, GELU, Hardswish) when the network has them,
    at the layer's output width.

    Measured along two axes through the full-width point: output widths ``out_widths`` with the input at
    full width (``out_seconds``) and input widths ``in_widths`` with the output at full width
    (``in_seconds``). A width between measured ones costs what the next measured width up does (kernels
    compute channels in blocks: an upper bound where latency grows with width), and off the axes the
    model is separable: ``L(i, o) = L(i, full) * L(full, o) / L(full, full)``, exact at measured points.
    Widths count channels (features for a Linear reading a flattened map); ``in_ids``/``out_ids`` give
    the neuron of each (``-1``: a structurally zero channel, which compaction removes).
    """

    in_ids: torch.Tensor
    out_ids: torch.Tensor
    in_widths: list[int]
    in_seconds: list[float]
    out_widths: list[int]
    out_seconds: list[float]

    @property
    def full(self) -> float:
        return self.out_seconds[-1]

    def seconds(self, in_width: float, out_width: float) -> float:
        fin = self.in_seconds[min(bisect.bisect_left(self.in_widths, in_width), len(self.in_widths) - 1)]
        fout = self.out_seconds[min(bisect.bisect_left(self.out_widths, out_width), len(self.out_widths) - 1)]
        return fin * fout / self.full if self.full > 0 else 0.0

    def scaled(self, factor: float) -> LayerLatency:
        """The same layer with every timing multiplied by ``factor``."""
        return replace(self, in_seconds=[factor * s for s in self.in_seconds],
                       out_seconds=[factor * s for s in self.out_seconds])  # fmt: skip

    def widths(self, padded: torch.Tensor) -> tuple[int, int]:
        """(input, output) width under ``padded``: the alive mask with a last False entry for index -1."""
        return int(padded[self.in_ids].sum()), int(padded[self.out_ids].sum())


@dataclass(eq=False)
class LatencyTable:
    """Predicted latency of the network for any alive mask: the sum of its layers' latencies at the
    widths the mask gives them, plus the rest of the network (its measured latency minus the sum of its
    layers' at full width, floored at 0: residual additions, pooling, per-op overhead). Of the rest,
    ``rest`` seconds stay whatever is pruned and ``rest_scaled`` seconds (at full width) shrink with the
    activations the rest's ops write: ``volume`` is each neuron's share of them (elements of its channels
    over all). Picklable (no module inside), so that one rank can build it and broadcast it to the others."""

    layers: dict[str, LayerLatency]
    rest: float
    width_step: int
    env: dict[str, Any]
    measurements: int = 0  # timings taken when this table was built (0: all from the cache)
    rest_scaled: float = 0.0
    volume: torch.Tensor | None = None  # float64 per neuron, summing to at most 1

    def predict(self, alive: torch.Tensor) -> float:
        """Predicted latency in seconds of the network compacted to ``alive`` (bool per neuron)."""
        padded = torch.cat([alive.to("cpu", torch.bool), torch.tensor([False])])
        return self.rest_seconds(alive) + sum(layer.seconds(*layer.widths(padded)) for layer in self.layers.values())

    def rest_seconds(self, alive: torch.Tensor) -> float:
        """Predicted seconds of the rest of the network (all but its layers) compacted to ``alive``."""
        if self.volume is None or not self.rest_scaled:
            return self.rest
        removed = float(self.volume[~alive.to("cpu", torch.bool)].sum())
        return self.rest + self.rest_scaled * (1.0 - removed)

    def measure(self, models: list[nn.Module], example_input: Any, rounds: int = 3, warmup: int = 3,
                repeats: int = 10) -> list[float]:  # fmt: skip
        """Measured seconds of each of ``models`` (copies, in eval mode) at this table's batch size, dtype and
        memory format, on the device of their parameters: what :meth:`predict` predicts. Timed in turn, one
        after the other, ``rounds`` times, so that a change of the machine's load affects all of them alike:
        the first model's figure is the median of its rounds, each other's the first's times the median of
        its per-round ratios to the first."""
        args, kwargs = as_call_args(example_input)
        dtype = getattr(torch, self.env["dtype"].removeprefix("torch."))
        memory_format = getattr(torch, self.env["memory_format"].removeprefix("torch."))
        device = next(models[0].parameters()).device
        return _time_in_turn(models, args, kwargs, self.env["batch"], dtype, device, memory_format, rounds, warmup,
                             repeats)  # fmt: skip

    def calibrated(self, alive: torch.Tensor, measured: float, full_measured: float) -> LatencyTable:
        """A copy of the table whose prediction is the linear map ``a * predict + b`` through two measured
        points of the network: at full width (``full_measured`` seconds) and compacted to ``alive``
        (``measured`` seconds). Its layers are scaled by ``a`` and its rest is ``a * rest + b``, so the
        knapsack's choices under a budget are the same, only what a budget in seconds means changes. When
        the two points cannot fix a positive slope (``alive`` too close to full width), the prediction is
        scaled by ``full_measured / predict(full)``."""
        full = torch.ones_like(alive, dtype=torch.bool)
        p_full, p = self.predict(full), self.predict(alive)
        slope = (full_measured - measured) / (p_full - p) if p_full - p > 1e-3 * p_full else 0.0
        if slope <= 0:
            slope, offset = full_measured / p_full, 0.0
        else:
            offset = full_measured - slope * p_full
        layers = {name: layer.scaled(slope) for name, layer in self.layers.items()}
        env = {**self.env, "calibration": {"slope": slope, "offset": offset}}
        return LatencyTable(layers, slope * self.rest + offset, self.width_step, env, self.measurements,
                            slope * self.rest_scaled, self.volume)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The table as plain containers and tensors: a checkpoint loads it with ``weights_only``."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LatencyTable:
        layers = {name: LayerLatency(**layer) for name, layer in state["layers"].items()}
        return cls(**{**state, "layers": layers})

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_input: Any,
        graph: DependencyGraph | None = None,
        *,
        batch_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        memory_format: torch.memory_format = torch.contiguous_format,
        width_step: int = 8,
        warmup: int = 3,
        repeats: int = 10,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> LatencyTable:
        """Measure (median of ``repeats`` after ``warmup`` runs) each prunable Conv/Linear layer of ``model``
        at the widths it can take: multiples of ``width_step`` channels and its full width, on the axes a
        prunable neuron changes (a depthwise convolution: its output only). Each layer is rebuilt at every
        width, with the BatchNorm that alone reads its output and the activation that alone reads theirs
        (found on the traced graph) at the same width, fed random input of the spatial size it sees on
        ``example_input`` with ``batch_size`` examples (default: the example's). Timings are cached in
        ``cache_dir`` (default: ``$LIGHTNING_PRUNE_CACHE/latency``, else
        ``~/.cache/lightning_prune/latency``), one JSON file per device, torch version, thread count, batch
        size, dtype, memory format and CPU allocator (:func:`~lightning_prune.latency.allocator.cpu_allocator`;
        glibc's default warns), keyed by layer shape (with the BatchNorm and activation timed with it) and
        widths: what is there is reused, only what is missing is measured.

        The whole network is timed too, at full width and compacted to half of every gated layer's
        prunable channels, in turn (:meth:`measure`): the rest of the network (all but the layers) is
        fitted through both as a constant part and a part proportional to the activations its ops write
        (they shrink with the channels of a residual stream: additions, pooling); where that cannot pass
        through both (layers timed alone cost more, or save less, than inside the network), the layers are
        scaled (see ``_fitted``).
        """
        graph = graph if graph is not None else build_dependency_graph(model, example_input)
        device = torch.device(device)
        args, kwargs = as_call_args(example_input)
        example_batch = next((a.shape[0] for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)), 1)
        batch = batch_size or example_batch
        specs = _layer_specs(model, args, kwargs, graph)
        env = {
            "device": _device_name(device),
            "torch": str(torch.__version__),  # a plain str: checkpoints load it with weights_only
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "batch": batch,
            "dtype": str(dtype),
            "memory_format": str(memory_format),
            "allocator": cpu_allocator() if device.type == "cpu" else None,
        }
        cache = _Cache(Path(cache_dir) if cache_dir is not None else default_cache_dir() / "latency", env)
        grids = {}  # name -> (input widths, output widths) to measure
        for name, spec in specs.items():
            ins = _grid(graph.readers[name], graph.prunable, width_step)
            grids[name] = (ins[-1:] if spec.get("groups") == "depthwise" else ins,
                           _grid(graph.writers[name], graph.prunable, width_step))  # fmt: skip
        needed: dict[str, set[tuple[int, int]]] = {}  # layer key -> (input, output) widths
        for name, (ins, outs) in grids.items():
            points = {(i, outs[-1]) for i in ins} | {(ins[-1], o) for o in outs}
            needed.setdefault(_key(specs[name]), set()).update(points)
        todo = [
            (key, i, o)
            for key, points in needed.items()
            for i, o in sorted(points)
            if f"{i},{o}" not in cache.layers.get(key, {})
        ]
        network_key = f"{architecture_fingerprint(model)}:{json.dumps(_shapes(args, kwargs))}"
        volume = _rest_volume(graph, specs)
        half = _half_width(graph)
        probe = volume is not None and float(volume[~half].sum()) > 1e-6
        measurements = 0
        if todo or any(key not in cache.networks for key in (network_key, network_key + ":half")[: 1 + probe]):
            warn_if_freed_memory_is_returned(device)
        try:
            spec_of = {_key(spec): spec for spec in specs.values()}
            for key, i, o in tqdm(todo, desc="latency table", disable=not progress or not todo, leave=False):
                layer, x = _standalone(spec_of[key], i, o, batch)
                cache.layers.setdefault(key, {})[f"{i},{o}"] = _time(
                    *_place(layer, (x,), {}, dtype, device, memory_format), warmup, repeats
                )
                measurements += 1
            networks = {network_key: model}
            if probe:
                from lightning_prune.compaction.compact import compact, masks_from_alive

                networks[network_key + ":half"] = compact(graph.modules[graph.prefix], masks_from_alive(graph, half),
                                                          graph=graph)  # fmt: skip
            if any(key not in cache.networks for key in networks):  # timed together, so that their ratio holds
                timed = _time_in_turn(list(networks.values()), args, kwargs, batch, dtype, device, memory_format,
                                      3 if probe else 1, warmup, repeats)  # fmt: skip
                cache.networks.update(zip(networks, timed))
                measurements += len(networks)
        finally:
            if measurements:
                cache.save()
        layers = {}
        for name, spec in specs.items():
            ins, outs = grids[name]
            points = cache.layers[_key(spec)]
            layers[name] = LayerLatency(
                in_ids=graph.readers[name].clone(),
                out_ids=graph.writers[name].clone(),
                in_widths=ins,
                in_seconds=[points[f"{i},{outs[-1]}"] for i in ins],
                out_widths=outs,
                out_seconds=[points[f"{ins[-1]},{o}"] for o in outs],
            )
        table = cls(layers, 0.0, width_step, env, measurements)  # its layers alone
        if not probe:
            table.rest = max(0.0, cache.networks[network_key] - table.predict(torch.ones_like(half)))
            return table
        return table._fitted(volume, half, cache.networks[network_key], cache.networks[network_key + ":half"])

    def _fitted(self, volume: torch.Tensor, half: torch.Tensor, full_s: float, half_s: float) -> LatencyTable:
        """This table of layers alone (no rest) with the rest of the network fitted through the measured
        seconds of the network at full width and compacted to ``half``: latency = ``scale`` * layers +
        ``rest`` + ``rest_scaled`` * (1 - volume removed), all at least 0. The first of these that passes
        through both points: the layers as timed (``scale`` 1); a rest that wholly shrinks (``rest`` 0);
        a constant rest (``rest_scaled`` 0). Else the layers as timed and the rest through the full network,
        shrinking as far as it may towards the half-width point."""
        kept = 1.0 - float(volume[~half].sum())  # share of the rest's activations the half-width network writes
        layers_full, layers_half = self.predict(torch.ones_like(half)), self.predict(half)
        candidates = []  # (scale, rest, rest_scaled)
        shrinking = (full_s - layers_full - half_s + layers_half) / (1.0 - kept)
        candidates.append((1.0, full_s - layers_full - shrinking, shrinking))
        if layers_half != kept * layers_full:
            scale = (half_s - kept * full_s) / (layers_half - kept * layers_full)
            candidates.append((scale, 0.0, full_s - scale * layers_full))
        if layers_full != layers_half:
            scale = (full_s - half_s) / (layers_full - layers_half)
            candidates.append((scale, full_s - scale * layers_full, 0.0))
        rest_full = max(0.0, full_s - layers_full)
        shrinking = min(max(shrinking, 0.0), rest_full)  # none passes: the layers as timed, the rest nearest
        fallback = (1.0, rest_full - shrinking, shrinking)
        scale, rest, rest_scaled = next((c for c in candidates if c[0] > 0 and min(c[1:]) >= 0), fallback)
        layers = {name: layer.scaled(scale) for name, layer in self.layers.items()}
        return replace(self, layers=layers, rest=rest, rest_scaled=rest_scaled, volume=volume)

    def plot(self, path: str | os.PathLike) -> None:
        """Save a figure of each layer's latency against its output width and against its input width."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(12, 5))
        axes = fig.subplots(1, 2, sharey=True)
        for name, layer in self.layers.items():
            for ax, widths, seconds in ((axes[0], layer.out_widths, layer.out_seconds),
                                        (axes[1], layer.in_widths, layer.in_seconds)):  # fmt: skip
                if len(widths) > 1:
                    ax.plot(widths, [1e3 * s for s in seconds], marker=".", label=name)
        for ax, axis, other in ((axes[0], "output", "input"), (axes[1], "input", "output")):
            ax.set_xlabel(f"{axis} channels ({other} at full width)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("latency (ms)")
        for ax in axes:
            if 0 < len(ax.lines) <= 24:
                ax.legend(fontsize="x-small", ncol=2)
        env = self.env
        fig.suptitle(f"{env['device']}, batch {env['batch']}, {env['dtype']}, {env['memory_format']}")
        fig.tight_layout()
        fig.savefig(path, dpi=120)


class _Cache:
    """The JSON file of timings for one environment: ``layers`` (layer key -> ``"in,out"`` -> seconds)
    and ``networks`` (architecture and input shapes -> seconds)."""

    def __init__(self, folder: Path, env: dict[str, Any]) -> None:
        text = json.dumps(env, sort_keys=True)
        self.path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        self.env = env
        data = self._read()
        self.layers: dict[str, dict[str, float]] = data.get("layers", {})
        self.networks: dict[str, float] = data.get("networks", {})

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def save(self) -> None:
        """Merge into what is on disk now (another process may have written it) and replace it atomically."""
        data = self._read()
        layers = data.get("layers", {})
        for key, points in self.layers.items():
            layers.setdefault(key, {}).update(points)
        networks = {**data.get("networks", {}), **self.networks}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"env": self.env, "layers": layers, "networks": networks}, indent=1))
        os.replace(tmp, self.path)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _grid(ids: torch.Tensor, prunable: torch.Tensor, step: int) -> list[int]:
    """Widths to measure on one axis: multiples of ``step`` channels below the full width, and the full
    width; only the full width when no prunable neuron is on it. A Linear reading a flattened map steps by
    ``step`` channels of the map (``step`` times the positions per channel features)."""
    valid = ids[ids >= 0]
    full = max(1, valid.numel())
    if not valid.numel() or not prunable[valid].any():
        return [full]
    unit = step * max(1, valid.numel() // valid.unique().numel())
    return [*range(unit, full, unit), full]


def _layer_specs(model: nn.Module, args: Any, kwargs: Any, graph: DependencyGraph) -> dict[str, dict[str, Any]]:
    """What rebuilding each Conv/Linear alone needs, but its widths: the constructor arguments and the
    input size but channels and batch, found with forward hooks on the example input. Layers of other
    kinds (transposed convolutions) are left out: their time counts in the rest of the network."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        graph.modules[name].register_forward_hook(
            lambda module, inputs, output, name=name: shapes.__setitem__(name, tuple(inputs[0].shape))
        )
        for name in graph.readers
    ]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.training = training
    specs = {}
    followers = _followers(graph)
    for name in graph.readers:
        module = graph.modules[name]
        if name not in shapes or name not in graph.writers:
            continue
        if type(module) is nn.Linear:
            specs[name] = {"type": "Linear", "bias": module.bias is not None, "input": list(shapes[name][1:-1])}
            if specs[name]["input"] and "bn" in followers.get(name, {}):  # BatchNorm1d reads (N, C) only here
                del followers[name]["bn"]
        elif type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            specs[name] = {
                "type": type(module).__name__,
                "kernel_size": list(module.kernel_size),
                "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation),
                "groups": "depthwise" if depthwise else module.groups,
                "bias": module.bias is not None,
                "padding_mode": module.padding_mode,
                "input": list(shapes[name][2:]),
            }
        if name in specs:
            specs[name].update(followers.get(name, {}))  # no entry when nothing follows: the layer alone
    return specs


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish)
_ACTIVATION_FUNCTIONS = {
    F.relu: "ReLU", torch.relu: "ReLU", F.relu6: "ReLU6", F.silu: "SiLU", F.gelu: "GELU", F.hardswish: "Hardswish",
}  # fmt: skip
_ACTIVATION_METHODS = {"relu": "ReLU", "relu_": "ReLU"}


def _followers(graph: DependencyGraph) -> dict[str, dict[str, str]]:
    """Per Conv/Linear layer, what the table times with it: ``bn``, the BatchNorm class that is the only
    reader of the layer's output, and ``act``, the activation (``"ReLU"``, ``"ReLU(inplace)"``,
    ``"GELU(tanh)"``...) that is the only reader of that (or of the layer's output when there is no
    BatchNorm). Found on the traced graph; modules are matched by identity, so a ``prefix`` does not matter."""
    names = {id(module): name for name, module in graph.modules.items()}
    traced = graph.traced

    def module_of(node: fx.Node) -> nn.Module | None:
        return _module_of(traced, node)

    def activation(node: fx.Node | None) -> str | None:
        if node is None:
            return None
        module = module_of(node)
        if module is not None:
            if type(module) not in _ACTIVATIONS:
                return None
            kind, inplace = type(module).__name__, getattr(module, "inplace", False)
            approximate = getattr(module, "approximate", "none")
        elif node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
            kind = _ACTIVATION_FUNCTIONS[node.target]
            inplace = bool(node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False))
            approximate = node.kwargs.get("approximate", "none")
        elif node.op == "call_function" and node.target is torch.relu_:
            kind, inplace, approximate = "ReLU", True, "none"
        elif node.op == "call_method" and node.target in _ACTIVATION_METHODS:
            kind, inplace, approximate = "ReLU", node.target.endswith("_"), "none"
        else:
            return None
        options = [o for o in ("inplace" if inplace and kind != "GELU" else None,
                               approximate if kind == "GELU" and approximate != "none" else None) if o]  # fmt: skip
        return f"{kind}({','.join(options)})" if options else kind

    followers: dict[str, dict[str, str]] = {}
    for node in traced.graph.nodes:
        module = module_of(node)
        name = names.get(id(module)) if module is not None else None
        if name not in graph.readers or not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        after: dict[str, str] = {}
        last, reader = node, _only_reader(node)
        norm = module_of(reader) if reader is not None else None
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and type(norm) in (nn.BatchNorm1d, nn.BatchNorm2d,
                                                                                nn.BatchNorm3d):  # fmt: skip
            after["bn"] = type(norm).__name__
            last = reader
        act = activation(_only_reader(last))
        if act is not None:
            after["act"] = act
        if after:
            followers[name] = after
    return followers


def _module_of(traced: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return traced.get_submodule(node.target) if node.op == "call_module" else None


def _only_reader(node: fx.Node) -> fx.Node | None:
    """The node that alone reads ``node``, as its first argument."""
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].args and users[0].args[0] is node else None


def _rest_volume(graph: DependencyGraph, specs: dict[str, dict[str, Any]]) -> torch.Tensor | None:
    """Each neuron's share of the elements written by the ops of the network that the table does not time
    with a layer (residual additions, the activations after them, pooling...): float64 per neuron, or
    None when no op writes a tensor."""
    traced, names = graph.traced, {id(m): name for name, m in graph.modules.items()}
    timed: set[fx.Node] = set()
    for node in traced.graph.nodes:
        module = _module_of(traced, node)
        spec = specs.get(names.get(id(module), "")) if module is not None else None
        if spec is not None:  # the layer, then its BatchNorm and activation as _followers found them
            timed.add(node)
            for follower in ("bn", "act"):
                if follower in spec and (node := _only_reader(node)) is not None:
                    timed.add(node)
    volume = torch.zeros(graph.num_neurons + 1, dtype=torch.float64)  # the last entry: channels of no neuron
    for node in traced.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op not in ("call_module", "call_function", "call_method") or node in timed:
            continue
        if not hasattr(meta, "shape"):
            continue
        elements = float(math.prod(meta.shape))
        tag = graph.channel_neurons.get(node)
        if not isinstance(tag, ChannelTag) or not tag.size:
            volume[-1] += elements
            continue
        neurons = graph.neurons_of(tag.nodes)
        volume.index_add_(0, torch.where(neurons >= 0, neurons, graph.num_neurons),
                          torch.full((tag.size,), elements / tag.size, dtype=torch.float64))  # fmt: skip
    total = float(volume.sum())
    return volume[:-1] / total if total > 0 else None


def _half_width(graph: DependencyGraph) -> torch.Tensor:
    """Alive mask keeping the first half (rounded up) of every gated layer's prunable channels, each set of
    tied neurons decided at its first gate."""
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    decided = torch.zeros(graph.num_neurons, dtype=torch.bool)
    for gate in graph.gates.values():
        neurons = gate.neurons[gate.neurons >= 0]
        neurons = neurons[graph.prunable[neurons] & ~decided[neurons]].unique()
        alive[neurons[(neurons.numel() + 1) // 2 :]] = False
        decided[neurons] = True
    return alive


def _follower_modules(spec: dict[str, Any], width: int) -> list[nn.Module]:
    """The BatchNorm and activation of ``spec`` (see :func:`_followers`) at ``width`` channels."""
    modules: list[nn.Module] = []
    if "bn" in spec:
        modules.append(getattr(nn, spec["bn"])(width))
    if "act" in spec:
        kind, _, options = spec["act"].partition("(")
        options = options.rstrip(")").split(",") if options else []
        if kind == "GELU":
            modules.append(nn.GELU(approximate=options[0] if options else "none"))
        else:
            modules.append(getattr(nn, kind)(inplace="inplace" in options))
    return modules


def _key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _standalone(spec: dict[str, Any], i: int, o: int, batch: int) -> tuple[nn.Module, torch.Tensor]:
    """A fresh layer of ``spec`` with ``i`` input and ``o`` output channels, followed by its BatchNorm and
    activation at ``o`` channels when it has them, and an input for it."""
    layer, x = _bare(spec, i, o, batch)
    after = _follower_modules(spec, o)
    return (_Unit(layer, *after) if after else layer), x


class _Unit(nn.Sequential):
    """A Conv/Linear layer and the BatchNorm and activation timed with it."""


def _bare(spec: dict[str, Any], i: int, o: int, batch: int) -> tuple[nn.Module, torch.Tensor]:
    if spec["type"] == "Linear":
        return nn.Linear(i, o, bias=spec["bias"]), torch.randn(batch, *spec["input"], i)
    groups = spec["groups"]
    if groups == "depthwise":  # its input width follows its output width
        i = groups = o
    padding = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
    layer = getattr(nn, spec["type"])(
        i, o, tuple(spec["kernel_size"]), stride=tuple(spec["stride"]), padding=padding,
        dilation=tuple(spec["dilation"]), groups=groups, bias=spec["bias"], padding_mode=spec["padding_mode"],
    )  # fmt: skip
    return layer, torch.randn(batch, i, *spec["input"])


def _shapes(args: Any, kwargs: Any) -> list[Any]:
    """Shapes of the input tensors but their batch size, and the other inputs' repr."""
    return [list(a.shape[1:]) if isinstance(a, torch.Tensor) else repr(a) for a in [*args, *kwargs.values()]]


def _rebatch(args: Any, batch: int) -> list[Any]:
    """Tensors of the example input repeated or cut to ``batch`` examples."""
    return [a[torch.arange(batch) % a.shape[0]] if isinstance(a, torch.Tensor) and a.dim() else a for a in args]


def _place(module: nn.Module, args: Any, kwargs: Any, dtype: torch.dtype, device: torch.device,
           memory_format: torch.memory_format) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:  # fmt: skip
    """``module`` in eval mode and its inputs moved to ``device``, floating point in ``dtype``, 4-D tensors
    in ``memory_format``."""

    def move(a: Any) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        a = a.to(device, dtype if a.is_floating_point() else a.dtype)
        return a.contiguous(memory_format=memory_format) if a.dim() == 4 else a

    module = module.to(device, dtype).eval()
    if memory_format != torch.contiguous_format:
        module = module.to(memory_format=memory_format)
    return module, tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _time_network(model: nn.Module, args: Any, kwargs: Any, batch: int, dtype: torch.dtype, device: torch.device,
                  memory_format: torch.memory_format, warmup: int, repeats: int) -> float:  # fmt: skip
    """:func:`_time` of a copy of ``model`` on its example input repeated or cut to ``batch`` examples."""
    bargs, bkwargs = _rebatch(args, batch), {k: _rebatch([v], batch)[0] for k, v in kwargs.items()}
    return _time(*_place(copy.deepcopy(model), bargs, bkwargs, dtype, device, memory_format), warmup, repeats)


def _time_in_turn(models: list[nn.Module], args: Any, kwargs: Any, batch: int, dtype: torch.dtype,
                  device: torch.device, memory_format: torch.memory_format, rounds: int, warmup: int,
                  repeats: int) -> list[float]:  # fmt: skip
    """Seconds of each of ``models`` timed one after the other, ``rounds`` times: the first's median, each
    other's the first's times the median of its per-round ratios to the first (see :meth:`LatencyTable.measure`)."""
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for model, record in zip(models, times):
            record.append(_time_network(model, args, kwargs, batch, dtype, device, memory_format, warmup, repeats))
    first = statistics.median(times[0])
    return [first] + [first * statistics.median(t / f for t, f in zip(record, times[0])) for record in times[1:]]


def _time(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], warmup: int, repeats: int) -> float:
    """Median seconds of ``module(*args, **kwargs)`` over ``repeats`` runs after ``warmup`` ones."""
    cuda = any(p.is_cuda for p in module.parameters()) or any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    times = []
    with torch.inference_mode():
        for run in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            if run >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)
