"""The decode batch, kept on the device between decode steps, and the host's map of its rows.

Each running sequence owns one row of a `DecodeState`: its last token, that token's position, how many
steps it may still run, its block table and its sampling settings. A decode window advances the rows
on the device (tokens, positions, remaining steps), so the host never rebuilds the batch: before each
window it sends only what changed (`DecodeBatch.prepare`): rows that joined (after their prefill), rows
that moved (compaction, see below), and block-table entries allocated since the last window.

Rows are dense: the n live sequences hold rows [0, n), and a window computes rows [0, B) for the decode
bucket B >= n. When sequences leave, the highest rows move into the holes, so the bucket shrinks with
the batch. Rows >= n are idle: they read no KV and write none.

NOTE: a row stops itself on the device (EOS, max_tokens, max_model_len: `remaining` reaches 0) and then
writes no KV. The host learns of an EOS only when it reads the window, possibly after it has launched
the next one; that window computes nothing for the row, and the host drops the row afterwards.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from nanovllm_jax.engine.sequence import Sequence
from nanovllm_jax.engine.step_inputs import WindowShape


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DecodeState:
    """The device-resident rows (R = the largest decode bucket's rows, W block-table width)."""

    tokens: jax.Array  # [R] int32 last token of the row: the next step's input
    positions: jax.Array  # [R] int32 its position
    remaining: jax.Array  # [R] int32 steps the row may still run; 0: stopped
    block_tables: jax.Array  # [R, W] int32
    top_ks: jax.Array  # [R] int32; >= vocab size: off
    ignore_eos: jax.Array  # [R] bool
    temperatures: jax.Array  # [R] float32
    top_ps: jax.Array  # [R] float32
    step: jax.Array  # [] int32 sampling steps so far: the rng stream's counter

    @classmethod
    def zeros(cls, rows: int, width: int, sharding) -> "DecodeState":
        ints, ones = np.zeros(rows, np.int32), np.ones(rows, np.float32)
        tables, flags = np.zeros((rows, width), np.int32), np.zeros(rows, bool)
        host = cls(ints, ints, ints, tables, ints, flags, ones, ones, np.zeros((), np.int32))
        return jax.device_put(host, sharding)

    def apply(self, u: dict) -> "DecodeState":
        """The state after the window's updates `u` (a `WindowShape.ints()` + `.floats()` unpacking)."""
        rows = self.tokens.shape[0]

        def at(idx):  # -1 (unused entry) -> out of bounds, dropped
            return jnp.where(idx >= 0, idx, rows)

        # Moves first (sources and destinations are disjoint: sources are rows >= the new row count).
        dst, src = at(u["move_dst"]), jnp.maximum(u["move_src"], 0)
        s = jax.tree.map(lambda x: x.at[dst].set(x[src], mode="drop") if x.ndim else x, self)
        j = at(u["join_rows"])
        s = DecodeState(
            tokens=s.tokens.at[j].set(u["join_tokens"], mode="drop"),
            positions=s.positions.at[j].set(u["join_positions"], mode="drop"),
            remaining=s.remaining.at[j].set(u["join_remaining"], mode="drop"),
            block_tables=s.block_tables.at[j].set(u["join_block_tables"], mode="drop"),
            top_ks=s.top_ks.at[j].set(u["join_top_ks"], mode="drop"),
            ignore_eos=s.ignore_eos.at[j].set(u["join_ignore_eos"] != 0, mode="drop"),
            temperatures=s.temperatures.at[j].set(u["join_temperatures"], mode="drop"),
            top_ps=s.top_ps.at[j].set(u["join_top_ps"], mode="drop"),
            step=s.step,
        )
        a = at(u["append_rows"])
        tables = s.block_tables.at[a, u["append_cols"]].set(u["append_blocks"], mode="drop")
        return DecodeState(**{**vars(s), "block_tables": tables})


def _key(seq: Sequence) -> tuple[int, int]:
    """A row's identity: a preempted and re-admitted sequence has new blocks, so it joins anew."""
    return seq.seq_id, seq.admission


def remaining_steps(seq: Sequence, max_model_len: int) -> int:
    """Decode steps `seq` may still run after the tokens it has and those in flight: each adds a token,
    until max_tokens completion tokens or max_model_len tokens."""
    done = seq.num_tokens + seq.num_inflight_tokens
    return min(seq.max_tokens - (done - seq.num_prompt_tokens), max_model_len - done)


class DecodeBatch:
    """The host's map of the device rows, and the packing of a window's updates to them."""

    def __init__(self, vocab_size: int, max_model_len: int):
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.rows: list[Sequence] = []  # the sequence of each live row, as of the last prepared window
        self.keys: list[tuple[int, int]] = []  # each row's (seq_id, admission) when it joined
        self.row_of: dict[tuple[int, int], int] = {}  # (seq_id, admission) -> row
        self.synced_blocks: list[int] = []  # block-table entries of each row already on the device

    def prepare(self, seqs: list[Sequence], num_steps: int, shape_of) -> tuple[WindowShape, np.ndarray, np.ndarray]:
        """Rows for exactly `seqs` (each with its KV blocks for the window already allocated) and the
        update buffers of a window of `num_steps` steps. `shape_of(num_rows)` gives its shape (bucket)."""
        keep = {_key(s) for s in seqs}
        leaving = [r for r, key in enumerate(self.keys) if key not in keep]
        joining = [s for s in seqs if _key(s) not in self.row_of]
        n_kept = len(self.rows) - len(leaving)
        shape = shape_of(n_kept + len(joining))
        ints, u = shape.ints().views(np.int32)
        floats, f = shape.floats().views(np.float32)
        for name in ("move_dst", "move_src", "join_rows", "append_rows"):
            u[name][:] = -1

        for r in leaving:
            del self.row_of[self.keys[r]]
        # Compaction: the kept rows at n_kept or above move into the holes below n_kept.
        holes = [r for r in leaving if r < n_kept]
        movers = [r for r in range(n_kept, len(self.rows)) if self.keys[r] in keep]
        for i, (dst, src) in enumerate(zip(holes, movers, strict=True)):
            u["move_dst"][i], u["move_src"][i] = dst, src
            self.rows[dst], self.keys[dst], self.synced_blocks[dst] = (
                self.rows[src],
                self.keys[src],
                self.synced_blocks[src],
            )
            self.row_of[self.keys[dst]] = dst
        del self.rows[n_kept:], self.keys[n_kept:], self.synced_blocks[n_kept:]

        # New block-table entries of kept rows (a window's steps cross at most one block boundary).
        a = 0
        for r, seq in enumerate(self.rows):
            for col in range(self.synced_blocks[r], len(seq.block_table)):
                u["append_rows"][a], u["append_cols"][a], u["append_blocks"][a] = r, col, seq.block_table[col]
                a += 1
            self.synced_blocks[r] = len(seq.block_table)

        for i, seq in enumerate(joining):
            r = len(self.rows)
            self.rows.append(seq)
            self.keys.append(_key(seq))
            self.row_of[_key(seq)] = r
            self.synced_blocks.append(len(seq.block_table))
            u["join_rows"][i] = r
            u["join_tokens"][i] = seq.last_token
            u["join_positions"][i] = seq.num_tokens - 1
            u["join_remaining"][i] = remaining_steps(seq, self.max_model_len)
            u["join_top_ks"][i] = seq.top_k if seq.top_k > 0 else self.vocab_size
            u["join_ignore_eos"][i] = seq.ignore_eos
            u["join_block_tables"][i, : len(seq.block_table)] = seq.block_table
            f["join_temperatures"][i] = seq.temperature
            f["join_top_ps"][i] = seq.top_p
        u["num_rows"][0], u["num_steps"][0] = len(self.rows), num_steps
        return shape, ints, floats

    def clear(self):
        """Forget every row (the device state is then rebuilt by joins)."""
        self.rows, self.keys, self.row_of, self.synced_blocks = [], [], {}, []
