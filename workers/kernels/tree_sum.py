"""Sums whose rounding does not depend on how a tensor is cut into chunks.

A whole-tensor statistic (a dot product, a norm, a mean square) summed chunk by chunk would round
differently for every chunk size, and the merged bytes would change with ``memory_budget``. Here
every sum follows one fixed binary tree over the elements' flat indices: node (L, j) is the sum of
elements j·2^L … (j+1)·2^L − 1, computed as node (L−1, 2j) + node (L−1, 2j+1); nodes past the end
are absent. ``TreeSum`` streams chunks through that tree (a chunk is cut into aligned power-of-two
blocks, each summed by halving, and completed siblings are added as they meet), so one chunk or a
thousand give the very same float. ``pairwise_sum`` is the same idea along the last dimension of a
tensor whose rows are never split (per-filter sums). Only additions of the caller's values are
performed, so float64 values summed here are rounded the same on every device.
"""

from __future__ import annotations

import torch


def pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension in a fixed pairwise order that depends only on its length:
    neighbours (0,1), (2,3), … are added level by level, an odd last element is carried up."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    while x.shape[-1] > 1:
        width = x.shape[-1]
        pairs = x[..., 0:width - 1:2] + x[..., 1:width:2]
        x = torch.cat([pairs, x[..., width - 1:]], dim=-1) if width % 2 else pairs
    return x[..., 0]


class TreeSum:
    """A sum over a tensor's flat elements fed chunk by chunk, in flat order, rounding-identical for
    any chunking. ``add(start, values)``: values [..., n] are the elements at flat positions
    start … start + n − 1 (the leading dimensions are independent sums, e.g. one per expert)."""

    def __init__(self):
        self._stack: list[tuple[int, int, torch.Tensor]] = []  # (level, index, node sum), left to right
        self._next = 0

    def add(self, start: int, values: torch.Tensor) -> None:
        if start != self._next:
            raise ValueError(f"TreeSum fed out of order: expected position {self._next}, got {start}")
        n = values.shape[-1]
        offset, position = 0, start
        while offset < n:
            size = position & -position if position else 1 << 62  # the largest aligned block starting here
            while size > n - offset:
                size >>= 1
            block = pairwise_sum(values[..., offset:offset + size]) if size > 1 else values[..., offset]
            self._push(size.bit_length() - 1, position // size, block)
            offset += size
            position += size
        self._next = position

    def _push(self, level: int, index: int, node: torch.Tensor) -> None:
        while index % 2 == 1:  # a right child: its left sibling is the stack's top
            left_level, left_index, left = self._stack.pop()
            if (left_level, left_index) != (level, index - 1):
                raise AssertionError("TreeSum stack out of order")
            node, level, index = left + node, level + 1, index // 2
        self._stack.append((level, index, node))

    def total(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of everything added (zeros shaped like ``like`` without its last dim when nothing was)."""
        if not self._stack:
            if like is None:
                raise ValueError("TreeSum.total of nothing needs `like`")
            return like.new_zeros(like.shape[:-1])
        acc = self._stack[-1][2]
        for _, _, node in reversed(self._stack[:-1]):  # partial right subtrees, innermost first
            acc = node + acc
        return acc
