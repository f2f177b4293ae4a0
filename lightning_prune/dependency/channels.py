"""Channel nodes and their ties.

Every channel of every traced tensor carries a *node* id. Layers that create channels (Conv, Linear)
allocate fresh nodes; channel-wise layers (BatchNorm, activations, pooling) pass them through;
residual additions tie the nodes of their operands one by one in a union-find. After tracing, one
union-find class is one prunable neuron: removing it zeroes every channel that carries one of its nodes.
Node id ``ZERO`` marks a channel that is structurally zero (the zero padding of option-A shortcuts).

Removed channels are exactly zero in the masked network, and the compact network drops them. A few
element-wise functions break this (``sigmoid(0) = 0.5``, ``x + 3``): their output is tagged
``nonzero`` (its removed channels hold some finite value, not zero). Such a value is exact to drop only
where it is multiplied by a tied value that *is* zero there (a squeeze-and-excitation gate times the
features it gates). When it reaches any op whose rule does not say it handles such values
(``OpRule.takes_nonzero``), its channels are blocked: never removed, it is then an ordinary value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

ZERO = -1


@dataclass(frozen=True)
class ChannelTag:
    """Node ids of one tensor's channels, and which dimension holds them. ``nonzero``: None when the
    removed channels are exactly zero, else the op that made them non-zero (``"sigmoid in layer1.se"``)."""

    nodes: torch.Tensor  # int64, one id per channel (or ZERO)
    dim: int
    ndim: int
    nonzero: str | None = None

    def moved(self, nodes: torch.Tensor | None = None, dim: int | None = None, ndim: int | None = None) -> ChannelTag:
        """The same channels (and ``nonzero`` flag) with other node ids, channel dimension or rank."""
        changes = {"nodes": nodes, "dim": dim, "ndim": ndim}
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def size(self) -> int:
        return self.nodes.numel()

    def aligned(self, other: ChannelTag) -> bool:
        """Whether an element-wise op meets this tensor's channels with ``other``'s one by one: broadcasting
        aligns dimensions from the right, so the ranks and channel dimensions must be the same (a bias
        ``(1, H, N, N)`` added to scores ``(B, H, P, N, N)`` meets its ``H`` with dimension 2, not 1)."""
        return self.size == other.size and self.dim == other.dim and self.ndim == other.ndim


class ChannelNodes:
    """Allocator and union-find of channel nodes, with reasons why some can't be pruned."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.blocked: dict[int, str] = {}  # node -> first reason it can't be pruned
        self.causes: dict[str, list[int]] = {}  # reason -> every node it blocks (a node may have several)
        self.residual: set[int] = set()  # nodes tied by an addition
        self.merged: dict[int, set[int]] = {}  # node -> nodes whose values were added into it
        self.scaling: set[int] = set()  # nodes made non-zero where removed (they only scale other channels)

    def __len__(self) -> int:
        return len(self._parent)

    def fresh(self, n: int, blocked: str | None = None) -> torch.Tensor:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        nodes = torch.arange(start, start + n, dtype=torch.long)
        if blocked is not None:
            self.block(nodes, blocked)
        return nodes

    def constants_for_zero(self, nodes: torch.Tensor, reason: str) -> torch.Tensor:
        """``nodes`` after an op that turns structurally zero channels (``ZERO``) into constants (a bias, a
        sigmoid): those get fresh nodes, blocked for ``reason``."""
        zero = nodes == ZERO
        if not zero.any():
            return nodes
        nodes = nodes.clone()
        nodes[zero] = self.fresh(int(zero.sum()), reason)
        return nodes

    def find(self, x: int) -> int:
        parent = self._parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: torch.Tensor, b: torch.Tensor, residual: bool = False) -> None:
        """Tie ``a[i]`` with ``b[i]`` for every i (ZERO entries tie nothing)."""
        for x, y in zip(a.tolist(), b.tolist()):
            if x == ZERO or y == ZERO:
                continue
            if residual:
                self.residual.update((x, y))
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self._parent[ry] = rx

    def record_merge(self, kept: torch.Tensor, other: torch.Tensor) -> None:
        """``other[i]`` was added into the channel that goes on carrying node ``kept[i]``."""
        for k, o in zip(kept.tolist(), other.tolist()):
            if k != ZERO and o != ZERO and k != o:
                self.merged.setdefault(k, set()).update({o}, self.merged.get(o, ()))

    def reaching(self, nodes: torch.Tensor) -> set[int]:
        """The nodes themselves and every node added into them upstream."""
        found: set[int] = set()
        for x in nodes.tolist():
            if x != ZERO:
                found.add(x)
                found.update(self.merged.get(x, ()))
        return found

    def block(self, nodes: torch.Tensor, reason: str) -> None:
        ids = [x for x in nodes.tolist() if x != ZERO]
        for x in ids:
            self.blocked.setdefault(x, reason)
        self.causes.setdefault(reason, []).extend(ids)

    def classes(self) -> tuple[torch.Tensor, int]:
        """Dense class id for every node (0..K-1), and K."""
        roots = torch.tensor([self.find(i) for i in range(len(self._parent))], dtype=torch.long)
        uniq, dense = torch.unique(roots, return_inverse=True)
        return dense, uniq.numel()
