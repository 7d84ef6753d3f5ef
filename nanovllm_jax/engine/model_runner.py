"""ModelRunner: weights, the paged KV cache, and the jitted, bucketed prefill/decode/sample steps.

Only dense padded arrays cross into jit. A step's inputs are packed on the host into one int32 and one
float32 array (one transfer each); its output is the sampled token ids, read back once per step
(`dispatch` launches a step, `collect` reads its tokens). A decode step may be launched before the
previous step's tokens are read: its input ids then come from that step's tokens on the device. Token
counts and sequence counts are padded to the buckets below, the block-table width is fixed
(max_model_len / block_size), and every bucket is compiled at start-up (`precompile`), the JAX analogue
of CUDA-graph capture; with `enforce_eager=True` nothing is compiled at start-up and each bucket compiles
on its first use. The KV cache is donated to every step and rebound to the step's result, so the
store is in place. Under tensor parallelism the model step runs per device inside `jax.shard_map`.
"""

import hashlib
import math
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import serialize_executable
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanovllm_jax import kernels
from nanovllm_jax.config import Config
from nanovllm_jax.engine.sequence import Sequence
from nanovllm_jax.layers.attention import AttentionMetadata
from nanovllm_jax.layers.sampler import sample
from nanovllm_jax.utils.loader import TP_AXIS, load_model, make_mesh

# JAX preallocates 75% of GPU memory by default; gpu_memory_utilization is a fraction of JAX's pool,
# so let the pool cover 95% of the device unless the user chose otherwise (effective only if set
# before JAX starts its GPU backend; the README says so).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
# NVLink multicast (NVLS) off for NCCL's all-reduces under tensor parallelism, unless the user chose.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
# XLA command buffers (CUDA graphs) around all kernels, the Pallas custom calls included: a decode step
# launches ~500 small kernels, and launched one by one they left the GPU idle at small batches
# (measured on the H100: a batch-1 step went from 4.05 to 2.72 ms). Same rule: only before JAX starts
# its GPU backend, and a user's own setting of either flag in XLA_FLAGS wins.
_XLA_DEFAULTS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
    "xla_gpu_graph_min_graph_size": "1",
}
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")]
    + [f"--{k}={v}" for k, v in _XLA_DEFAULTS.items() if k not in os.environ.get("XLA_FLAGS", "")]
).strip()
# The persistent compilation cache, on by default (start-up compiles every bucket).
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nanovllm_jax", "xla")

# Decode batches pad to the next of these (capped at max_num_seqs). A padded row reads no KV (its
# context is 0) and writes nowhere (slot -1), so coarse buckets cost little.
DECODE_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Prefill token counts pad to the next power of two from this minimum (capped at max_num_batched_tokens).
MIN_PREFILL_TOKENS = 64
# On CPU there is no device memory to size the cache from: this many bytes of KV cache by default.
CPU_KV_CACHE_BYTES = 512 * 2**20


def decode_buckets(max_num_seqs: int) -> list[int]:
    return sorted({min(b, max_num_seqs) for b in DECODE_BATCH_BUCKETS} | {max_num_seqs})


def prefill_buckets(max_num_batched_tokens: int) -> list[int]:
    top = max(max_num_batched_tokens, 1)
    out, t = [], MIN_PREFILL_TOKENS
    while t < top:
        out.append(t)
        t *= 2
    return out + [top]


