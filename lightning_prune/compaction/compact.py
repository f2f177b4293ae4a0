"""Physical compaction: rebuild a masked network without its removed neurons.

The dependency graph (:func:`lightning_prune.build_dependency_graph`, on top of ``torch.fx``) tags
every channel of every traced value with a channel node, and every node with a neuron. Given the
neurons still alive, each value of the compact network holds only its *kept* channels: the positions
whose node is not structurally zero (``ZERO``, the padding of option-A shortcuts) and whose neuron is
alive. Every other channel is exactly zero in the masked network, so dropping it changes nothing.

The traced graph is copied node by node:

* Conv (``groups == 1``), Linear: weights sliced on both the kept inputs and the kept outputs.
* Depthwise Conv, BatchNorm: sliced on the kept channels (an input that lacks one of them, e.g. a
  zero-padded one, is filled with zeros first).
* Additions and products tying channels: every operand is brought to the output's kept channels
  (``index_add`` where one operand already has them, a zero-filled gather otherwise).
* Channel concatenation (DenseNet), flatten before a Linear and other channel-wise ops (activations,
  pooling, scaling by a number) work on the compact tensors as they are.
* Channel zero-padding (option-A shortcuts) and channel slicing become gathers of the kept channels.
* ``view``/``reshape`` get their channel count rewritten.
* Anything else (an op the graph marked opaque, a module called twice, a grouped convolution, the
  network's outputs) gets its inputs rebuilt at full width, zeros at the removed channels, so the
  result is exact whatever the op does.
"""

from __future__ import annotations

import copy
import hashlib
import math
import operator
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import fx, nn

from lightning_prune.compaction.ops import gather_channels
from lightning_prune.dependency import DependencyGraph, build_dependency_graph
from lightning_prune.dependency.channels import ZERO, ChannelTag
from lightning_prune.dependency.trace import as_call_args
from lightning_prune.errors import PruningConfigurationError

COMPACT_META = "_lightning_prune_compact"

_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}
_ADD_METHODS = {"add", "add_"}
_SUB_METHODS = {"sub", "sub_"}
_MUL_METHODS = {"mul", "mul_"}
_OUT_OF_PLACE = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    "add_": "add", "sub_": "sub", "mul_": "mul",
}  # fmt: skip


class CompactionError(PruningConfigurationError):
    """The masks or the model cannot be compacted as given."""


class PruningMasks(dict):
    """Layer name -> bool per output channel, True where kept: a plain dict that also records how the
    network was traced (``trace``: the prefix of the names, the shape and dtype of each input, the leaf
    modules, the gate placement), so that :func:`compact` needs nothing else. ``torch.save`` and ``copy``
    keep only the masks, as an ``OrderedDict`` (``torch.load(..., weights_only=True)`` reads it)."""

    def __init__(self, masks: Mapping[str, torch.Tensor], trace: dict[str, Any]) -> None:
        super().__init__(masks)
        self.trace = trace

    def __reduce__(self) -> tuple[type, tuple[list[tuple[str, torch.Tensor]]]]:
        return OrderedDict, (list(self.items()),)


def masks_from_alive(graph: DependencyGraph, alive: torch.Tensor, placement: str = "after_bn") -> PruningMasks:
    """The mask of every gated layer of ``graph`` for the bool-per-neuron ``alive`` (the inverse of
    :func:`alive_from_masks`), recording how ``graph`` was traced (with gate ``placement``)."""
    masks = {name: _mask_of(graph, name, alive) for name in graph.gates}
    return PruningMasks(masks, {**_trace_spec(graph), "placement": placement})


