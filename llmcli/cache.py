"""The key/value cache that decoding steps write into (`Transformer.step(tokens, cache)`).

Decoding (llmcli.decoding) sees only `cache.select(index)`: keep rows `index`, in that order,
as beam search expands, reorders and drops rows. The model reads and extends the rest.
Shapes: B rows, Hkv key/value heads, S key positions, D head dim.
"""

from __future__ import annotations

import math

import torch

PAD_TOKEN = -1  # left padding in the tokens passed to `step`; never a real token id


def select_rows(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.index_select(0, index) for a contiguous x, through a 2-D view: several times faster on
    the CPU than index_select on the 4-D tensor (and this runs every beam-search step)."""
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    if out is None:
        return flat.index_select(0, index).view(index.shape[0], *x.shape[1:])
    torch.index_select(flat, 0, index, out=out.view(out.shape[0], math.prod(out.shape[1:])))
    return out


class LayerCache:
    """One layer's self-attention keys and values (B, Hkv, S, D), kept in buffers with room for
    more positions: a step writes its keys in place instead of copying the cache (torch.cat).
    Reordering rows (beam search, every step) copies into the previous step's buffers rather
    than fresh memory, which on the CPU costs page faults as much as the copy itself."""

    ROOM = 16  # positions added each time a buffer is full

    def __init__(self):
        self.k: torch.Tensor | None = None  # (B, Hkv, capacity, D)
        self.v: torch.Tensor | None = None
        self.spare: tuple[torch.Tensor, torch.Tensor] | None = None  # buffers of the same capacity, for select
        self.length = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hkv, T, D) keys and values; return all of them so far, as views."""
        B, H, T, D = k.shape
        S = self.length + T
        if self.k is None or S > self.k.shape[2]:
            k_buf, v_buf = k.new_empty(B, H, S + self.ROOM, D), v.new_empty(B, H, S + self.ROOM, D)
            if self.k is not None:
                k_buf[:, :, : self.length], v_buf[:, :, : self.length] = self.k[:, :, : self.length], self.v[:, :, : self.length]
            self.k, self.v, self.spare = k_buf, v_buf, None
        self.k[:, :, self.length : S], self.v[:, :, self.length : S] = k, v
        self.length = S
        return self.k[:, :, :S], self.v[:, :, :S]

    def select(self, index: torch.Tensor) -> None:
        if self.k is None:
            return
        n = index.shape[0]
        if self.spare is not None and self.spare[0].shape[0] >= n:
            k_out, v_out = self.spare[0][:n], self.spare[1][:n]
        else:
            k_out, v_out = self.k.new_empty(n, *self.k.shape[1:]), self.v.new_empty(n, *self.v.shape[1:])
        self.spare = (self.k, self.v)
        self.k, self.v = select_rows(self.k, index, k_out), select_rows(self.v, index, v_out)


class KVCache:
    """Per-layer self-attention keys/values, cross-attention keys/values computed once,
    and per-row bookkeeping (which key slots are real, how many real tokens so far).

    Cross-attention keys/values are kept once per source row, with `memory_group` consecutive
    decoder rows reading each (beam search: the beams of a sentence), so reordering beams copies
    nothing there and the beams of a sentence attend to its memory in one matmul.
    """

    def __init__(self, n_layers: int, batch_size: int, device: torch.device):
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (B_src, Hkv, S_src, D) each
        self.memory_mask: torch.Tensor | None = None  # (B_src, 1, 1, S_src) bool
        self.memory_group = 1  # decoder row r reads source row r // memory_group
        self.key_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # (B, S)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) real tokens so far
        # (B, S) every token fed so far, PAD_TOKEN for padding: kept only where the model may have
        # to recompute a row's keys and values from its tokens (longrope, see Transformer.step)
        self.history: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` in that order (beam expansion, beam reordering, finished rows leaving)."""
        index = index.to(self.lengths.device)
        for layer in self.layers:
            layer.select(index)
        if self.cross_kv is not None:
            self._select_memory(index // self.memory_group)
        self.key_valid = self.key_valid.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        if self.history is not None:
            self.history = self.history.index_select(0, index)

    def _select_memory(self, source_rows: torch.Tensor) -> None:
        """Make decoder row r read source row source_rows[r], copying source rows only when the
        new rows are not runs of equal length over distinct source rows."""
        n = source_rows.shape[0]
        runs, counts = torch.unique_consecutive(source_rows, return_counts=True)
        group = n // max(runs.shape[0], 1)
        if n and bool((counts == group).all()) and runs.unique().shape[0] == runs.shape[0]:
            self.memory_group, source_rows = group, runs
        else:
            self.memory_group = 1
        if not torch.equal(source_rows, torch.arange(self.memory_mask.shape[0], device=source_rows.device)):
            self.cross_kv = [(select_rows(k, source_rows), select_rows(v, source_rows)) for k, v in self.cross_kv]
            self.memory_mask = self.memory_mask.index_select(0, source_rows)
