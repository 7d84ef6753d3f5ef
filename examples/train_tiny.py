"""Train a tiny Qwen3 on the Python standard library's own sources, on the CPU, and save it in HF format.

A model with real (if small) structure in its attention, for accuracy studies such as
`examples/kv_accuracy.py` (random weights attend almost uniformly, which hides KV-cache errors). The text
ships with Python (the stdlib's .py files), the tokenizer is a byte-level BPE trained on it, the model is
Hugging Face's torch Qwen3ForCausalLM, and the result (safetensors in bf16, config, tokenizer) loads in
the engine like any checkpoint.

    python examples/train_tiny.py DIR [--minutes 4] [--threads 2]
"""

import argparse
import glob
import json
import math
import os
import sys
import sysconfig
import time

import numpy as np
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from nanovllm_jax.utils.checkpoint import hf_config, save_tokenizer, train_tokenizer

MODEL = dict(  # ~1.2M parameters: GQA 2, head_dim 64 (a kernel-friendly power of two), tied embeddings
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)


def stdlib_text(max_chars: int) -> str:
    """The stdlib's top-level .py files, sorted by name, concatenated up to max_chars."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    parts, total = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    os.makedirs(args.path, exist_ok=True)

    text = stdlib_text(6_000_000)
    chunk = 100_000
    tok = train_tokenizer((text[i : i + chunk] for i in range(0, len(text), chunk)), MODEL["vocab_size"])
    ids = np.asarray(tok.encode(text).ids, np.int64)
    split = int(len(ids) * 0.98)
    train, held = ids[:split], ids[split:]
    np.save(os.path.join(args.path, "heldout_ids.npy"), held)  # text the model never trained on
    print(f"corpus: {len(text):,} chars, {len(ids):,} tokens (held out {len(held):,})", flush=True)

    cfg = hf_config("tiny", "float32") | MODEL
    cfg["bos_token_id"] = tok.token_to_id("<|endoftext|>")
    cfg["eos_token_id"] = tok.token_to_id("<|im_end|>")
    model = Qwen3ForCausalLM(Qwen3Config(**cfg))
    n_params = sum(t.numel() for t in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    budget, start, step = args.minutes * 60, time.time(), 0
    print(f"model: {n_params:,} parameters; training for {args.minutes} min", flush=True)
    model.train()
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        at = rng.integers(0, len(train) - args.seq_len - 1, args.batch)
        x = torch.from_numpy(np.stack([train[a : a + args.seq_len] for a in at]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            print(f"step {step:5d}  {time.time() - start:6.0f} s  loss {loss.item():.3f}  lr {lr:.2e}", flush=True)
        step += 1

    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.stack([held[i : i + args.seq_len] for i in range(0, 8 * args.seq_len, args.seq_len)]))
        held_loss = model(input_ids=x, labels=x).loss.item()
    print(f"done: {step} steps; held-out loss {held_loss:.3f} nats/token", flush=True)
    model.to(torch.bfloat16).save_pretrained(args.path, safe_serialization=True)
    save_tokenizer(tok, args.path, MODEL["max_position_embeddings"])
    with open(os.path.join(args.path, "config.json")) as f:
        saved = json.load(f)
    saved["dtype"] = "bfloat16"
    with open(os.path.join(args.path, "config.json"), "w") as f:
        json.dump(saved, f, indent=1)
    print(f"saved to {args.path}", file=sys.stderr)


if __name__ == "__main__":
    main()