def architecture_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture: the qualified name and class name of every module, and the names and
    shapes of the parameters and buffers. Not the import path: a class defined in a script
    (``__main__.Net``) matches the same class imported from a module (``mymodels.Net``)."""
    lines = [f"{name}:{type(m).__name__}" for name, m in model.named_modules()]
    lines += [f"{k}:{tuple(v.shape)}" for k, v in sorted(model.state_dict().items()) if isinstance(v, torch.Tensor)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def alive_from_masks(
    graph: DependencyGraph, masks: Mapping[str, torch.Tensor], complete_ties: bool = False
) -> torch.Tensor:
    """Bool per neuron, False for every neuron a mask marks as removed.

    Masks are keyed by the qualified name of a gated layer (``callback.masks``) or of any layer that
    writes channels (Conv, Linear, BatchNorm), with one bool per output channel, True where kept.
    Channels tied by a residual addition are one neuron: a mask that removes it must be matched by every
    other gated layer holding it, else :class:`CompactionError` names the tie (a model compacted from
    such masks would not compute the masked one). ``complete_ties=True`` removes it from all of them.
    """
    alive = torch.ones(graph.num_neurons, dtype=torch.bool)
    kept = torch.zeros(graph.num_neurons, dtype=torch.bool)
    for name, mask in masks.items():
        neurons = _neurons_of(graph, name)
        mask = torch.as_tensor(mask).to("cpu", torch.bool).flatten()
        if mask.numel() != neurons.numel():
            raise CompactionError(
                f"mask for {name!r} has {mask.numel()} entries, the layer has {neurons.numel()} channels"
            )
        valid = neurons >= 0
        alive[neurons[valid & ~mask]] = False
        kept[neurons[valid & mask]] = True
    if complete_ties:
        return alive
    unmasked = torch.zeros(graph.num_neurons, dtype=torch.bool)
    for name, gate in graph.gates.items():
        if name not in masks:
            unmasked[gate.neurons[gate.neurons >= 0]] = True
    broken = torch.nonzero(~alive & (kept | unmasked)).flatten()
    if broken.numel():
        raise CompactionError(_broken_tie(graph, masks, int(broken[0]), broken.numel()))
    return alive


def _neurons_of(graph: DependencyGraph, name: str) -> torch.Tensor:
    neurons = graph.gates[name].neurons if name in graph.gates else graph.writers.get(name)
    if neurons is None:
        known = ", ".join(sorted(graph.gates)[:5])
        raise CompactionError(
            f"mask for {name!r} matches no layer of the network (gated layers: {known}, ...); if the network "
            "is a submodule of a LightningModule, give the LightningModule, or the network and its `prefix`"
        )
    return neurons


def _broken_tie(graph: DependencyGraph, masks: Mapping[str, torch.Tensor], neuron: int, count: int) -> str:
    """The channels of ``neuron`` the masks remove, and those they keep or leave without a mask."""
    layers = {name: gate.neurons for name, gate in graph.gates.items()} | {n: _neurons_of(graph, n) for n in masks}
    removed, others = [], []
    for name, neurons in layers.items():
        for c in torch.nonzero(neurons == neuron).flatten().tolist():
            if name not in masks:
                others.append(f"{name}[{c}] (no mask)")
            elif bool(torch.as_tensor(masks[name]).flatten()[c]):
                others.append(f"{name}[{c}] (kept)")
            else:
                removed.append(f"{name}[{c}]")
    return (
        f"the masks remove {_listed(removed)} but not {_listed(others)}: these channels are one neuron (tied by "
        "residual additions, or a layer and the BatchNorm after it), so they must be masked the same way. Mask "
        "them all, or pass complete_ties=True to remove the neuron from every one of them"
        + (f" ({count} neurons are in this case)" if count > 1 else "")
    )


def _listed(items: list[str], most: int = 6) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def round_masks(
    masks: Mapping[str, torch.Tensor],
    graph: DependencyGraph,
    multiple: int,
    scores: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Revive removed neurons until every Conv/Linear keeps a multiple of ``multiple`` output channels
    (or all of them).

    Each layer short of a multiple revives its removed neurons with the highest ``scores`` first
    (importance per neuron, or per gated layer as in ``callback.importance``); without scores, the
    lowest channel index first. A neuron tied to other layers revives there too, so the rounding is
    repeated until no layer changes. The revived channels' weights are those of the model: the callback
    zeroes removed weights, so a model it masked still computes exactly what the compact model does.
    """
    alive = round_alive(graph, alive_from_masks(graph, masks), multiple, _priority(graph, scores))
    return {name: _mask_of(graph, name, alive) for name in masks}


