"""Cosine nearest neighbours in blocks: memory O(block × n + n × k), never an n × n matrix."""

from __future__ import annotations

import numpy as np
import torch

# Rows of queries per block: a block holds block × n_reference float32 similarities (for 262k
# reference tiles, 256 rows are 0.27 GB).
BLOCK_BYTES = 256 * 1024 * 1024


def _rows_and_inverse_norms(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows as a tensor sharing x's memory (float32 C-order input is not copied), and 1/|row|:
    similarities are scaled per block instead of copying a normalised reference."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    norms = torch.cat([t[i:i + 65536].norm(dim=1) for i in range(0, len(t), 65536)]) if len(t) else torch.zeros(0)
    return t, 1 / norms.clamp_min(1e-12)


def nearest(query: np.ndarray, reference: np.ndarray, k: int, query_groups: np.ndarray | None = None,
            reference_groups: np.ndarray | None = None, exclude_self: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine similarities) of each query's k nearest reference rows, most similar first.

    Reference rows whose group equals the query's group (integer codes) never count, nor the
    query itself when `exclude_self` (query and reference are then the same rows). Where fewer
    than k rows are allowed, the missing places hold index -1 and similarity -inf.
    """
    (q, q_inv), (r, r_inv) = _rows_and_inverse_norms(query), _rows_and_inverse_norms(reference)
    k = min(k, len(r))
    n_block = max(1, BLOCK_BYTES // (4 * max(1, len(r))))
    idx = np.empty((len(q), k), dtype=np.int64)
    sims = np.empty((len(q), k), dtype=np.float32)
    rg = torch.from_numpy(np.asarray(reference_groups)) if reference_groups is not None else None
    for start in range(0, len(q), n_block):
        stop = min(len(q), start + n_block)
        s = (q[start:stop] @ r.T).mul_(q_inv[start:stop, None]).mul_(r_inv[None, :])
        if rg is not None:
            qg = torch.from_numpy(np.asarray(query_groups[start:stop]))
            s.masked_fill_(qg[:, None] == rg[None, :], float("-inf"))
        if exclude_self:
            rows = torch.arange(stop - start)
            s[rows, rows + start] = float("-inf")
        values, found = torch.topk(s, k, dim=1)
        found[values == float("-inf")] = -1
        idx[start:stop], sims[start:stop] = found.numpy(), values.numpy()
    return idx, sims


def group_codes(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Integer code per row of a group column (each row its own group when there is none)."""
    if groups is None:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].astype(np.int64)
