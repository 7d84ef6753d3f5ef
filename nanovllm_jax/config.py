"""The engine's configuration: nano-vllm's `Config` dataclass, validated once and frozen.

Values derived at run time (the KV block count actually allocated, the EOS ids) live in the
engine objects built from it, never written back here.
"""

import os
from dataclasses import dataclass, field

from transformers import AutoConfig, PretrainedConfig

from nanovllm_jax.kernels.kv_layout import KV_CACHE_DTYPES


@dataclass(frozen=True)
class Config:
    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    hf_config: PretrainedConfig | None = field(default=None, compare=False)
    eos: int = -1
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    decode_window: int = 8  # decode steps per device call, at most (nanovllm-jax's own)
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8": 8-bit pages with scales

    def __post_init__(self):
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(f"model must be a path to a Hugging Face model directory, got {type(self.model).__name__}")
        model = os.fspath(self.model)
        if os.path.isfile(model):
            raise ValueError(
                f"model {model!r} is a file; pass the Hugging Face model directory that holds config.json and "
                "the safetensors weights"
            )
        if not os.path.isdir(model):
            raise ValueError(f"model directory {model!r} does not exist; pass the path of a local HF model directory")
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"model directory {model!r} has no config.json; is it a Hugging Face model directory?")
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_model_len", self.max_model_len, 1)
        _check_int("kvcache_block_size", self.kvcache_block_size, 256)
        if self.kvcache_block_size % 256 != 0:
            raise ValueError(f"kvcache_block_size must be a multiple of 256, got {self.kvcache_block_size}")
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        if not 1 <= self.tensor_parallel_size <= 8:
            raise ValueError(f"tensor_parallel_size must be between 1 and 8, got {self.tensor_parallel_size}")
        if isinstance(self.gpu_memory_utilization, bool) or not isinstance(self.gpu_memory_utilization, (int, float)):
            raise TypeError(f"gpu_memory_utilization must be a float, got {self.gpu_memory_utilization!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not isinstance(self.enforce_eager, bool):
            raise TypeError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        _check_int("num_kvcache_blocks", self.num_kvcache_blocks, -1)
        if self.num_kvcache_blocks == 0 or self.num_kvcache_blocks < -1:
            raise ValueError(
                f"num_kvcache_blocks must be -1 (size from memory) or positive, got {self.num_kvcache_blocks}"
            )
        _check_int("eos", self.eos, -1)
        _check_int("decode_window", self.decode_window, 1)
        if self.decode_window > self.kvcache_block_size:
            raise ValueError(
                f"decode_window must be at most kvcache_block_size={self.kvcache_block_size}, got {self.decode_window}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        # Frozen dataclass: derived fields are set once here, through object.__setattr__.
        object.__setattr__(self, "model", model)
        hf_config = self.hf_config if self.hf_config is not None else AutoConfig.from_pretrained(model)
        object.__setattr__(self, "hf_config", hf_config)
        object.__setattr__(self, "max_model_len", min(self.max_model_len, hf_config.max_position_embeddings))


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