def _priority(graph: DependencyGraph, scores: torch.Tensor | Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """One value per neuron: ``scores`` per neuron or per gated layer, or the lowest index first."""
    if scores is None:
        return -torch.arange(graph.num_neurons, dtype=torch.float64)
    if isinstance(scores, Mapping):
        from lightning_prune.pruner.selection import neuron_scores

        return neuron_scores(graph, dict(scores))
    return torch.as_tensor(scores, dtype=torch.float64)


def round_alive(graph: DependencyGraph, alive: torch.Tensor, multiple: int, priority: torch.Tensor) -> torch.Tensor:
    """:func:`round_masks` on the bool-per-neuron ``alive`` vector (a new one is returned): removed neurons
    with the highest ``priority`` (one value per neuron) revive first."""
    if not isinstance(multiple, int) or multiple < 1:
        raise CompactionError(f"round_to must be a positive int, got {multiple!r}")
    alive = alive.clone()
    if multiple == 1:
        return alive
    layers = [
        neurons
        for name, neurons in graph.writers.items()
        if isinstance(graph.modules[name], nn.Linear)
        or (isinstance(graph.modules[name], nn.modules.conv._ConvNd) and graph.modules[name].groups == 1)
    ]
    changed = True
    while changed:
        changed = False
        for neurons in layers:
            valid = neurons[neurons >= 0]
            kept = int(alive[valid].sum())
            target = min(valid.numel(), math.ceil(kept / multiple) * multiple)
            if kept >= target:
                continue
            dead = torch.unique(valid[~alive[valid]])
            order = dead[torch.sort(priority[dead], descending=True, stable=True).indices]
            for neuron in order.tolist():
                if kept >= target:
                    break
                alive[neuron] = True
                kept += int((valid == neuron).sum())
            changed = True
    return alive


def _mask_of(graph: DependencyGraph, name: str, alive: torch.Tensor) -> torch.Tensor:
    neurons = graph.gates[name].neurons if name in graph.gates else graph.writers[name]
    return torch.where(neurons >= 0, alive[neurons.clamp(min=0)], torch.ones_like(neurons, dtype=torch.bool))


def compact(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    example_input: Any = None,
    *,
    graph: DependencyGraph | None = None,
    prefix: str | None = None,
    leaf_modules: Iterable[str] = (),
    round_to: int | None = None,
    scores: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    complete_ties: bool = False,
) -> fx.GraphModule:
    """A new module computing what ``model`` masked by ``masks`` computes, without the removed channels.

    Args:
        model: the network (left untouched), or the LightningModule holding it: when all its parameters
            live in one child (``self.net``), the result is that network compacted, else the whole module.
        masks: layer name -> bool per output channel, True where kept (``TaylorPruningCallback.masks``).
        example_input: an input of ``model`` for tracing (shapes only). Not needed with ``graph``, with
            masks from the callback (they record the input they were traced with), or with a
            LightningModule's ``example_input_array``.
        graph: the dependency graph of ``model`` (e.g. ``callback.graph``), instead of tracing again.
        prefix: the prefix of the mask names when ``model`` is a submodule (e.g. ``"model."``); by
            default found from the names.
        leaf_modules: modules of ``model`` that tracing must not enter, as given to the callback.
        round_to: keep a multiple of this many output channels per Conv/Linear (see :func:`round_masks`).
        scores: importance used by ``round_to`` to choose the channels to revive.
        complete_ties: remove a neuron from every layer it is tied to when the masks remove it from some
            of them only (by default :class:`CompactionError`, see :func:`alive_from_masks`).

    Returns a ``torch.fx.GraphModule`` whose submodules keep their qualified names, in ``model``'s
    training mode and on its device. Its ``state_dict`` holds the compact weights.
    """
    if graph is None:
        model, example_input, prefix, leaf_modules, placement = _trace_target(
            model, masks, example_input, prefix, leaf_modules
        )
        graph = build_dependency_graph(
            model, example_input, placement=placement, prefix=prefix, leaf_modules=leaf_modules
        )
    alive = alive_from_masks(graph, masks, complete_ties)
    if round_to is not None:
        alive = round_alive(graph, alive, round_to, _priority(graph, scores))
    builder = _Builder(model, graph, alive)
    gm = builder.build()
    info = {
        "base_class": class_name(model),
        "fingerprint": architecture_fingerprint(model),
        "masks": {name: _mask_of(graph, name, alive) for name in masks},
        **_trace_spec(graph),
    }
    setattr(gm, COMPACT_META, info)
    # GraphModule.__deepcopy__ restores the attributes listed here (e.g. for EMA or SWA copies)
    gm.meta.setdefault("_user_preserved_attributes", {})[COMPACT_META] = info
    return gm


def _trace_target(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    example_input: Any,
    prefix: str | None,
    leaf_modules: Iterable[str],
) -> tuple[nn.Module, Any, str, list[str], str]:
    """What :func:`compact` traces without a graph: the network (``model``, or the child of a LightningModule
    holding the network), an input of it, the prefix of the mask names in it, its leaf modules and the gate
    placement."""
    trace = masks.trace if isinstance(masks, PruningMasks) else None
    placement = trace["placement"] if trace is not None else "after_bn"  # which layers are gates: the masks' keys
    spec = trace if example_input is None and prefix is None else None  # how to trace, unless told
    if prefix is not None:
        network = model
    elif spec is not None and spec["prefix"] and _submodule(model, spec["prefix"]) is not None:
        network, prefix = _submodule(model, spec["prefix"]), spec["prefix"]  # the LightningModule was given
    else:
        network, prefix = _network_of(model, list(masks))
    if spec is not None and spec["prefix"] == prefix:  # recorded on this very network
        return network, example_from_spec(spec["inputs"], _device(model)), prefix, spec["leaf_modules"], placement
    if example_input is None and spec is not None and not spec["prefix"] and network is not model:
        example_input, leaf_modules = example_from_spec(spec["inputs"], _device(model)), spec["leaf_modules"]
    if example_input is None and isinstance(model, pl.LightningModule):
        example_input = model.example_input_array
    if example_input is None:
        name = type(network).__name__
        if spec is not None and not spec["prefix"]:
            raise CompactionError(
                f"these masks were recorded by tracing the LightningModule, whose input need not be {name}'s: pass "
                f"the LightningModule (or use callback.compact()), or `example_input=` (an input of {name})"
            )
        raise CompactionError(
            f"compact() needs an example input to trace {name}: pass `example_input=` (any input of "
            f"{type(model).__name__} of the right shape), masks from TaylorPruningCallback (they record it), a "
            "LightningModule with `example_input_array`, or `graph=`"
        )
    if network is model:
        return network, example_input, prefix, list(leaf_modules), placement
    leaf_modules = [n[len(prefix):] for n in leaf_modules if n.startswith(prefix)]
    return network, _input_of(network, model, example_input), prefix, leaf_modules, placement


def _submodule(model: nn.Module, prefix: str) -> nn.Module | None:
    try:
        return model.get_submodule(prefix.removesuffix("."))
    except AttributeError:
        return None


def _network_of(model: nn.Module, names: list[str]) -> tuple[nn.Module, str]:
    """The module the mask names refer to, and their prefix in it. A LightningModule whose parameters all
    live in one child holding every masked layer wraps that network: it is the network (a compact model
    fits back in as ``lit.net``). Any other module is the network; the names may carry the prefix of a
    LightningModule (``"net."``), stripped when only that makes them match its layers."""
    heads = {n.split(".", 1)[0] for n in names}
    if len(heads) != 1 or not all("." in n for n in names):
        return model, ""
    head = heads.pop()
    if isinstance(model, pl.LightningModule):
        child = dict(model.named_children()).get(head)
        if child is not None and _num_params(child) == _num_params(model):
            return child, head + "."
        return model, ""
    modules = dict(model.named_modules())
    if not all(n in modules for n in names) and all(n.split(".", 1)[1] in modules for n in names):
        return model, head + "."
    return model, ""


class _Reached(Exception):
    """Stops a forward once the network's input is known."""


def _input_of(network: nn.Module, parent: nn.Module, example: Any) -> Any:
    """What ``network`` receives when ``parent`` runs on ``example`` (in eval mode, without gradients)."""
    seen = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs if kwargs and not args else args)
        raise _Reached

    handle = network.register_forward_pre_hook(hook, with_kwargs=True)
    modes = {m: m.training for m in parent.modules()}
    parent.eval()
    args, kwargs = as_call_args(example)
    try:
        with torch.no_grad():
            parent(*args, **kwargs)
    except _Reached:
        pass
    except Exception as err:
        raise CompactionError(
            f"could not run {type(parent).__name__} on its example input to find the input of its network "
            f"{type(network).__name__} ({err}): pass the network itself and `example_input=`"
        ) from err
    finally:
        handle.remove()
        for m, training in modes.items():
            m.training = training
    if not seen:
        raise CompactionError(
            f"{type(parent).__name__}'s forward does not call {type(network).__name__}: pass the network itself "
            "and `example_input=`"
        )
    return seen[0]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _graph_prefix(graph: DependencyGraph) -> str:
    """The prefix the graph's names carry: ``modules`` maps ``prefix + name`` for every submodule, and
    the network itself is ``prefix + ""``, the shortest key."""
    return min(graph.modules, key=len) if graph.modules else ""


