"""E(n)-equivariant graph network (Satorras, Hoogeboom & Welling, ICML 2021), the backbone 3D-EMGP pretrains.

Same interface as the other backbones: atomic numbers, ``edge_index`` (2, E) and ``edge_vec`` (E, 3) Å in;
per-atom scalars ``x`` (N, F) and vectors ``vec`` (N, 3, F) out, so the heads of :mod:`.heads` and
:class:`~forcefield.potential.Potential` work unchanged.

EGNN updates coordinates. A backbone only sees relative vectors, so each atom carries a displacement ``d_i``
(N, 3), zero at the start; the current relative vector of an edge is ``edge_vec + d_j - d_i`` and the update
is the EGNN one, ``d_i += mean_j (r_i - r_j) phi_x(m_ij)`` (translation invariant, rotation equivariant).
The vector output gathers, per layer, ``mean_j (r_j - r_i) W_v m_ij`` over F channels, plus the displacement.

``cutoff=None`` makes the graph fully connected within a molecule, as in the EGNN and 3D-EMGP papers (the
backbone then reports ``cutoff = FULLY_CONNECTED`` = 1000 Å to the radius graph; meant for molecules, not
periodic cells). With a finite cutoff every message is multiplied by a cosine cutoff, so energies stay smooth.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .layers import CosineCutoff

FULLY_CONNECTED = 1000.0


class GaussianSmearing(nn.Module):
    """exp(-(r - mu_k)^2 / (2 w^2)) on ``num_rbf`` centres spread over [0, r_max]."""

    def __init__(self, r_max: float, num_rbf: int):
        super().__init__()
        self.register_buffer("means", torch.linspace(0.0, r_max, num_rbf))
        self.coeff = -0.5 / (r_max / max(num_rbf - 1, 1)) ** 2

    def forward(self, r: Tensor) -> Tensor:
        return torch.exp(self.coeff * (r.unsqueeze(-1) - self.means) ** 2)


class EGNNLayer(nn.Module):
    def __init__(self, hidden: int, num_rbf: int, rbf_max: float, attention: bool, coords_range: float):
        super().__init__()
        self.hidden = hidden
        self.rbf = GaussianSmearing(rbf_max, num_rbf)
        self.coords_range = coords_range
        self.edge_mlp = nn.Sequential(nn.Linear(2 * hidden + num_rbf + 1, hidden), nn.SiLU(),
                                      nn.Linear(hidden, hidden), nn.SiLU())
        self.attention = attention
        self.att = nn.Linear(hidden, 1)
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1, bias=False))
        self.vec_proj = nn.Linear(hidden, hidden, bias=False)
        nn.init.xavier_uniform_(self.coord_mlp[2].weight, gain=0.001)  # as in EGNN: start near the identity

    def forward(self, h: Tensor, d: Tensor, edge_index: Tensor, edge_vec: Tensor, cut: Tensor,
                inv_deg: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        i, j = edge_index[0], edge_index[1]
        rel = edge_vec + d[j] - d[i]                                   # r_j - r_i (E, 3)
        r2 = rel.pow(2).sum(-1)
        r = torch.sqrt(r2 + 1e-12)
        m = self.edge_mlp(torch.cat([h[i], h[j], self.rbf(r), r2.unsqueeze(-1) * 0.01], dim=-1))
        if self.attention:
            m = m * torch.sigmoid(self.att(m))
        m = m * cut.unsqueeze(-1)
        agg = torch.zeros_like(h).index_add_(0, i, m)
        h = h + self.node_mlp(torch.cat([h, agg], dim=-1))
        # (E, 1); times the cutoff: coord_mlp(0) is not 0 (biases), and an edge entering at r_c must add nothing
        w = torch.tanh(self.coord_mlp(m)) * self.coords_range * cut.unsqueeze(-1)
        d = d + torch.zeros_like(d).index_add_(0, i, -rel * w) * inv_deg.unsqueeze(-1)
        v = rel.unsqueeze(-1) * self.vec_proj(m).unsqueeze(1)          # (E, 3, F)
        vec = torch.zeros((h.shape[0], 3, self.hidden), dtype=h.dtype, device=h.device).index_add_(0, i, v)
        return h, d, vec * inv_deg.view(-1, 1, 1)


class EGNN(nn.Module):
    """EGNN backbone. Input: atomic numbers (N,), edge_index (2, E), edge_vec (E, 3) Å.
    Output: scalars (N, hidden), vectors (N, 3, hidden)."""

    def __init__(self, hidden: int = 128, num_layers: int = 7, cutoff: Optional[float] = None, num_rbf: int = 32,
                 rbf_max: float = 10.0, attention: bool = True, coords_range: float = 1.0, max_z: int = 100):
        super().__init__()
        self.hidden = hidden
        self.num_layers = num_layers
        self.fully_connected: bool = cutoff is None
        self.cutoff: float = FULLY_CONNECTED if cutoff is None else float(cutoff)
        self.embedding = nn.Embedding(max_z, hidden)
        r_max = rbf_max if cutoff is None else float(cutoff)
        self.cutoff_fn = CosineCutoff(self.cutoff)
        self.layers = nn.ModuleList([EGNNLayer(hidden, num_rbf, r_max, attention, coords_range)
                                     for _ in range(num_layers)])
        self.disp_proj = nn.Parameter(torch.ones(hidden) / hidden ** 0.5)
        self.out_norm = nn.LayerNorm(hidden)

    def forward(self, z: Tensor, edge_index: Tensor, edge_vec: Tensor) -> Tuple[Tensor, Tensor]:
        n = z.shape[0]
        h = self.embedding(z)
        if self.fully_connected:
            cut = torch.ones(edge_vec.shape[0], dtype=edge_vec.dtype, device=edge_vec.device)
        else:
            cut = self.cutoff_fn(torch.sqrt(edge_vec.pow(2).sum(-1) + 1e-12))
        # neighbours counted by their cutoff weight, so that an atom crossing r_c changes no one's normalisation in a
        # step (1 / (1 + deg), without the kink of a clamp); fully connected: 1 / (number of other atoms), as before
        deg = torch.zeros(n, dtype=edge_vec.dtype, device=edge_vec.device).index_add_(0, edge_index[0], cut)
        inv_deg = 1.0 / deg.clamp_min(1.0) if self.fully_connected else 1.0 / (1.0 + deg)
        d = torch.zeros((n, 3), dtype=edge_vec.dtype, device=edge_vec.device)
        vec = torch.zeros((n, 3, self.hidden), dtype=edge_vec.dtype, device=edge_vec.device)
        for layer in self.layers:
            h, d, v = layer(h, d, edge_index, edge_vec, cut, inv_deg)
            vec = vec + v
        vec = vec + d.unsqueeze(-1) * self.disp_proj
        return self.out_norm(h), vec

