"""The paged KV cache: how many blocks fit, and their allocation on the mesh.

Per layer, the cache is the tuple of arrays that `kernels.kv_cache_shapes` describes (K and V pages,
plus scales for an 8-bit cache), each sharded on its kv-head axis (axis 1) under tensor parallelism.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanovllm_jax import kernels
from nanovllm_jax.utils.loader import TP_AXIS

# On CPU there is no device memory to size the cache from: this many bytes of KV cache by default.
CPU_KV_CACHE_BYTES = 512 * 2**20
CACHE_SPEC = P(None, TP_AXIS)  # every cache array: kv heads split over the mesh


class KVCacheLayout:
    """One layer's cache arrays for `num_blocks` blocks; `shard_args` are the per-device model sizes."""

    def __init__(self, shard_args, block_size: int, kv_cache_dtype: str, mesh):
        self.args, self.block_size, self.kv_cache_dtype, self.mesh = shard_args, block_size, kv_cache_dtype, mesh

    def layer_shapes(self, num_blocks: int, per_device: bool = False):
        a = self.args
        heads = a.num_kv_heads * (1 if per_device else self.mesh.size)  # copies where kv heads are replicated
        return kernels.kv_cache_shapes(num_blocks, heads, self.block_size, a.head_dim, a.dtype, self.kv_cache_dtype)

    def block_bytes(self) -> int:
        """Bytes of one block on one device, all layers."""
        return self.args.num_layers * kernels.kv_cache_bytes(self.layer_shapes(1, per_device=True))

    def allocate(self, num_blocks: int) -> list[tuple]:
        sharding = NamedSharding(self.mesh, CACHE_SPEC)
        shapes = self.layer_shapes(num_blocks)
        zeros = jax.jit(lambda: tuple(jnp.zeros(x.shape, x.dtype) for x in shapes), out_shardings=sharding)
        return [zeros() for _ in range(self.args.num_layers)]


def blocks_from_memory(layout: KVCacheLayout, gpu_memory_utilization: float, peak_forward) -> int:
    """Blocks that fit in `gpu_memory_utilization` of each device's pool after the weights and a worst-case
    step's activations (`peak_forward()` runs it, on a one-block cache)."""
    peak_forward()
    free = []
    for device in layout.mesh.devices.flat:
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            raise ValueError(
                f"{device} reports no memory statistics (JAX's allocator setting?), so the KV cache cannot "
                "be sized from gpu_memory_utilization; pass num_kvcache_blocks"
            )
        free.append(stats["bytes_limit"] * gpu_memory_utilization - stats["peak_bytes_in_use"])
    blocks = max(int(min(free) // layout.block_bytes()), 0)
    # Rounded down to a multiple of 64 so that small run-to-run differences in free memory keep the
    # cache shape, and with it the programs saved on disk, the same.
    return blocks - blocks % 64 if blocks >= 128 else blocks
