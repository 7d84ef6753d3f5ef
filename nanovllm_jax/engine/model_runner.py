"""ModelRunner: the weights, the KV cache, the decode batch on the device, and the jitted steps over them.

Two kinds of program run the model, each compiled per bucket (unless `enforce_eager`, the JAX analogue of
CUDA-graph capture: at start-up, and those for top-k/top-p sampling in the background right after it):
- a prefill step (`prefill`): the tokens of the scheduled sequences, packed on the host into one int32
  array (`PrefillShape`), then a separate sampler program per sequence count (`SampleShape`, with or
  without top-k/top-p);
- a decode window (`decode`): `decode_window` decode steps in one call, a loop over the model and the
  sampler on the `DecodeState` rows, which stay on the device between windows; the host sends only the
  rows' changes (`DecodeBatch`). Each row stops itself on EOS, max_tokens or max_model_len; a shorter
  window (`num_steps`) leaves the steps past it idle. Each sampler with or without top-k/top-p.
Both return their sampled tokens as a device array without waiting (`Launch`); the engine reads them
later, so the next window can be launched first. The KV cache and the decode state are donated to every
program and rebound to its result, so the stores are in place. Under tensor parallelism the model runs
per device inside `jax.shard_map`.
"""

import math
import os
import time
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanovllm_jax import kernels
from nanovllm_jax.config import Config
from nanovllm_jax.engine.decode_batch import DecodeBatch, DecodeState
from nanovllm_jax.engine.kv_cache import CACHE_SPEC, CPU_KV_CACHE_BYTES, KVCacheLayout, blocks_from_memory
from nanovllm_jax.engine.programs import ProgramCache, fingerprint
from nanovllm_jax.engine.sequence import Sequence
from nanovllm_jax.engine.step_inputs import PrefillShape, SampleShape, WindowShape
from nanovllm_jax.layers.attention import AttentionMetadata
from nanovllm_jax.layers.sampler import sample
from nanovllm_jax.utils.loader import TP_AXIS, load_model, make_mesh

# Decode batches pad to the next of these (capped at max_num_seqs rounded up to a multiple of 16). A
# padded row reads no KV (its context is 0) and writes nowhere (slot -1), so coarse buckets cost little,
# and the decode GEMMs (`kernels.matmul`) take multiples of 16 rows.
DECODE_BATCH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)
# Prefill token counts pad to the next power of two from this minimum (capped at max_num_batched_tokens).
MIN_PREFILL_TOKENS = 64
PREFILL_STREAM, DECODE_STREAM = 0, 1  # the sampler's rng streams, folded into the seed


