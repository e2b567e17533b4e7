"""Layer similarity and contiguous layer groups (Ghilardi et al. 2024, "Efficient Training of
Sparse Autoencoders for Large Language Models via Layer Groups"): layers whose residual streams
point the same way on the same tokens can share one SAE."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

import activations


def angular_similarity(acts: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """[L, L] mean angular similarity 1 - arccos(cos(x_i, x_j)) / pi between the activations of
    L sites on the same tokens (each [N, d], row t = token t at every site), averaged over tokens.
    1 on the diagonal; 0 for opposite directions."""
    rows = list(acts.values()) if isinstance(acts, Mapping) else list(acts)
    if not rows or len({tuple(r.shape) for r in rows}) != 1 or rows[0].ndim != 2:
        raise ValueError(f"need activations [N, d] of one shape per site, got {[tuple(r.shape) for r in rows]}")
    units = torch.nn.functional.normalize(torch.stack(rows, dim=1).double(), dim=-1)  # [N, L, d]
    cosines = (units @ units.transpose(1, 2)).clamp(-1.0, 1.0)  # [N, L, L]
    return (1.0 - torch.arccos(cosines) / math.pi).mean(dim=0).float().fill_diagonal_(1.0)


def layer_similarity(
    lm: activations.LanguageModel,
    sites: Sequence[str],
    texts: Sequence[str] | None = None,
    n_tokens: int = 4096,
    context_len: int = 128,
    seed: int = 0,
    split: str = "train",
) -> Tensor:
    """`angular_similarity` of `sites` on `n_tokens` tokens of `texts` (None: the embedded corpus),
    harvested in one forward per window batch (stopped after the deepest site)."""
    parts: dict[str, list[Tensor]] = {s: [] for s in sites}
    for batch in activations.stream(
        lm, list(sites), texts=texts, context_len=context_len, batch_size=min(n_tokens, 4096), n_tokens=n_tokens,
        seed=seed, progress=False, split=split,
    ):
        for site, rows in batch.items():
            parts[site].append(rows)
    return angular_similarity({s: torch.cat(p) for s, p in parts.items()})


def group_layers(similarity: Tensor, n_groups: int) -> list[list[int]]:
    """Split L layers (in order) into `n_groups` contiguous groups, minimising the summed
    pairwise angular distance (1 - similarity) inside the groups: the exact optimum, by dynamic
    programming over the group boundaries (O(G L^2)). Big jumps in the residual stream get small
    groups; stretches where it barely turns share one."""
    n_layers = similarity.shape[0]
    if similarity.ndim != 2 or similarity.shape[1] != n_layers:
        raise ValueError(f"similarity must be a square [L, L] matrix, got {tuple(similarity.shape)}")
    if not 1 <= n_groups <= n_layers:
        raise ValueError(f"n_groups must be between 1 and the number of layers ({n_layers}), got {n_groups}")
    distance = (1.0 - similarity.double()).clamp_min(0.0)
    distance = (distance + distance.T) / 2.0
    # prefix[i, j]: summed distance of the block i..j-1, from 2-D cumulative sums.
    prefix = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
    prefix[1:, 1:] = distance.cumsum(0).cumsum(1)

    def cost(i: int, j: int) -> float:
        return float(prefix[j, j] - prefix[i, j] - prefix[j, i] + prefix[i, i]) / 2.0

    inf = float("inf")
    # best[g][j]: least cost of splitting layers 0..j-1 into g groups; cut[g][j]: where the last starts.
    best = [[inf] * (n_layers + 1) for _ in range(n_groups + 1)]
    cut = [[0] * (n_layers + 1) for _ in range(n_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, n_groups + 1):
        for j in range(g, n_layers + 1):
            for i in range(g - 1, j):
                value = best[g - 1][i] + cost(i, j)
                if value < best[g][j]:
                    best[g][j], cut[g][j] = value, i
    groups, stop = [], n_layers
    for g in range(n_groups, 0, -1):
        start = cut[g][stop]
        groups.append(list(range(start, stop)))
        stop = start
    return groups[::-1]


def amad(similarity: Tensor, groups: Sequence[Sequence[int]]) -> float:
    """Average (over groups) of the maximum angular distance between two layers of a group: the
    paper's AMAD, how far apart the layers sharing an SAE are at worst (0 for singletons)."""
    distance = 1.0 - similarity.double()
    worst = [float(distance[list(g)][:, list(g)].max()) for g in groups]
    return sum(worst) / len(worst)
