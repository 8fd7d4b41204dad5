"""Output heads: per-atom features -> per-atom scalars (energies) or vectors."""
import torch
from torch import Tensor, nn

from .layers import GatedEquivariantBlock


class EquivariantScalarHead(nn.Module):
    """Two gated equivariant blocks (hidden -> hidden/2 -> 1): one scalar per atom (N,)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.block1 = GatedEquivariantBlock(hidden, hidden // 2, scalar_activation=True)
        self.block2 = GatedEquivariantBlock(hidden // 2, 1, scalar_activation=False)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        x, vec = self.block1(x, vec)
        x, vec = self.block2(x, vec)
        # keep the vector path in the graph so autograd sees every parameter
        return x.squeeze(-1) + 0.0 * vec.sum(dim=(1, 2))


class EquivariantVectorHead(nn.Module):
    """Two gated equivariant blocks ending in one vector per atom (N, 3); rotates with the input."""

    def __init__(self, hidden: int):
        super().__init__()
        self.block1 = GatedEquivariantBlock(hidden, hidden // 2, scalar_activation=True)
        self.block2 = GatedEquivariantBlock(hidden // 2, 1, scalar_activation=False)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        x, vec = self.block1(x, vec)
        x, vec = self.block2(x, vec)
        return vec.squeeze(-1) + 0.0 * x
