"""Dynamic-weight personalisation blocks: LHUC and PEPNet's Gate NU, EPNet and PPNet.

LHUC (learning hidden unit contributions; Swietojanski et al. 2016, as used for
recommendation in Kuaishou's PPNet): a hidden layer ``h`` ``(B, H)`` is
rescaled per unit from a personalisation vector ``u`` ``(B, P)``::

    h' = s · sigmoid(W u + b) ⊙ h          s = 2: the scale lies in (0, 2)

``W`` and ``b`` start at zero, so every scale starts at exactly 1.

PEPNet (Chang et al. 2023, "PEPNet: Parameter and Embedding Personalized
Network for Infusing with Personalized Prior Information", KDD)::

    Gate NU:  δ(x) = γ · sigmoid(W_2 ReLU(W_1 x + b_1) + b_2)          γ = 2
    EPNet:    δ_domain = GateNU([E(F_d); sg(E)])                   (B, D_E)
              O_ep     = δ_domain ⊙ E                              (B, D_E)
    PPNet:    δ_t^l    = GateNU_t^l([E(F_u); E(F_i); sg(O)])       (B, H_l)   per task t, hidden layer l
              H_t^l    = δ_t^l ⊙ f(W_t^l H_t^{l-1} + b_t^l)        (B, H_l)
              logit_t  = w_t · H_t^L + b_t

``E`` are the general (flattened) embeddings, ``E(F_d)`` the domain-side
features, ``E(F_u)``/``E(F_i)`` user/item id embeddings and ``sg`` the
stop-gradient: the gates read the general embeddings but never send gradient
back into them through the gate input (EPNet and PPNet apply it themselves).
PPNet here gives each task its own gate per layer (the paper splits one gate's
output into T parts; the per-task form is the same with an unshared hidden
layer) and scales each hidden layer's output after its activation.

``scaled_mlp`` runs an ``MLP`` with such per-layer scales; LHUC, POSO and
PPNet all use it, so their gated networks stay plain ``rec_dist.layers.MLP``s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.layers.mlp import MLP


def _blocks(mlp: MLP) -> list[list[nn.Module]]:
    """The MLP's layers split at each Linear: hidden blocks (Linear, [BN], act, [Dropout]), then [output Linear]."""
    blocks: list[list[nn.Module]] = []
    for module in mlp.layers:
        if isinstance(module, nn.Linear):
            blocks.append([module])
        else:
            blocks[-1].append(module)
    return blocks


def mlp_hidden_sizes(mlp: MLP) -> list[int]:
    """Widths of the MLP's hidden layers (those with an activation; not the optional output layer)."""
    return [block[0].out_features for block in _blocks(mlp) if len(block) > 1]


