"""The decode batch on CPU: the host's row map and the device rows it updates, exactly, through joins,
leaves with compaction, new blocks and re-admission after preemption."""

import jax
import jax.numpy as jnp
import numpy as np

from nanovllm_jax.engine.decode_batch import DecodeBatch, DecodeState
from nanovllm_jax.engine.sequence import Sequence
from nanovllm_jax.engine.step_inputs import WindowShape
from nanovllm_jax.sampling_params import SamplingParams

ROWS, WIDTH, VOCAB, MAX_LEN = 8, 4, 100, 1024


def seq(n: int, table: list[int], **sampling) -> Sequence:
    s = Sequence(list(range(1, n + 1)), SamplingParams(**sampling), 256)
    s.block_table = list(table)
    return s


def shape_of(rows: int) -> WindowShape:
    return WindowShape(ROWS, WIDTH, 4)


def apply(state: DecodeState, batch: DecodeBatch, seqs: list[Sequence]) -> DecodeState:
    shape, ints, floats = batch.prepare(seqs, 3, shape_of)
    u = shape.ints().unpack(jnp.asarray(ints)) | shape.floats().unpack(jnp.asarray(floats))
    assert int(u["num_rows"][0]) == len(batch.rows) and int(u["num_steps"][0]) == 3
    return jax.jit(DecodeState.apply)(state, u)


def check(state: DecodeState, batch: DecodeBatch, remaining: dict[int, int]):
    """Each live row holds its sequence's state; `remaining` by seq_id (what the device counts down)."""
    for r, s in enumerate(batch.rows):
        assert int(state.tokens[r]) == s.last_token and int(state.positions[r]) == s.num_tokens - 1
        assert int(state.remaining[r]) == remaining[s.seq_id]
        table = np.zeros(WIDTH, np.int32)
        table[: len(s.block_table)] = s.block_table
        np.testing.assert_array_equal(np.asarray(state.block_tables[r]), table)
        assert int(state.top_ks[r]) == (s.top_k if s.top_k > 0 else VOCAB)
        assert bool(state.ignore_eos[r]) == s.ignore_eos
        assert float(state.temperatures[r]) == np.float32(s.temperature)
        assert float(state.top_ps[r]) == np.float32(s.top_p)
        assert batch.row_of[s.seq_id, s.admission] == r


def test_joins_leaves_moves_and_new_blocks():
    batch = DecodeBatch(VOCAB, MAX_LEN)
    state = DecodeState.zeros(ROWS, WIDTH, None)
    a = seq(10, [3], max_tokens=5)
    b = seq(300, [4, 5], max_tokens=50, temperature=0.5, top_k=7)
    c = seq(100, [6], max_tokens=1000, ignore_eos=True, top_p=0.9)  # max_model_len bounds it: 924 left
    d = seq(7, [7], max_tokens=3)
    state = apply(state, batch, [a, b, c, d])
    assert batch.rows == [a, b, c, d]
    check(state, batch, {a.seq_id: 5, b.seq_id: 50, c.seq_id: 924, d.seq_id: 3})

    # b leaves: the last row (d) moves into its hole; c gets a new block; e joins after them.
    c.block_table.append(9)
    e = seq(5, [2, 1], max_tokens=2)
    state = apply(state, batch, [a, c, d, e])
    assert batch.rows == [a, d, c, e]
    check(state, batch, {a.seq_id: 5, c.seq_id: 924, d.seq_id: 3, e.seq_id: 2})

    # a is preempted and re-admitted with new blocks: its old row leaves and it joins anew.
    a.block_table, a.admission = [8], a.admission + 1
    state = apply(state, batch, [d, c, e, a])
    assert batch.rows == [e, d, c, a]
    check(state, batch, {a.seq_id: 5, c.seq_id: 924, d.seq_id: 3, e.seq_id: 2})

    # Everything leaves at once.
    apply(state, batch, [])
    assert batch.rows == [] and batch.row_of == {}