def decode_buckets(max_num_seqs: int) -> list[int]:
    top = -(-max_num_seqs // kernels.ROW_MULTIPLE) * kernels.ROW_MULTIPLE
    return sorted({min(b, top) for b in DECODE_BATCH_BUCKETS} | {top})


def prefill_buckets(max_num_batched_tokens: int) -> list[int]:
    top = max(max_num_batched_tokens, 1)
    out, t = [], MIN_PREFILL_TOKENS
    while t < top:
        out.append(t)
        t *= 2
    return out + [top]


def pick(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


@dataclass
class Launch:
    """A launched step whose sampled tokens are not read yet."""

    seqs: list[Sequence]  # prefill: the scheduled sequences; decode: the window's rows, in row order
    is_prefill: bool
    tokens: jax.Array  # prefill [B]; decode [steps, B], -1 where a row did not run
    steps: list[int]  # tokens each row adds unless it samples EOS (prefill: 1, or 0 for a chunk)
    num_computed: int = 0  # prefill: the prompt tokens it computes

    def read(self) -> np.ndarray:
        return np.asarray(self.tokens)


class ModelRunner:
    def __init__(self, config: Config, seed: int, eos_ids):
        self.config = config
        self.startup_s: dict[str, float] = {}  # seconds per start-up phase, for benchmarks
        clock = time.perf_counter()
        self.block_size = config.kvcache_block_size
        self.width = math.ceil(config.max_model_len / self.block_size)
        self.mesh = make_mesh(config.tensor_parallel_size)
        self.replicated = NamedSharding(self.mesh, P())  # step inputs and sampled ids live on every device
        self.graphdef, state, self.args, self.shard_args, state_specs = load_model(
            config.model, config.hf_config, self.mesh
        )
        # The weights as a flat list: a list flattens in C++ at every call, an nnx.State in Python.
        self.state, self.state_def = jax.tree.flatten(state)
        self.state_specs = self.state_def.flatten_up_to(state_specs)
        self.vocab_size = self.args.vocab_size
        self.seed, self.eos_ids, self.decode_window = seed, tuple(sorted(eos_ids)), config.decode_window
        self.prefill_step_count = 0
        self.decode_buckets = decode_buckets(config.max_num_seqs)
        self.prefill_buckets = prefill_buckets(config.max_num_batched_tokens)
        self._prefill = jax.jit(self._prefill_fn, static_argnums=(3,), donate_argnums=(1,))
        self._sample = jax.jit(self._sample_fn, static_argnums=(3, 4))
        self._window = jax.jit(self._window_fn, static_argnums=(5, 6), donate_argnums=(1, 2))
        self.cache_layout = KVCacheLayout(self.shard_args, self.block_size, config.kv_cache_dtype, self.mesh)
        jax.block_until_ready(self.state)
        self.startup_s["weights"], clock = time.perf_counter() - clock, time.perf_counter()
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = self.cache_layout.allocate(self.num_blocks)
        jax.block_until_ready(self.kv_caches)
        self.startup_s["kv_cache"], clock = time.perf_counter() - clock, time.perf_counter()
        self.decode_state = DecodeState.zeros(self.decode_buckets[-1], self.width, self.replicated)
        self.batch = DecodeBatch(self.vocab_size, config.max_model_len)
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        directory = None if on_cpu else os.path.join(jax.config.jax_compilation_cache_dir, "nanovllm_executables")
        arrays = (self.state, self.kv_caches, self.decode_state)
        key = fingerprint(self.mesh, arrays, seed, self.eos_ids, self.decode_window, self.vocab_size)
        self.programs = ProgramCache(self._lower, self.mesh.devices.flat, directory, key)
        # Programs are lowered from these abstract values, so the background build (below) never touches
        # the arrays that the steps donate.
        self.avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), arrays)
        if not config.enforce_eager:
            self.programs.precompile(self.program_keys(use_top_k_top_p=False))
            self.startup_s["programs"], clock = time.perf_counter() - clock, time.perf_counter()
            # XLA:CPU's first runs cost no more than the next ones. NOTE: not under TP: on two H200s the
            # first runs hung inside a window program's launch (BENCHMARKS.md), cause not found.
            if not on_cpu and self.mesh.size == 1:
                self.first_runs(self.program_keys(use_top_k_top_p=False))
                self.startup_s["first_runs"] = time.perf_counter() - clock
            self.programs.build_in_background(self.program_keys(use_top_k_top_p=True))
        else:
            self.startup_s["programs"] = time.perf_counter() - clock

    # ---- device functions ---------------------------------------------------------------------------

    def _per_device(self, fn, in_specs, out_specs):
        """`fn` on each device's shards under tensor parallelism (per its specs), else `fn` itself."""
        if self.mesh.size == 1:
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def _logits(self, model, hidden):
        """hidden [B, D] -> float32 logits [B, V] over the whole vocabulary (all-gathered under TP)."""
        logits = model.compute_logits(hidden)
        if self.mesh.size > 1:
            logits = jax.lax.all_gather(logits, TP_AXIS, axis=1, tiled=True)
        return logits[:, : self.vocab_size]  # drop the vocab padding of tensor parallelism

    def _key(self, stream: int, step):
        # The sampler draws two words from this key per step and hashes them into its Gumbel noise.
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed, impl="rbg"), stream), step)

    def _prefill_fn(self, weights, kv_caches, ints, shape: PrefillShape):
        """The model on a prefill step's tokens -> (logits [B, V] float32, caches)."""
        cache_specs = [tuple(CACHE_SPEC for _ in layer) for layer in kv_caches]

        def forward(weights, kv_caches, ints):
            model = nnx.merge(self.graphdef, jax.tree.unflatten(self.state_def, weights))
            x = shape.ints().unpack(ints)
            md = AttentionMetadata(x["slot_mapping"], x["block_tables"], x["context_lens"], x["cu_q_lens"], True)
            hidden, kv_caches = model(x["input_ids"], x["positions"], kv_caches, md)
            return self._logits(model, hidden[x["logits_idx"]]), kv_caches

        return self._per_device(forward, (self.state_specs, cache_specs, P()), (P(), cache_specs))(
            weights, kv_caches, ints
        )

    def _sample_fn(self, logits, ints, floats, shape: SampleShape, use_top_k_top_p: bool):
        x, f = shape.ints().unpack(ints), shape.floats().unpack(floats)
        key = self._key(PREFILL_STREAM, x["step"][0])
        return sample(logits, f["temperatures"], x["top_ks"], f["top_ps"], key, use_top_k_top_p=use_top_k_top_p)

    def _window_fn(self, weights, kv_caches, decode_state, ints, floats, shape: WindowShape, use_top_k_top_p: bool):
        """Up to `shape.steps` decode steps -> (tokens [steps, B], caches, decode state)."""
        u = shape.ints().unpack(ints) | shape.floats().unpack(floats)
        d = decode_state.apply(u)
        B, bs = shape.rows, self.block_size
        live = jnp.arange(B) < u["num_rows"][0]  # rows >= num_rows are idle
        num_steps = u["num_steps"][0]
        eos = jnp.asarray(self.eos_ids or (-1,), jnp.int32)
        cache_specs = [tuple(CACHE_SPEC for _ in layer) for layer in kv_caches]
        # NOTE: under TP only one step's model and sampler run per device, and every input of that is used:
        # with the whole loop inside one shard_map, jax 0.11.2's Shardy pass crashed the compiler (SIGSEGV in
        # ManualComputationUnusedInputsPattern).
        decode_step = self._per_device(
            lambda *args: self._decode_step(*args, use_top_k_top_p=use_top_k_top_p),
            (self.state_specs, cache_specs, *[P()] * 5),
            (P(), cache_specs),
        )

        def step(i, carry):
            r, kv_caches, out = carry
            active = live & (r.remaining > 0) & (i < num_steps)  # [B]
            page = jnp.take_along_axis(r.block_tables, jnp.minimum(r.positions // bs, shape.width - 1)[:, None], 1)
            slots = jnp.where(active, page[:, 0] * bs + r.positions % bs, -1)  # stopped rows write nowhere
            context_lens = jnp.where(active, r.positions + 1, 0)  # and read nothing
            sampling = (r.temperatures, r.top_ks, r.top_ps) if use_top_k_top_p else (r.temperatures,)
            pages = (slots, r.block_tables, context_lens)
            tokens, kv_caches = decode_step(weights, kv_caches, r.tokens, r.positions, pages, r.step, sampling)
            stop = ~r.ignore_eos & (tokens[:, None] == eos[None, :]).any(-1)
            r = replace(
                r,
                tokens=jnp.where(active, tokens, r.tokens),
                positions=jnp.where(active, r.positions + 1, r.positions),
                remaining=jnp.where(active, jnp.where(stop, 0, r.remaining - 1), r.remaining),
                step=r.step + 1,
            )
            return r, kv_caches, out.at[i].set(jnp.where(active, tokens, -1))

        # NOTE: a loop of a static trip count, not one that ends when every row has stopped: XLA runs a
        # data-dependent loop (or cond) by reading its predicate on the host each iteration, which blocks
        # the launching thread until the window is done (BENCHMARKS.md). Steps past `num_steps` are idle.
        rows = jax.tree.map(lambda x: x[:B] if x.ndim else x, d)
        out = jnp.full((shape.steps, B), -1, jnp.int32)
        rows, kv_caches, out = lax.fori_loop(0, shape.steps, step, (rows, kv_caches, out))
        d = jax.tree.map(lambda x, y: x.at[:B].set(y) if x.ndim else y, d, rows)
        return out, kv_caches, d

    def _decode_step(self, weights, kv_caches, tokens, positions, pages, step, sampling, *, use_top_k_top_p):
        """One decode step of the model and the sampler on B rows -> (sampled tokens [B], caches).
        pages: (slot_mapping, block_tables, context_lens); sampling: (temperatures[, top_ks, top_ps])."""
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self.state_def, weights))
        B = tokens.shape[0]
        md = AttentionMetadata(*pages, cu_q_lens=jnp.arange(B + 1, dtype=jnp.int32), is_prefill=False)
        hidden, kv_caches = model(tokens, positions, kv_caches, md)
        temperatures, top_ks, top_ps = sampling if use_top_k_top_p else (sampling[0], None, None)
        key = self._key(DECODE_STREAM, step)
        tokens = sample(self._logits(model, hidden), temperatures, top_ks, top_ps, key, use_top_k_top_p=use_top_k_top_p)
        return tokens, kv_caches

    # ---- KV cache ------------------------------------------------------------------------------------

    def _num_kv_blocks(self) -> int:
        config = self.config
        if config.num_kvcache_blocks > 0:
            num_blocks = config.num_kvcache_blocks
        elif self.mesh.devices.flat[0].platform == "cpu":
            num_blocks = max(CPU_KV_CACHE_BYTES // self.cache_layout.block_bytes(), 1)
        else:
            num_blocks = blocks_from_memory(self.cache_layout, config.gpu_memory_utilization, self._peak_prefill)
        if num_blocks < self.width:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens, but one sequence of "
                f"max_model_len={config.max_model_len} needs {self.width}; lower max_model_len, or raise "
                f"gpu_memory_utilization / num_kvcache_blocks (or use more devices)"
            )
        return num_blocks

    def _peak_prefill(self):
        """The largest prefill step on a one-block cache, writing nowhere (for its peak memory)."""
        shape = self._prefill_shape(self.prefill_buckets[-1])
        ints, x = shape.ints().views(np.int32)
        x["slot_mapping"][:] = -1
        logits, _ = self._prefill(self.state, self.cache_layout.allocate(1), jnp.asarray(ints), shape)
        logits.block_until_ready()

    def first_runs(self, keys):
        """Runs each program of `keys` once on inputs that read and write no KV, leaving the cache and the
        decode state as they were: a program's first run on a device does one-time work (XLA loads its
        kernels and records its command buffers), which would otherwise land on the first requests of that
        bucket (cost and effect: BENCHMARKS.md)."""
        for key in keys:
            kind, shape = key[:2]
            program = self.programs[key]
            if kind == "prefill":
                ints, x = shape.ints().views(np.int32)
                x["slot_mapping"][:] = -1
                _, self.kv_caches = program(self.state, self.kv_caches, jax.device_put(ints, self.replicated))
            elif kind == "sample":
                logits = jax.device_put(np.zeros((shape.seqs, self.vocab_size), np.float32), self.replicated)
                inputs = (shape.ints().views(np.int32)[0], np.ones(shape.floats().size, np.float32))
                program(logits, *jax.device_put(inputs, self.replicated))
            else:  # a window of no live rows and no steps
                ints, u = shape.ints().views(np.int32)
                for name in ("move_dst", "move_src", "join_rows", "append_rows"):
                    u[name][:] = -1
                floats = np.ones(shape.floats().size, np.float32)
                inputs = jax.device_put((ints, floats), self.replicated)
                _, self.kv_caches, self.decode_state = program(self.state, self.kv_caches, self.decode_state, *inputs)
        jax.block_until_ready((self.kv_caches, self.decode_state))
        # A fresh decode state (the runs advanced its sampling-step counter); every row joins anew.
        self.decode_state = DecodeState.zeros(self.decode_buckets[-1], self.width, self.replicated)
        self.batch.clear()

    # ---- programs ------------------------------------------------------------------------------------

    def _prefill_shape(self, num_tokens: int) -> PrefillShape:
        t = pick(self.prefill_buckets, num_tokens)
        return PrefillShape(t, min(t, self.config.max_num_seqs), self.width)

    def _window_shape(self, num_rows: int) -> WindowShape:
        return WindowShape(pick(self.decode_buckets, max(num_rows, 1)), self.width, self.decode_window)

    def program_keys(self, use_top_k_top_p: bool) -> list:
        """The programs of runs with (True) or without (False) a request that uses top-k/top-p: the prefill
        step of each prefill bucket (without only), a sampler per sequence count and a window per decode
        bucket. Start-up builds those without; those with are built in the background after it."""
        prefill = [self._prefill_shape(t) for t in self.prefill_buckets]
        keys = [] if use_top_k_top_p else [("prefill", shape) for shape in prefill]
        keys += [("sample", SampleShape(n), use_top_k_top_p) for n in sorted({shape.seqs for shape in prefill})]
        return keys + [("window", self._window_shape(b), use_top_k_top_p) for b in self.decode_buckets]

    def _lower(self, key):
        rep = self.replicated

        def spec(layout, dtype):
            return jax.ShapeDtypeStruct((layout.size,), dtype, sharding=rep)

        kind, shape = key[:2]
        state, kv_caches, decode_state = self.avals
        if kind == "prefill":
            return self._prefill.lower(state, kv_caches, spec(shape.ints(), jnp.int32), shape)
        if kind == "sample":
            logits = jax.ShapeDtypeStruct((shape.seqs, self.vocab_size), jnp.float32, sharding=rep)
            ints, floats = spec(shape.ints(), jnp.int32), spec(shape.floats(), jnp.float32)
            return self._sample.lower(logits, ints, floats, shape, key[2])
        ints, floats = spec(shape.ints(), jnp.int32), spec(shape.floats(), jnp.float32)
        return self._window.lower(state, kv_caches, decode_state, ints, floats, shape, key[2])

    # ---- host side -----------------------------------------------------------------------------------

    def prefill(self, seqs: list[Sequence], steps: list[int] | None = None) -> Launch:
        """Launches a prefill step of `seqs` (each computes its `num_scheduled_tokens` from
        `num_cached_tokens` on), without waiting for it; `steps`: 1 where a sequence's sample counts (its
        prompt ends in this step), 0 for a chunk (default: all 1)."""
        shape, ints = self._prefill_inputs(seqs)
        sampler, sample_ints, sample_floats, use_top_k_top_p = self._sample_inputs(seqs, shape.seqs)
        ints, sample_ints, sample_floats = jax.device_put((ints, sample_ints, sample_floats), self.replicated)
        logits, self.kv_caches = self.programs["prefill", shape](self.state, self.kv_caches, ints)  # donated
        tokens = self.programs["sample", sampler, use_top_k_top_p](logits, sample_ints, sample_floats)
        steps = [1] * len(seqs) if steps is None else list(steps)
        return Launch(list(seqs), True, tokens, steps, sum(s.num_scheduled_tokens for s in seqs))

    def prefill_logits(self, seqs: list[Sequence]) -> np.ndarray:
        """A prefill step of `seqs` (as `prefill`), waited for: the float32 logits [len(seqs), V] of each
        sequence's last scheduled token. Nothing is sampled. For parity checks."""
        shape, ints = self._prefill_inputs(seqs)
        ints = jax.device_put(ints, self.replicated)
        logits, self.kv_caches = self.programs["prefill", shape](self.state, self.kv_caches, ints)  # donated
        return np.asarray(logits)[: len(seqs)]

    def _prefill_inputs(self, seqs: list[Sequence]) -> tuple[PrefillShape, np.ndarray]:
        counts = [s.num_scheduled_tokens for s in seqs]
        shape = self._prefill_shape(sum(counts))
        ints, x = shape.ints().views(np.int32)
        starts = [s.num_cached_tokens for s in seqs]
        n, bs, T = len(seqs), self.block_size, sum(counts)
        positions = np.concatenate([np.arange(a, a + c, dtype=np.int32) for a, c in zip(starts, counts)])
        tables = np.zeros((n, self.width), np.int32)
        for i, s in enumerate(seqs):
            tables[i, : len(s.block_table)] = s.block_table
        x["input_ids"][:T] = [t for s, a, c in zip(seqs, starts, counts) for t in s.token_ids[a : a + c]]
        owner = np.repeat(np.arange(n), counts)
        x["positions"][:T] = positions
        x["slot_mapping"][:] = -1
        x["slot_mapping"][:T] = tables[owner, positions // bs] * bs + positions % bs
        x["block_tables"][:n] = tables
        ends = np.cumsum(counts, dtype=np.int32)
        x["context_lens"][:n] = np.asarray(starts) + counts
        x["cu_q_lens"][1 : n + 1] = ends
        x["cu_q_lens"][n + 1 :] = ends[-1]
        x["logits_idx"][:n] = ends - 1
        return shape, ints

    def _sample_inputs(self, seqs: list[Sequence], rows: int):
        """The sampler's shape, int32 and float32 inputs for `seqs` padded to `rows`, and its variant."""
        shape = SampleShape(rows)
        ints, x = shape.ints().views(np.int32)
        floats, f = shape.floats().views(np.float32)
        n = len(seqs)
        x["top_ks"][:n] = [s.top_k if s.top_k > 0 else self.vocab_size for s in seqs]
        x["step"][0] = self.prefill_step_count
        self.prefill_step_count += 1
        f["temperatures"][:] = 1.0
        f["top_ps"][:] = 1.0
        f["temperatures"][:n] = [s.temperature for s in seqs]
        f["top_ps"][:n] = [s.top_p for s in seqs]
        return shape, ints, floats, any(s.top_k > 0 or s.top_p < 1.0 for s in seqs)

    def decode(self, seqs: list[Sequence], steps: list[int], num_steps: int) -> Launch:
        """Launches a decode window of up to `num_steps` steps over `seqs`, without waiting for it; `steps`
        are the tokens each sequence adds unless it samples EOS (its blocks for them are allocated)."""
        shape, ints, floats = self.batch.prepare(seqs, num_steps, self._window_shape)
        use_top_k_top_p = any(s.top_k > 0 or s.top_p < 1.0 for s in self.batch.rows)
        ints, floats = jax.device_put((ints, floats), self.replicated)
        tokens, self.kv_caches, self.decode_state = self.programs["window", shape, use_top_k_top_p](
            self.state, self.kv_caches, self.decode_state, ints, floats
        )  # caches and decode state donated
        planned = dict(zip((s.seq_id for s in seqs), steps, strict=True))
        return Launch(list(self.batch.rows), False, tokens, [planned[s.seq_id] for s in self.batch.rows])

    def run(self, seqs: list[Sequence], is_prefill: bool, num_steps: int = 1) -> np.ndarray:
        """One step (prefill) or window (decode, `num_steps` steps for every sequence), waited for:
        its sampled tokens ([B] prefill; [steps, B] decode, in `seqs` order). For benchmarks and tests."""
        if is_prefill:
            return self.prefill(seqs).read()[: len(seqs)]
        self.batch.clear()  # every row joins from the host's state of `seqs`
        launch = self.decode(seqs, [num_steps] * len(seqs), num_steps)
        order = [launch.seqs.index(s) for s in seqs]
        return launch.read()[:, order]