def last_linear(mlp: MLP) -> nn.Linear | None:
    """The MLP's last Linear (its output layer if it has one, else its last hidden layer)."""
    linears = [m for m in mlp.layers if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def combine_scales(*lists: Sequence[torch.Tensor | None] | None) -> list[torch.Tensor | None] | None:
    """Per-layer product of several lists of scales (None entries and None lists are ones)."""
    present = [s for s in lists if s is not None]
    if not present:
        return None
    out: list[torch.Tensor | None] = [None] * len(present[0])
    for scales in present:
        if len(scales) != len(out):
            raise ValueError(f"combine_scales: lists of {len(out)} and {len(scales)} layers")
        for i, s in enumerate(scales):
            if s is not None:
                out[i] = s if out[i] is None else out[i] * s
    return out


def scaled_mlp(mlp: MLP, x: torch.Tensor, scales: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """``mlp(x)`` with hidden layer l's output (after activation and dropout) multiplied by ``scales[l]``.

    ``x`` ``(B, N)``; ``scales``: one ``(B, H_l)`` (or broadcastable) tensor or None per hidden layer.
    """
    if scales is None:
        return mlp(x)
    blocks = _blocks(mlp)
    hidden = [b for b in blocks if len(b) > 1]
    if len(scales) != len(hidden):
        raise ValueError(f"scaled_mlp: {len(scales)} scales for an MLP with {len(hidden)} hidden layers")
    layer = 0
    for block in blocks:
        for module in block:
            x = module(x)
        if len(block) > 1:
            if scales[layer] is not None:
                x = x * scales[layer]  # (B, H_l)
            layer += 1
    return x


class LHUC(nn.Module):
    """LHUC scaling of one hidden layer; see the module docstring.

    Args:
        personal_features: P, the size of the personalisation vector ``u``.
        hidden_features: H, the width of the hidden layer it scales.
        scale: s, the upper bound of the scale (2 in LHUC).

    ``forward(h (B, H), u (B, P)) -> (B, H)``; ``gate(u) -> (B, H)``.
    """

    def __init__(self, personal_features: int, hidden_features: int, scale: float = 2.0) -> None:
        super().__init__()
        if personal_features <= 0 or hidden_features <= 0:
            raise ValueError(
                f"LHUC: personal_features and hidden_features must be positive, got {personal_features}, "
                f"{hidden_features}"
            )
        self.scale = scale
        self.linear = nn.Linear(personal_features, hidden_features)
        nn.init.zeros_(self.linear.weight)  # every scale starts at s * sigmoid(0) = 1 for s = 2
        nn.init.zeros_(self.linear.bias)

    def gate(self, u: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.linear(u))  # (B, H)

    def forward(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return h * self.gate(u)  # (B, H)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class GateNU(nn.Module):
    """PEPNet's Gate Neural Unit ``γ · sigmoid(W_2 act(W_1 x + b_1) + b_2)``; also POSO's gate (γ = C).

    Args:
        in_features: size of the gate input.
        out_features: size of the gate (one scale per unit it multiplies).
        hidden: width of its hidden layer (None: ``out_features``).
        gamma: γ, the upper bound of the scale (2 in PEPNet).
        activation: hidden activation (``rec_dist.layers.ACTIVATIONS``).

    ``forward(x (B, in_features)) -> (B, out_features)`` in ``(0, γ)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int | None = None,
        gamma: float = 2.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"GateNU: gamma must be positive, got {gamma}")
        self.gamma = gamma
        self.mlp = MLP(in_features, [hidden or out_features], activation=activation, output_dim=out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * torch.sigmoid(self.mlp(x))  # (B, out_features)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


class EPNet(nn.Module):
    """PEPNet's embedding personalisation; see the module docstring.

    Args:
        domain_features: size of the domain-side input ``E(F_d)``.
        embedding_features: D_E, size of the flattened general embeddings ``E``.
        gamma: γ of the Gate NU.
        hidden: hidden width of the Gate NU (None: D_E).

    ``forward(embeddings (B, D_E), domain (B, D_d)) -> (B, D_E)``. The gate reads
    ``embeddings.detach()``: the general embeddings get gradient only through
    the scaled path ``δ ⊙ E``.
    """

    def __init__(
        self, domain_features: int, embedding_features: int, gamma: float = 2.0, hidden: int | None = None
    ) -> None:
        super().__init__()
        if domain_features <= 0 or embedding_features <= 0:
            raise ValueError(
                f"EPNet: domain_features and embedding_features must be positive, got {domain_features}, "
                f"{embedding_features}"
            )
        self.gate = GateNU(domain_features + embedding_features, embedding_features, hidden=hidden, gamma=gamma)

    def forward(self, embeddings: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        delta = self.gate(torch.cat([domain, embeddings.detach()], dim=1))  # (B, D_E)
        return delta * embeddings  # (B, D_E)


class PPNet(nn.Module):
    """PEPNet's parameter personalisation: one gated DNN per task; see the module docstring.

    Args:
        in_features: size of each tower's input.
        num_tasks: T, the number of towers.
        hidden: hidden widths of each tower (at least one: the gates scale them).
        id_features: size of the id part of the gate input ``[E(F_u); E(F_i)]``.
        general_features: size of the general part of the gate input (read with stop-gradient).
        gamma: γ of the Gate NUs.
        gate_hidden: hidden width of each Gate NU (None: the width of the layer it gates).
        activation, dropout, batchnorm: of the towers (``rec_dist.layers.MLP``).
        output_dim: size of each tower's output (1: one logit).

    ``forward(inputs, ids (B, D_id), general (B, D_g)) -> [(B, output_dim)] * T``; ``inputs``
    is one ``(B, in_features)`` tensor for every tower or a list of T of them.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        hidden: Sequence[int],
        id_features: int,
        general_features: int,
        gamma: float = 2.0,
        gate_hidden: int | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        output_dim: int = 1,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden:
            raise ValueError("PPNet: needs at least one hidden layer per tower (its gates scale the hidden layers)")
        if num_tasks <= 0:
            raise ValueError(f"PPNet: num_tasks must be positive, got {num_tasks}")
        gate_in = id_features + general_features
        if gate_in <= 0:
            raise ValueError("PPNet: the gate input is empty (id_features + general_features = 0)")
        self.num_tasks = num_tasks
        self.towers = nn.ModuleList(
            MLP(in_features, hidden, activation=activation, dropout=dropout, batchnorm=batchnorm, output_dim=output_dim)
            for _ in range(num_tasks)
        )
        self.gates = nn.ModuleList(
            nn.ModuleList(GateNU(gate_in, h, hidden=gate_hidden, gamma=gamma) for h in hidden) for _ in range(num_tasks)
        )

    def task_modules(self, task: int) -> list[nn.Module]:
        """The modules of task ``task``: its tower and its gates."""
        return [self.towers[task], self.gates[task]]

    def forward(
        self, inputs: torch.Tensor | Sequence[torch.Tensor], ids: torch.Tensor, general: torch.Tensor
    ) -> list[torch.Tensor]:
        if isinstance(inputs, torch.Tensor):
            inputs = [inputs] * self.num_tasks
        gate_in = torch.cat([ids, general.detach()], dim=1)  # (B, D_id + D_g), stop-gradient on the general part
        out = []
        for tower, gates, x in zip(self.towers, self.gates, inputs, strict=True):
            out.append(scaled_mlp(tower, x, [gate(gate_in) for gate in gates]))  # (B, output_dim)
        return out
