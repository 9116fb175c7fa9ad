"""The position-aware computational graph of a Llama-family model that edge attribution scores (issue 26).

Nodes are components at a token role: senders write to the residual stream (the input embedding, each attention
head's output z_h W_O[:, h], each MLP's output); receivers read it (a head's query, a KV group's key and value, an
MLP's input, the logits at `last`). The residual stream is position-local, so an edge (sender, receiver) lives at
one role's tokens: the sender's output there reaches the receiver's input there. Attention moves information
across positions inside a head (its keys/values at one role, its query at another), i.e. between edges of
different roles. A sender feeds a receiver when it runs before it: heads of layer l and the MLP of layer l write
after the heads of layer l read, the MLP of layer l reads after the heads of layer l wrote."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from etk.models.arch import Dims


class Sender(NamedTuple):
    kind: str  # "embed" | "head" | "mlp"
    layer: int  # -1 for the embedding
    index: int  # head index (0 for embed and mlp)


class Receiver(NamedTuple):
    kind: str  # "q" | "k" | "v" | "mlp" | "logits"
    layer: int  # n_layers for the logits
    index: int  # query head (q), KV group (k, v), 0 otherwise


@dataclass(frozen=True)
class EdgeGraph:
    """Senders and receivers of a model in a fixed order (the axes of every score tensor [S, V] per role), and which
    (sender, receiver) pairs are edges (`valid` [S, V]: the sender runs before the receiver reads)."""

    dims: Dims
    senders: tuple[Sender, ...]
    receivers: tuple[Receiver, ...]

    @classmethod
    def of(cls, dims: Dims) -> "EdgeGraph":
        s = [Sender("embed", -1, 0)]
        r: list[Receiver] = []
        for layer in range(dims.n_layers):
            r += [Receiver("q", layer, h) for h in range(dims.n_heads)]
            r += [Receiver(kind, layer, g) for kind in ("k", "v") for g in range(dims.n_kv_heads)]
            s += [Sender("head", layer, h) for h in range(dims.n_heads)]
            r.append(Receiver("mlp", layer, 0))
            s.append(Sender("mlp", layer, 0))
        r.append(Receiver("logits", dims.n_layers, 0))
        return cls(dims, tuple(s), tuple(r))

    @property
    def valid(self) -> torch.Tensor:
        """[S, V] bool: the sender's output is part of the receiver's input."""
        return torch.tensor([[_order(s) < _read_order(r) for r in self.receivers] for s in self.senders])

    @property
    def n_edges_per_role(self) -> int:
        return int(self.valid.sum())


def _order(s: Sender) -> float:
    """When a sender writes: the embedding first, the heads of layer l at l + 0.5, the MLP of layer l at l + 0.9
    (before layer l + 1 reads)."""
    return -1.0 if s.kind == "embed" else s.layer + (0.5 if s.kind == "head" else 0.9)


def _read_order(r: Receiver) -> float:
    """When a receiver reads: the heads of layer l at l (before the heads write), the MLP of layer l at l + 0.75
    (after them), the logits after everything."""
    return r.layer + (0.75 if r.kind == "mlp" else 0.0) if r.kind != "logits" else float("inf")