def _trace_spec(graph: DependencyGraph) -> dict[str, Any]:
    """How ``graph`` was traced: the prefix of its names, its user leaf modules, the shape and dtype of
    each input."""
    prefix = _graph_prefix(graph)
    tracer = fx.Tracer()
    nodes = graph.traced.graph.nodes
    leaves = {
        str(n.target)
        for n in nodes
        if n.op == "call_module" and not tracer.is_leaf_module(graph.modules[prefix + str(n.target)], str(n.target))
    }  # call_module targets fx would have entered on its own
    inputs = [_input_spec(n) for n in nodes if n.op == "placeholder"]
    return {"prefix": prefix, "leaf_modules": sorted(leaves), "inputs": inputs}


def _input_spec(node: fx.Node) -> dict[str, Any]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return {"name": node.target, "shape": None, "dtype": None}
    return {"name": node.target, "shape": list(meta.shape), "dtype": str(meta.dtype).removeprefix("torch.")}


def example_from_spec(specs: list[dict[str, Any]], device: torch.device | None = None) -> tuple[Any, ...]:
    """Zero tensors shaped like the inputs a network was traced with."""
    return tuple(
        None if s["shape"] is None else torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"]), device=device)
        for s in specs
    )


def compact_info(model: nn.Module) -> dict[str, Any]:
    """What :func:`compact` recorded on a compact model (base class, fingerprint, masks, inputs)."""
    info = getattr(model, COMPACT_META, None)
    if info is None:
        raise CompactionError(f"{type(model).__name__} is not a compact model made by lightning_prune.compact()")
    return info


