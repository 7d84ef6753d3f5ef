"""Step inputs as named structures: packed once on the host into one flat array, unpacked once in jit.

A `Layout` names the segments of a flat int32 (or float32) buffer and their shapes. The host fills the
segments through numpy views of one buffer (`Layout.views`) and sends it in one transfer; the jitted
step reads the same names back (`Layout.unpack`). Shapes are static per bucket, so a layout is part of
a program's trace-time shape, never data.

Axes: T tokens, B sequences (rows), W block-table width.
"""

from dataclasses import dataclass
from functools import cache

import numpy as np


class Layout:
    """Named segments of a flat buffer: `Layout(a=(T,), b=(B, W))`."""

    def __init__(self, **shapes: tuple[int, ...]):
        self.shapes = shapes
        self.offsets, at = {}, 0
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            self.offsets[name] = (at, at + n)
            at += n
        self.size = at

    def unpack(self, buf) -> dict:
        """Segment name -> view (numpy) or slice (jax) of `buf`, in its shape."""
        return {name: buf[a:b].reshape(self.shapes[name]) for name, (a, b) in self.offsets.items()}

    def views(self, dtype) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A fresh host buffer and writable views of its segments."""
        buf = np.zeros(self.size, dtype)
        return buf, self.unpack(buf)


@dataclass(frozen=True)
class PrefillShape:
    """The static (trace-time) shape of a prefill step: T tokens of B sequences, W block-table width."""

    tokens: int
    seqs: int
    width: int

    @cache  # noqa: B019 (shapes are few, small and live as long as the engine)
    def ints(self) -> Layout:
        T, B, W = self.tokens, self.seqs, self.width
        return Layout(
            input_ids=(T,),
            positions=(T,),
            slot_mapping=(T,),  # -1: a padded token, written nowhere
            block_tables=(B, W),
            context_lens=(B,),  # 0: a padded sequence, reads nothing
            cu_q_lens=(B + 1,),
            logits_idx=(B,),  # the token whose logits each sequence samples from (its last)
        )


@dataclass(frozen=True)
class SampleShape:
    """The static shape of the sampler after a prefill step: B sequences (so the prefill buckets of one
    sequence count share a sampler program)."""

    seqs: int

    @cache  # noqa: B019
    def ints(self) -> Layout:
        return Layout(top_ks=(self.seqs,), step=(1,))  # step: the sampler's rng counter

    @cache  # noqa: B019
    def floats(self) -> Layout:
        return Layout(temperatures=(self.seqs,), top_ps=(self.seqs,))


@dataclass(frozen=True)
class WindowShape:
    """The static shape of a decode window: B rows, W block-table width, up to `steps` decode steps."""

    rows: int
    width: int
    steps: int

    @cache  # noqa: B019
    def ints(self) -> Layout:
        B, W = self.rows, self.width
        return Layout(
            num_rows=(1,),  # live rows: [0, num_rows); rows past it are idle
            num_steps=(1,),  # steps to run, <= `steps`
            move_dst=(B,),  # compaction: row move_src[i] -> row move_dst[i]; -1: unused
            move_src=(B,),
            join_rows=(B,),  # a sequence joins at this row with the state below; -1: unused
            join_tokens=(B,),
            join_positions=(B,),
            join_remaining=(B,),
            join_top_ks=(B,),
            join_ignore_eos=(B,),
            join_block_tables=(B, W),
            append_rows=(2 * B,),  # block_tables[row, col] = block; row -1: unused
            append_cols=(2 * B,),
            append_blocks=(2 * B,),
        )

    @cache  # noqa: B019
    def floats(self) -> Layout:
        B = self.rows
        return Layout(join_temperatures=(B,), join_top_ps=(B,))