def pick(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


@dataclass(frozen=True)
class StepShape:
    """The static (trace-time) shape of a step: T tokens, B sequences, W block-table width."""

    is_prefill: bool
    tokens: int
    seqs: int
    width: int

    def layout(self):
        T, B, W = self.tokens, self.seqs, self.width
        # Segments of the packed int32 input, in order.
        return dict(
            input_ids=T,
            src_rows=T,  # >= 0: the input id is the previous step's sampled token of that row instead
            positions=T,
            slot_mapping=T,
            block_tables=B * W,
            context_lens=B,
            cu_q_lens=B + 1,
            logits_idx=B,
            top_ks=B,  # the sampler reads the last B + 1 entries
            step=1,
        )


def unpack(buf, shape: StepShape) -> dict:
    out, at = {}, 0
    for name, n in shape.layout().items():
        out[name] = buf[at : at + n]
        at += n
    out["block_tables"] = out["block_tables"].reshape(shape.seqs, shape.width)
    return out


class ModelRunner:
    def __init__(self, config: Config, seed: int = 0):
        self.config = config
        if jax.config.jax_compilation_cache_dir is None:
            jax.config.update("jax_compilation_cache_dir", DEFAULT_CACHE_DIR)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        self.block_size = config.kvcache_block_size
        self.width = math.ceil(config.max_model_len / self.block_size)
        self.mesh = make_mesh(config.tensor_parallel_size)
        self.replicated = NamedSharding(self.mesh, P())  # step inputs and sampled ids live on every device
        self.graphdef, state, self.args, self.shard_args, state_specs = load_model(
            config.model, config.hf_config, self.mesh
        )
        # The weights as a flat list: a list flattens in C++ at every step's call, an nnx.State in Python
        # (~0.5 ms per call for Qwen3-0.6B's ~300 arrays).
        self.state, self.state_def = jax.tree.flatten(state)
        self.state_specs = self.state_def.flatten_up_to(state_specs)
        self.vocab_size = self.args.vocab_size
        self.seed = seed
        self.step_count = 0
        self.decode_buckets = decode_buckets(config.max_num_seqs)
        self.prefill_buckets = prefill_buckets(config.max_num_batched_tokens)
        # Every step's sampled ids, padded to one shape (a step has at most max_num_seqs sequences), so
        # that any step can take the previous step's ids as an input without a program per pair.
        self.max_rows = config.max_num_seqs
        self.last_tokens = jax.device_put(np.zeros(self.max_rows, np.int32), self.replicated)
        self._model_step = jax.jit(self._model_step_fn, static_argnums=(4,), donate_argnums=(1,))
        self._sample = jax.jit(self._sample_fn, static_argnums=(3,))
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        self.compiled = {}
        # Compiled programs are saved on GPU only: XLA:CPU's deserialized programs can miss functions.
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        self.executable_dir = (
            None if on_cpu else os.path.join(jax.config.jax_compilation_cache_dir, "nanovllm_executables")
        )
        self.fingerprint = self._fingerprint()
        self.loaded_from_disk = 0
        if not config.enforce_eager:
            self.precompile()

    # ---- device functions -------------------------------------------------------------------------

    def _forward(self, state, kv_caches, ints, prev_tokens, shape: StepShape):
        """Per device: the model on this step's tokens -> (logits [B, V_local] float32, caches)."""
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self.state_def, state))
        x = unpack(ints, shape)
        md = AttentionMetadata(
            x["slot_mapping"], x["block_tables"], x["context_lens"], x["cu_q_lens"], shape.is_prefill
        )
        src = x["src_rows"]
        input_ids = jnp.where(src >= 0, prev_tokens[jnp.maximum(src, 0)], x["input_ids"])
        hidden, kv_caches = model(input_ids, x["positions"], kv_caches, md)
        logits = model.compute_logits(hidden[x["logits_idx"]])
        if self.mesh.size > 1:
            logits = jax.lax.all_gather(logits, TP_AXIS, axis=1, tiled=True)
        return logits, kv_caches

    def _model_step_fn(self, state, kv_caches, ints, prev_tokens, shape: StepShape):
        if self.mesh.size == 1:
            return self._forward(state, kv_caches, ints, prev_tokens, shape)
        cache_spec = [(P(None, TP_AXIS), P(None, TP_AXIS))] * len(kv_caches)
        return jax.shard_map(
            lambda s, c, i, t: self._forward(s, c, i, t, shape),
            mesh=self.mesh,
            in_specs=(self.state_specs, cache_spec, P(), P()),  # weights per their plan; caches by kv head
            out_specs=(P(), cache_spec),  # logits all-gathered over the vocab, so replicated
            check_vma=False,
        )(state, kv_caches, ints, prev_tokens)

    def _sample_fn(self, logits, ints, floats, use_top_k_top_p: bool):
        B = floats.shape[0] // 2
        logits = logits[:, : self.vocab_size]  # drop the vocab padding of tensor parallelism
        # "rbg" (XLA's RngBitGenerator) draws the [B, V] Gumbel noise far cheaper on the GPU than the
        # default threefry; the stream is fixed by the seed and the step counter all the same.
        key = jax.random.fold_in(jax.random.key(self.seed, impl="rbg"), ints[-1])
        tokens = sample(logits, floats[:B], ints[-1 - B : -1], floats[B:], key, use_top_k_top_p=use_top_k_top_p)
        return jnp.zeros(self.max_rows, jnp.int32).at[:B].set(tokens)

    # ---- KV cache ------------------------------------------------------------------------------------

    def _block_bytes(self) -> int:
        a = self.shard_args  # per device
        return 2 * a.num_layers * a.num_kv_heads * self.block_size * a.head_dim * jnp.dtype(a.dtype).itemsize

    def _num_kv_blocks(self) -> int:
        config = self.config
        if config.num_kvcache_blocks > 0:
            num_blocks = config.num_kvcache_blocks
        elif self.mesh.devices.flat[0].platform == "cpu":
            num_blocks = max(CPU_KV_CACHE_BYTES // self._block_bytes(), 1)
        else:
            num_blocks = self._blocks_from_memory()
        needed = self.width
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens, but one sequence of "
                f"max_model_len={config.max_model_len} needs {needed}; lower max_model_len, or raise "
                f"gpu_memory_utilization / num_kvcache_blocks (or use more devices)"
            )
        return num_blocks

    def _blocks_from_memory(self) -> int:
        """Blocks that fit in gpu_memory_utilization of each device's pool after weights and a worst case
        prefill's activations (measured with a warm-up forward on a one-block cache)."""
        one_block = self._allocate_kv_cache(1)
        shape = StepShape(
            True, self.prefill_buckets[-1], min(self.prefill_buckets[-1], self.config.max_num_seqs), self.width
        )
        ints = np.zeros(sum(shape.layout().values()), np.int32)
        x = unpack(ints, shape)  # views into `ints`
        x["slot_mapping"][:] = -1  # write nowhere
        x["src_rows"][:] = -1
        logits, one_block = self._model_step(self.state, one_block, jnp.asarray(ints), self.last_tokens, shape)
        logits.block_until_ready()
        del one_block, logits
        free = []
        for device in self.mesh.devices.flat:
            stats = device.memory_stats()
            if not stats or "bytes_limit" not in stats:
                raise ValueError(
                    f"{device} reports no memory statistics (JAX's allocator setting?), so the KV cache cannot "
                    "be sized from gpu_memory_utilization; pass num_kvcache_blocks"
                )
            budget = stats["bytes_limit"] * self.config.gpu_memory_utilization
            free.append(budget - stats["peak_bytes_in_use"])
        blocks = max(int(min(free) // self._block_bytes()), 0)
        # Rounded down to a multiple of 64 so that small run-to-run differences in free memory keep the
        # cache shape, and with it the programs saved on disk (see `_program`), the same.
        return blocks - blocks % 64 if blocks >= 128 else blocks

    def _allocate_kv_cache(self, num_blocks: int):
        a = self.shard_args
        # Global shape: the kv-head axis holds each device's kv heads (copies when they are replicated).
        shape = (num_blocks, a.num_kv_heads * self.mesh.size, self.block_size, a.head_dim)
        sharding = NamedSharding(self.mesh, P(None, TP_AXIS))
        zeros = jax.jit(lambda: jnp.zeros(shape, a.dtype), out_shardings=sharding)
        return [(zeros(), zeros()) for _ in range(a.num_layers)]

    # ---- host side -----------------------------------------------------------------------------------

    def precompile(self):
        """Build every decode batch bucket and prefill token bucket, and both sampler variants of each.

        Programs saved by an earlier run load from disk (`_program`); the rest are traced and lowered here
        one at a time (Python), and XLA's compilations, which release the GIL, run in a thread pool.
        """
        shapes = [self._shape(False, b, b) for b in self.decode_buckets]
        shapes += [self._shape(True, t, t) for t in self.prefill_buckets]
        keys = dict.fromkeys(k for shape in shapes for flag in (False, True) for k in self._program_keys(shape, flag))
        lowered = {key: self._lower(key) for key in keys if self._load(key) is None}
        with ThreadPoolExecutor(max_workers=max(1, min(len(lowered), os.cpu_count() or 1))) as pool:
            for key, program in zip(lowered, pool.map(lambda program: program.compile(), lowered.values())):
                self._save(key, program)

    def _shape(self, is_prefill: bool, num_tokens: int, num_seqs: int) -> StepShape:
        if is_prefill:
            t = pick(self.prefill_buckets, num_tokens)
            return StepShape(True, t, min(t, self.config.max_num_seqs), self.width)
        b = pick(self.decode_buckets, num_seqs)
        return StepShape(False, b, b, self.width)

    @staticmethod
    def _program_keys(shape: StepShape, use_top_k_top_p: bool):
        """The model step is keyed by its shape; the sampler by (seqs, packed ints length, variant)."""
        return shape, (shape.seqs, sum(shape.layout().values()), use_top_k_top_p)

    def _lower(self, key):
        rep = self.replicated
        if isinstance(key, StepShape):
            ints = jax.ShapeDtypeStruct((sum(key.layout().values()),), jnp.int32, sharding=rep)
            return self._model_step.lower(self.state, self.kv_caches, ints, self.last_tokens, key)
        seqs, ints_len, use_top_k_top_p = key
        ints = jax.ShapeDtypeStruct((ints_len,), jnp.int32, sharding=rep)
        floats = jax.ShapeDtypeStruct((2 * seqs,), jnp.float32, sharding=rep)
        logits = jax.ShapeDtypeStruct((seqs, self.shard_args.vocab_size * self.mesh.size), jnp.float32, sharding=rep)
        return self._sample.lower(logits, ints, floats, use_top_k_top_p)

    def _executables(self, shape: StepShape, use_top_k_top_p: bool):
        """The compiled model step of a bucket and its sampler, built here on first need (eager mode).

        NOTE: the hot loop calls these executables directly, so a step can never trigger a compile
        behind our back: `self.compiled` holds every program this runner has built.
        """
        return tuple(self._program(key) for key in self._program_keys(shape, use_top_k_top_p))

    def _program(self, key):
        if key not in self.compiled and self._load(key) is None:
            self._save(key, self._lower(key).compile())
        return self.compiled[key]

    # ---- compiled programs on disk ---------------------------------------------------------------------
    # JAX's persistent cache skips XLA's compilation but not tracing and lowering, which for a 28-layer
    # model are most of a warm start-up. So the compiled programs themselves are saved too, keyed by
    # everything they depend on: this code, JAX, the devices, XLA's flags, and the shapes and shardings
    # of the weights and the cache (`_fingerprint`).

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for folder in sorted({os.path.dirname(os.path.dirname(__file__)), os.path.dirname(kernels.__file__)}):
            for root, _, files in sorted(os.walk(folder)):
                for name in sorted(f for f in files if f.endswith(".py")):
                    with open(os.path.join(root, name), "rb") as f:
                        h.update(name.encode() + f.read())
        avals = [
            (x.shape, str(x.dtype), str(x.sharding)) for x in jax.tree_util.tree_leaves((self.state, self.kv_caches))
        ]
        h.update(
            repr(
                (
                    jax.__version__,
                    jax.lib.__version__,
                    [str(d) for d in self.mesh.devices.flat],
                    [d.device_kind for d in self.mesh.devices.flat],
                    os.environ.get("XLA_FLAGS", ""),
                    jax.config.jax_default_matmul_precision,
                    self.seed,
                    self.vocab_size,
                    avals,
                    str(jax.tree_util.tree_structure((self.state, self.kv_caches))),
                )
            ).encode()
        )
        return h.hexdigest()[:32]

    def _path(self, key) -> str:
        return os.path.join(
            self.executable_dir, f"{self.fingerprint}-{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}"
        )

    def _load(self, key):
        if key in self.compiled or self.executable_dir is None:
            return self.compiled.get(key)
        try:
            with open(self._path(key), "rb") as f:
                blob, in_tree, out_tree = pickle.load(f)
            self.compiled[key] = serialize_executable.deserialize_and_load(
                blob, in_tree, out_tree, execution_devices=list(self.mesh.devices.flat)
            )
        except FileNotFoundError:
            return None
        except Exception as e:  # a stale or damaged file: rebuild it
            warnings.warn(f"ignoring saved program {self._path(key)}: {e}", stacklevel=2)
            return None
        self.loaded_from_disk += 1
        return self.compiled[key]

    def _save(self, key, compiled):
        self.compiled[key] = compiled
        if self.executable_dir is None:
            return
        try:
            os.makedirs(self.executable_dir, exist_ok=True)
            tmp = f"{self._path(key)}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                pickle.dump(serialize_executable.serialize(compiled), f)
            os.replace(tmp, self._path(key))  # readers only ever see complete files
        except Exception as e:  # saving is an optimisation; a read-only cache dir must not stop the engine
            warnings.warn(f"could not save compiled program to {self.executable_dir}: {e}", stacklevel=2)

    def prepare(self, seqs: list[Sequence], is_prefill: bool, prev: list[Sequence] | None = None):
        """Host side of a step: (shape, packed int32 inputs, float32 inputs, use_top_k_top_p).

        `prev`: the decode step still in flight before this decode step; its sampled tokens are not
        appended to `seqs` yet, so each sequence computes the position after its last and takes its
        input id from `prev`'s tokens on the device.
        """
        n, bs = len(seqs), self.block_size
        counts = [s.num_scheduled_tokens for s in seqs] if is_prefill else [1] * n
        shape = self._shape(is_prefill, sum(counts), n)
        T, B, W = shape.tokens, shape.seqs, shape.width
        if is_prefill:
            starts = [s.num_cached_tokens for s in seqs]
            ids = [t for s, a, c in zip(seqs, starts, counts) for t in s.token_ids[a : a + c]]
            positions = [p for a, c in zip(starts, counts) for p in range(a, a + c)]
            owner = [i for i, c in enumerate(counts) for _ in range(c)]
            src = [-1] * len(ids)
        elif prev is None:
            starts = [s.num_tokens - 1 for s in seqs]
            ids, positions, owner, src = [s.last_token for s in seqs], starts, range(n), [-1] * n
        else:
            row = {id(s): i for i, s in enumerate(prev)}
            starts = [s.num_tokens for s in seqs]
            ids, positions, owner, src = [0] * n, starts, range(n), [row[id(s)] for s in seqs]
        slots = [seqs[i].block_table[p // bs] * bs + p % bs for i, p in zip(owner, positions)]
        ends = np.cumsum(counts, dtype=np.int32)
        pad_t, pad_b = [0] * (T - len(ids)), [0] * (B - n)
        x = dict(
            input_ids=ids + pad_t,
            src_rows=src + [-1] * (T - len(ids)),
            positions=positions + pad_t,
            slot_mapping=slots + [-1] * (T - len(ids)),  # padded tokens write nowhere
            block_tables=[t for s in seqs for t in s.block_table + [0] * (W - len(s.block_table))]
            + [0] * (W * (B - n)),
            context_lens=[a + c for a, c in zip(starts, counts)] + pad_b,  # padded sequences read nothing
            cu_q_lens=[0, *ends.tolist()] + [int(ends[-1])] * (B - n),
            logits_idx=(ends - 1).tolist() + pad_b,
            top_ks=[s.top_k if s.top_k > 0 else self.vocab_size for s in seqs] + pad_b,
            step=[self.step_count],
        )
        self.step_count += 1
        ints = np.fromiter((v for name in shape.layout() for v in x[name]), np.int32, sum(shape.layout().values()))
        floats = np.array(
            [s.temperature for s in seqs] + [1.0] * (B - n) + [s.top_p for s in seqs] + [1.0] * (B - n), np.float32
        )  # temperatures, then top_ps
        use_top_k_top_p = any(s.top_k > 0 or s.top_p < 1.0 for s in seqs)
        return shape, ints, floats, use_top_k_top_p

    def dispatch(self, seqs: list[Sequence], is_prefill: bool, prev: list[Sequence] | None = None):
        """Launches one step for the scheduled sequences (see `prepare` for `prev`) without waiting for
        it; `collect` reads its sampled tokens."""
        shape, ints, floats, use_top_k_top_p = self.prepare(seqs, is_prefill, prev)
        step, sampler = self._executables(shape, use_top_k_top_p)
        ints, floats = jax.device_put((ints, floats), self.replicated)
        logits, self.kv_caches = step(self.state, self.kv_caches, ints, self.last_tokens)  # caches donated
        self.last_tokens = sampler(logits, ints, floats)
        return self.last_tokens, len(seqs)

    @staticmethod
    def collect(handle) -> list[int]:
        """The sampled token ids of a dispatched step, one per sequence (the step's one host read)."""
        tokens, n = handle
        return np.asarray(tokens)[:n].tolist()

    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """One step for the scheduled sequences; returns one sampled token id per sequence."""
        return self.collect(self.dispatch(seqs, is_prefill))
