"""The arithmetic of a merge, on one flat range of one tensor at a time.

Both the streaming merge and LCSC's in-memory candidates go through
:class:`Accumulator` on the same ranges (:func:`flat_ranges`), so the tensor a
search evaluated and the tensor written afterwards are the same bits.

Accumulation is in fp32 (fp64 when a source is fp64): ``acc = w_0 x_0``, then
``acc += w_i x_i`` in summation order. While every source seen so far holds the
same bits as the first, nothing is computed; if they all do and the weights sum
to 1, the output is that data itself, so frozen parameters (and merges of
identical checkpoints) come out bit for bit unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..regions import Box, row_major_strides

EXACT_SUM_TOLERANCE = 1e-9  # |sum(w) - 1| below this counts as 1 for the identical-data shortcut

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def flat_start(box: Box, shape: Sequence[int]) -> int:
    strides = row_major_strides(tuple(shape))
    return sum(o * s for o, s in zip(box.offsets, strides))


def flat_ranges(boxes: Sequence[Box], shape: Sequence[int], work_elems: int) -> Iterator[tuple[int, int, int]]:
    """``(box index, start, stop)`` flat element ranges of at most ``work_elems``, in order.

    ``boxes`` must each be contiguous in the row-major flattening (what
    :func:`ckpt.regions.split_into_chunks` returns for a whole tensor).
    """
    for i, box in enumerate(boxes):
        a = flat_start(box, shape)
        b = a + box.numel
        if b == a:
            yield i, a, b
        for lo in range(a, b, max(1, work_elems)):
            yield i, lo, min(b, lo + work_elems)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype and the same bits (so NaN payloads and signed zeros count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    view = _INT_VIEW[a.element_size()]
    return torch.equal(a.view(view), b.view(view))


class Accumulator:
    """``out = sum_i w_i * x_i`` over one flat range, the ``x_i`` arriving one at a time.

    ``out`` is a 1-D slice of the output (its dtype is the output's); when it is
    already the accumulation dtype it is used as the accumulator, else ``scratch``
    (1-D, ``acc_dtype``, the length of ``out``) or a new tensor is.
    """

    def __init__(self, out: torch.Tensor, acc_dtype: torch.dtype, scratch: torch.Tensor | None = None) -> None:
        self.out, self.acc_dtype, self.scratch = out, acc_dtype, scratch
        self.ref: torch.Tensor | None = None
        self.ref_weight = 0.0  # total weight of the sources identical to ref so far
        self.acc: torch.Tensor | None = None

    def add(self, x: torch.Tensor, w: float) -> None:
        if self.ref is None:
            self.ref, self.ref_weight = x, w
            return
        if self.acc is None:
            if bitwise_equal(x, self.ref):
                self.ref_weight += w
                return
            self.acc = self._scaled_ref()
        self.acc.add_(x, alpha=w)

    def _scaled_ref(self) -> torch.Tensor:
        assert self.ref is not None
        if self.out.dtype == self.acc_dtype:
            acc = self.out
        elif self.scratch is not None:
            acc = self.scratch
        else:
            acc = torch.empty_like(self.out, dtype=self.acc_dtype)
        if self.ref.dtype == self.acc_dtype:
            torch.mul(self.ref, self.ref_weight, out=acc)
        else:  # upcast first: a mul in the narrow dtype would round w * x to it
            acc.copy_(self.ref)
            acc.mul_(self.ref_weight)
        return acc

    def finish(self) -> None:
        """Write the result into ``out``."""
        if self.ref is None:
            raise ValueError("no source contributed to this range")
        if self.acc is None:
            if abs(self.ref_weight - 1.0) <= EXACT_SUM_TOLERANCE:
                self.out.copy_(self.ref)
                return
            self.acc = self._scaled_ref()
        if self.acc is not self.out:
            self.out.copy_(self.acc)
