"""Physical compaction: rebuild a masked network without its removed neurons.

The dependency graph (:func:`lightning_prune.build_dependency_graph`, on top of ``torch.fx``) tags
every channel of every traced value with a channel node, and every node with a neuron. Given the
neurons still alive, each value of the compact network holds only its *kept* channels: the positions
whose node is not structurally zero (``ZERO``, the padding of option-A shortcuts) and whose neuron is
alive. Every other channel is exactly zero in the masked network, so dropping it changes nothing.

The traced graph is copied node by node, each op rewritten by the ``compact`` half of its rule
(:mod:`lightning_prune.ops`):

* Conv (``groups == 1``), Linear: weights sliced on both the kept inputs and the kept outputs; a grouped
  Conv keeps its groups, with the same kept input channels inside every group.
* Depthwise Conv, BatchNorm: sliced on the kept channels (an input that lacks one of them, e.g. a
  zero-padded one, is filled with zeros first).
* Additions and products tying channels: every operand is brought to the output's kept channels
  (``index_add`` where one operand already has them, a zero-filled gather otherwise).
* Channel concatenation (DenseNet), flatten before a Linear, ``permute``/``transpose`` (channels-last
  blocks) and other channel-wise ops (activations, pooling, scaling by a number) work on the compact
  tensors as they are.
* Channel zero-padding (option-A shortcuts) and channel slicing become gathers of the kept channels.
* A channel split (``chunk``, ``split``, ``tensor_split``) splits the kept channels at each part's count of them;
  a channel shuffle (ShuffleNet's ``view``/``transpose``/``view``) becomes a gather in the shuffled order.
* ``view``/``reshape`` get the size of their channel dimension rewritten.
* Anything else (an op without a rule or that its rule declines, a module called twice, a grouped
  convolution, the network's outputs) gets its inputs rebuilt at full width, zeros at the removed
  channels, so the result is exact whatever the op does.
"""

from __future__ import annotations

import copy
import hashlib
import math
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
from lightning_prune.ops import find_op_rule
from lightning_prune.ops.elementwise import _slice_attribute
from lightning_prune.ops.registry import architecture_modules

COMPACT_META = "_lightning_prune_compact"

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
    lines = [f"{name}:{cls.__name__}" for name, cls in architecture_modules(model)]
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
    builder = CompactBuilder(model, graph, alive)
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


def _trace_spec(graph: DependencyGraph) -> dict[str, Any]:
    """How ``graph`` was traced: the prefix of its names, its user leaf modules, the shape and dtype of
    each input."""
    prefix = graph.prefix
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
    """Zero tensors shaped like the inputs a network was traced with; trailing inputs that were no tensors are
    left out, so they take their defaults (timm's ``is_causal=False``)."""
    specs = list(specs)
    while specs and specs[-1]["shape"] is None:
        specs.pop()
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


class CompactBuilder:
    """Copies ``graph.traced`` node by node into a compact graph, each op through its rule (see the module
    docstring)."""

    def __init__(self, model: nn.Module, graph: DependencyGraph, alive: torch.Tensor) -> None:
        self.src = graph.traced
        prefix = graph.prefix
        self.readers = {name[len(prefix):]: neurons for name, neurons in graph.readers.items()}
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
        """Positions of the channels of ``tag`` the compact network keeps (alive and not structurally zero)."""
        raw = tag.nodes
        valid = raw != ZERO
        keep = torch.zeros_like(valid)
        keep[valid] = self.alive[self.neuron_of_node[raw[valid]]]
        return torch.nonzero(keep).flatten()

    def kept_inputs(self, layer: str) -> torch.Tensor:
        """Positions of the input features of Conv/Linear ``layer`` (a traced name) that the compact network keeps."""
        neurons = self.readers[layer]
        keep = torch.zeros(neurons.numel(), dtype=torch.bool)
        valid = neurons >= 0
        keep[valid] = self.alive[neurons[valid]]
        return torch.nonzero(keep).flatten()

    def visit(self, node: fx.Node) -> fx.Node:
        if node.op == "get_attr" and (tag := self.tag(node)) is not None:  # a parameter writing channels
            kept = self.kept_positions(tag)
            if _slice_attribute(self, node, tag.dim, kept):
                return self.copy(node)
            return self.gather(self.copy(node), torch.arange(tag.size), kept, tag.dim)
        if node.op in ("placeholder", "get_attr"):
            return self.copy(node)
        if node.op == "output":
            return self.graph.output(self.map_args(node.args[0], full=True))
        rule = find_op_rule(node, self.modules)
        handled = rule.compact(self, node) if rule is not None else None
        return handled if handled is not None else self.generic(node)

    # -- helpers -----------------------------------------------------------------------------------------
    def copy(self, node: fx.Node, args: Any = None, kwargs: Any = None, target: Any = None) -> fx.Node:
        """``node`` in the compact graph, with its inputs' compact values unless ``args``/``kwargs`` are given."""
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
        """``args`` with every traced value replaced by its compact value (``full``: rebuilt at full width)."""
        def convert(n: fx.Node) -> fx.Node:
            if full and self.tag(n) is not None:
                return self.full(n)
            return self.env[n]

        return fx.node.map_arg(args, convert)

    def buffer(self, tensor: torch.Tensor) -> fx.Node:
        """A constant index tensor of the compact model (a non-persistent buffer)."""
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
        """The value of ``node`` at full width: zeros at the removed channels."""
        tag = self.tag(node)
        return self.at(node, torch.arange(tag.size))

    def layer(self, node: fx.Node) -> nn.Module | None:
        """The module (of the builder's own copy of the model) that ``node`` calls, when it can be sliced in
        place: called once, on one traced input and nothing else, with an output that has channels."""
        name = str(node.target)
        if self.calls[name] != 1 or self.tag(node) is None or len(node.args) != 1 or node.kwargs:
            return None
        return self.modules[name] if self.tag(node.args[0]) is not None else None

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
