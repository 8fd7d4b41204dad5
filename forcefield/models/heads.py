"""Output heads: per-atom features -> per-atom scalars (energies) or vectors."""
from typing import Tuple

from torch import Tensor, nn

from .layers import GatedEquivariantBlock


class _GatedHead(nn.Module):
    """Two gated equivariant blocks, hidden -> hidden/2 -> 1 channel of scalars and vectors."""

    def __init__(self, hidden: int):
        super().__init__()
        self.block1 = GatedEquivariantBlock(hidden, hidden // 2, scalar_activation=True)
        self.block2 = GatedEquivariantBlock(hidden // 2, 1, scalar_activation=False)

    def _blocks(self, x: Tensor, vec: Tensor) -> Tuple[Tensor, Tensor]:
        x, vec = self.block1(x, vec)
        return self.block2(x, vec)


class EquivariantScalarHead(_GatedHead):
    """One invariant scalar per atom (N,)."""

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        x, vec = self._blocks(x, vec)
        # keep the vector path in the graph so autograd sees every parameter
        return x.squeeze(-1) + 0.0 * vec.sum(dim=(1, 2))


class EquivariantVectorHead(_GatedHead):
    """One vector per atom (N, 3) that rotates with the input."""

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        x, vec = self._blocks(x, vec)
        return vec.squeeze(-1) + 0.0 * x