class _Builder:
    """Copies ``graph.traced`` node by node into a compact graph (see the module docstring)."""

    def __init__(self, model: nn.Module, graph: DependencyGraph, alive: torch.Tensor) -> None:
        self.src = graph.traced
        self.tags = graph.channel_neurons
        self.neuron_of_node = graph.neuron_of_node
        self.alive = alive
        self.root = copy.deepcopy(model)
        self.modules = dict(self.root.named_modules())
        self.device = _device(model)
        self.calls = Counter(str(n.target) for n in self.src.graph.nodes if n.op == "call_module")
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.kept: dict[fx.Node, torch.Tensor] = {}
        self._cache: dict[tuple[fx.Node, tuple[int, ...]], fx.Node] = {}
        self._buffers = 0
        self._buffer_names: list[str] = []

    # -- driver ------------------------------------------------------------------------------------------
    def build(self) -> fx.GraphModule:
        with torch.no_grad():
            for node in self.src.graph.nodes:
                new = self.visit(node)
                self.env[node] = new
                tag = self.tag(node)
                if tag is not None and node not in self.kept:
                    self.kept[node] = self.kept_positions(tag)
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name=f"Compact{type(self.root).__name__}")
        gm._non_persistent_buffers_set.update(self._buffer_names)
        gm.train(self.root.training)
        return gm

    def tag(self, node: Any) -> ChannelTag | None:
        value = self.tags.get(node) if isinstance(node, fx.Node) else None
        return value if isinstance(value, ChannelTag) else None

    def kept_positions(self, tag: ChannelTag) -> torch.Tensor:
        raw = tag.nodes
        valid = raw != ZERO
        keep = torch.zeros_like(valid)
        keep[valid] = self.alive[self.neuron_of_node[raw[valid]]]
        return torch.nonzero(keep).flatten()

    def visit(self, node: fx.Node) -> fx.Node:
        if node.op in ("placeholder", "get_attr"):
            return self.copy(node)
        if node.op == "output":
            return self.graph.output(self.map_args(node.args[0], full=True))
        if node.op == "call_module":
            handled = self.visit_module(node, self.modules[str(node.target)])
        elif node.op == "call_function":
            handled = self.visit_function(node)
        else:
            handled = self.visit_method(node)
        return handled if handled is not None else self.generic(node)

    # -- helpers -----------------------------------------------------------------------------------------
    def copy(self, node: fx.Node, args: Any = None, kwargs: Any = None, target: Any = None) -> fx.Node:
        new = self.graph.create_node(
            node.op,
            node.target if target is None else target,
            self.map_args(node.args) if args is None else args,
            self.map_args(node.kwargs) if kwargs is None else kwargs,
            name=node.name,
        )
        new.meta = copy.copy(node.meta)
        new.meta.pop("tensor_meta", None)
        return new

    def map_args(self, args: Any, full: bool = False) -> Any:
        def convert(n: fx.Node) -> fx.Node:
            if full and self.tag(n) is not None:
                return self.full(n)
            return self.env[n]

        return fx.node.map_arg(args, convert)

    def buffer(self, tensor: torch.Tensor) -> fx.Node:
        name = f"_compact_index_{self._buffers}"
        self._buffers += 1
        self.root.register_buffer(name, tensor.to(self.device), persistent=False)
        self._buffer_names.append(name)
        return self.graph.get_attr(name)

    def gather(self, value: fx.Node, have: torch.Tensor, want: torch.Tensor, dim: int) -> fx.Node:
        """``value`` holds the channels at positions ``have``: return those at ``want`` (zeros where missing)."""
        if have.numel() == want.numel() and torch.equal(have, want):
            return value
        lookup = {p: i for i, p in enumerate(have.tolist())}
        index = [lookup.get(p, -1) for p in want.tolist()]
        if -1 in index:
            zero = have.numel()
            index_t = torch.tensor([zero if i < 0 else i for i in index], dtype=torch.long)
            return self.graph.call_function(gather_channels, (value, self.buffer(index_t), dim))
        if index and index == list(range(index[0], index[0] + len(index))):
            return self.graph.call_method("narrow", (value, dim, index[0], len(index)))
        return self.graph.call_method("index_select", (value, dim, self.buffer(torch.tensor(index, dtype=torch.long))))

    def at(self, node: fx.Node, want: torch.Tensor) -> fx.Node:
        """The compact value of ``node`` with exactly the channels at positions ``want``."""
        key = (node, tuple(want.tolist()))
        if key not in self._cache:
            tag = self.tag(node)
            assert tag is not None
            self._cache[key] = self.gather(self.env[node], self.kept[node], want, tag.dim)
        return self._cache[key]

    def full(self, node: fx.Node) -> fx.Node:
        tag = self.tag(node)
        return self.at(node, torch.arange(tag.size))

    def tag_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if self.tag(n) is not None]

    # -- generic: channel-wise ops keep compact tensors, anything else sees full-width ones ----------------
    def generic(self, node: fx.Node) -> fx.Node:
        out = self.tag(node)
        inputs = self.tag_inputs(node)
        if not inputs:
            return self.copy(node)
        if out is not None and len(inputs) == 1:
            source = self.tag(inputs[0])
            if source.size == out.size and torch.equal(source.nodes, out.nodes):
                self.kept[node] = self.kept[inputs[0]]
                return self.copy(node)  # channel-wise (activation, pooling, scaling, spatial slicing...)
        new = self.copy(node, self.map_args(node.args, full=True), self.map_args(node.kwargs, full=True))
        if out is not None:
            kept = self.kept_positions(out)
            self.kept[node] = kept
            return self.gather(new, torch.arange(out.size), kept, out.dim)
        return new

    # -- modules -----------------------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, module: nn.Module) -> fx.Node | None:
        name = str(node.target)
        out = self.tag(node)
        x = node.args[0] if node.args else None
        x_tag = self.tag(x)
        if self.calls[name] != 1 or out is None or x_tag is None or len(node.args) != 1 or node.kwargs:
            return None
        out_kept = self.kept_positions(out)
        if out_kept.numel() == 0 and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            return self.removed_layer(node, module, x, out)
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and x_tag.dim == 1:
            if module.groups == 1:
                in_kept = self.kept[x]
                if in_kept.numel() == 0:
                    return None
                self.root.set_submodule(name, _slice_dense(module, in_kept, out_kept))
                self.kept[node] = out_kept
                return self.copy(node, (self.env[x],), {})
            if module.groups == module.in_channels == module.out_channels:
                self.root.set_submodule(name, _slice_depthwise(module, out_kept))
                self.kept[node] = out_kept
                return self.copy(node, (self.at(x, out_kept),), {})
            return None
        if isinstance(module, nn.Linear) and x_tag.dim == x_tag.ndim - 1:
            self.root.set_submodule(name, _slice_dense(module, self.kept[x], out_kept))
            self.kept[node] = out_kept
            return self.copy(node, (self.env[x],), {})
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and x_tag.dim == 1:
            self.root.set_submodule(name, _slice_batchnorm(module, out_kept))
            self.kept[node] = out_kept
            return self.copy(node, (self.at(x, out_kept),), {})
        return None

    def removed_layer(self, node: fx.Node, module: nn.Module, x: fx.Node, out: ChannelTag) -> fx.Node:
        """Every output channel removed (DenseNet layers can lose all of theirs): a zero-width tensor."""
        self.kept[node] = torch.zeros(0, dtype=torch.long)
        name = str(node.target)
        channelwise = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
        )
        if channelwise or self.kept[x].numel() == 0:  # same shape as the input
            return self.graph.call_method("narrow", (self.env[x], out.dim, 0, 0))
        # run a one-channel stand-in only for the output's shape (stride, padding, dilation)
        one = torch.zeros(1, dtype=torch.long)
        layer = _slice_dense(module, self.kept[x], one)
        self.root.set_submodule(name, layer)
        value = self.copy(node, (self.env[x],), {})
        return self.graph.call_method("narrow", (value, out.dim, 0, 0))

    # -- functions and methods ---------------------------------------------------------------------------
    def visit_function(self, node: fx.Node) -> fx.Node | None:
        fn = node.target
        if fn in _ADD or fn in _SUB:
            return self.add(node, subtract=fn in _SUB)
        if fn in _MUL:
            return self.mul(node)
        if fn is torch.cat or fn is torch.concat:
            return self.cat(node)
        if fn is torch.nn.functional.pad:
            return self.pad(node)
        if fn is operator.getitem:
            return self.getitem(node)
        if fn is getattr:
            return self.shape_query(node, full=node.args[1] in ("shape",))
        return None

    def visit_method(self, node: fx.Node) -> fx.Node | None:
        method = node.target
        if method in _ADD_METHODS or method in _SUB_METHODS:
            return self.add(node, subtract=method in _SUB_METHODS)
        if method in _MUL_METHODS:
            return self.mul(node)
        if method in ("view", "reshape"):
            return self.reshape(node)
        if method == "size":
            return self.size(node)
        if method == "numel":
            return self.shape_query(node, full=True)
        return None

    def binary_tags(self, node: fx.Node) -> tuple[ChannelTag, fx.Node, fx.Node] | None:
        """The output tag and the two operands of an element-wise op whose channels meet one by one (the
        graph tied them); else None, and the op runs on full-width inputs."""
        out = self.tag(node)
        args = node.args[:2]
        if out is None or len(args) != 2 or not all(self.tag(a) is not None for a in args):
            return None
        if not (self.tag(args[0]).aligned(self.tag(args[1])) and out.dim == self.tag(args[0]).dim):
            return None
        return out, args[0], args[1]

    def add(self, node: fx.Node, subtract: bool) -> fx.Node | None:
        found = self.binary_tags(node)
        if found is None or len(node.args) != 2 or node.kwargs:
            return None
        out, a, b = found
        kept = self.kept_positions(out)
        self.kept[node] = kept
        same_a, same_b = torch.equal(self.kept[a], kept), torch.equal(self.kept[b], kept)
        shape_a, shape_b = _shape(a), _shape(b)
        same_shape = shape_a is not None and shape_a == shape_b
        if same_a and same_b:
            return self.copy(node, (self.env[a], self.env[b]), {}, target=_OUT_OF_PLACE.get(node.target, node.target))
        if same_shape and (same_a or (same_b and not subtract)):
            main, other = (a, b) if same_a else (b, a)
            index = self.index_of(self.kept[other], kept)
            kwargs = {"alpha": -1} if subtract else {}
            return self.graph.call_method("index_add", (self.env[main], out.dim, self.buffer(index), self.env[other]), kwargs)
        fn = operator.sub if subtract else operator.add
        return self.graph.call_function(fn, (self.at(a, kept), self.at(b, kept)))

    def index_of(self, positions: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
        lookup = {p: i for i, p in enumerate(within.tolist())}
        return torch.tensor([lookup[p] for p in positions.tolist()], dtype=torch.long)

    def mul(self, node: fx.Node) -> fx.Node | None:
        found = self.binary_tags(node)
        if found is None or len(node.args) != 2 or node.kwargs:
            return None
        out, a, b = found
        if out.size != self.tag(a).size or out.size != self.tag(b).size:
            return None
        kept = self.kept_positions(out)
        self.kept[node] = kept
        target = _OUT_OF_PLACE.get(node.target, node.target)
        return self.copy(node, (self.at(a, kept), self.at(b, kept)), {}, target=target)

    def cat(self, node: fx.Node) -> fx.Node | None:
        out = self.tag(node)
        parts = node.args[0]
        if out is None or not isinstance(parts, (list, tuple)) or not all(self.tag(p) is not None for p in parts):
            return None
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        kept = self.kept_positions(out)
        self.kept[node] = kept
        if dim % out.ndim == out.dim and sum(self.tag(p).size for p in parts) == out.size:
            offsets, joined = 0, []
            for p in parts:
                joined.append(self.kept[p] + offsets)
                offsets += self.tag(p).size
            if torch.equal(torch.cat(joined), kept):
                return self.copy(node)
            del self.kept[node]
            return None
        return self.copy(node, (type(parts)(self.at(p, kept) for p in parts), *self.map_args(node.args[1:])))

    def pad(self, node: fx.Node) -> fx.Node | None:
        out, x = self.tag(node), node.args[0]
        x_tag = self.tag(x)
        pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
        if out is None or x_tag is None or not isinstance(pad, (list, tuple)) or out is x_tag:
            return None
        pairs = [list(pad[i : i + 2]) for i in range(0, len(pad), 2)]
        channel = x_tag.ndim - 1 - x_tag.dim
        if channel >= len(pairs) or not all(isinstance(p, int) for p in pairs[channel]):
            return None
        left = pairs[channel][0]
        pairs[channel] = [0, 0]
        flat = [p for pair in pairs for p in pair]
        value = self.env[x]
        if any(flat):
            args = list(self.map_args(node.args))
            kwargs = dict(self.map_args(node.kwargs))
            if "pad" in kwargs:
                kwargs["pad"] = type(pad)(flat)
            else:
                args[1] = type(pad)(flat)
            value = self.copy(node, tuple(args), kwargs)
        kept = self.kept_positions(out)
        self.kept[node] = kept
        return self.gather(value, self.kept[x], kept - left, x_tag.dim)

    def getitem(self, node: fx.Node) -> fx.Node | None:
        x, index = node.args
        out, x_tag = self.tag(node), self.tag(x)
        if out is None or x_tag is None or out is x_tag:
            return None
        idx = index if isinstance(index, tuple) else (index,)
        if Ellipsis in idx:
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (x_tag.ndim - len(idx) + 1) + idx[at + 1 :]
        if len(idx) <= x_tag.dim or not isinstance(idx[x_tag.dim], slice):
            return None
        positions = torch.arange(x_tag.size)[idx[x_tag.dim]]
        rest = idx[: x_tag.dim] + (slice(None),) + idx[x_tag.dim + 1 :]
        value = self.env[x]
        if any(s != slice(None) for s in rest):
            value = self.copy(node, (value, rest), {})
        kept = self.kept_positions(out)
        self.kept[node] = kept
        return self.gather(value, self.kept[x], positions[kept], x_tag.dim)

    def reshape(self, node: fx.Node) -> fx.Node | None:
        x = node.args[0]
        out, x_tag = self.tag(node), self.tag(x)
        in_shape, out_shape = _shape(x), _shape(node)
        if out is None or x_tag is None or in_shape is None or out_shape is None or out is x_tag:
            return None
        if x_tag.dim != 1 or len(out_shape) < 2:
            return None
        if tuple(out_shape[:2]) == tuple(in_shape[:2]):
            width = self.kept[x].numel()
        elif len(out_shape) == 2 and out_shape[1] == math.prod(in_shape[1:]):
            width = self.kept[x].numel() * math.prod(in_shape[2:])
        else:
            return None
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        sizes = list(self.map_args(tuple(sizes)))
        if len(sizes) < 2:
            return None
        if not (isinstance(sizes[1], int) and sizes[1] == -1):
            if any(isinstance(s, int) and s == -1 for i, s in enumerate(sizes) if i != 1):
                return None
            sizes[1] = width
        self.kept[node] = self.kept_positions(out)
        return self.copy(node, (self.env[x], *sizes), {})

    def size(self, node: fx.Node) -> fx.Node | None:
        x = node.args[0]
        tag = self.tag(x)
        if tag is None:
            return None
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if isinstance(dim, int) and dim % tag.ndim != tag.dim:
            return self.copy(node)
        return self.shape_query(node, full=True)

    def shape_query(self, node: fx.Node, full: bool) -> fx.Node | None:
        """Shapes, as the original code expects them: of the full-width tensor."""
        if not self.tag_inputs(node):
            return None
        if not full:
            return self.copy(node)
        return self.copy(node, self.map_args(node.args, full=True), self.map_args(node.kwargs, full=True))


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _param(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=like.requires_grad)


# The layers below belong to the builder's own deep copy of the model: they are sliced in place.


def _slice_dense(layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor) -> nn.Module:
    """Keep rows ``outputs`` and columns ``inputs`` of a Conv (groups == 1) or Linear weight, and its bias."""
    dev = layer.weight.device
    layer.weight = _param(layer.weight[outputs.to(dev)][:, inputs.to(dev)], layer.weight)
    if layer.bias is not None:
        layer.bias = _param(layer.bias[outputs.to(dev)], layer.bias)
    if isinstance(layer, nn.Linear):
        layer.in_features, layer.out_features = inputs.numel(), outputs.numel()
    else:
        layer.in_channels, layer.out_channels = inputs.numel(), outputs.numel()
    return layer


def _slice_depthwise(conv: nn.modules.conv._ConvNd, channels: torch.Tensor) -> nn.Module:
    idx = channels.to(conv.weight.device)
    conv.weight = _param(conv.weight[idx], conv.weight)
    if conv.bias is not None:
        conv.bias = _param(conv.bias[idx], conv.bias)
    conv.in_channels = conv.out_channels = conv.groups = channels.numel()
    return conv


def _slice_batchnorm(bn: nn.modules.batchnorm._BatchNorm, channels: torch.Tensor) -> nn.Module:
    for attr in ("weight", "bias"):
        value = getattr(bn, attr)
        if isinstance(value, nn.Parameter):
            setattr(bn, attr, _param(value[channels.to(value.device)], value))
    for attr in ("running_mean", "running_var"):
        value = getattr(bn, attr)
        if isinstance(value, torch.Tensor):
            setattr(bn, attr, value[channels.to(value.device)].clone())
    bn.num_features = channels.numel()
    return bn
