"""examples/server.py runs: it starts the real server (nanovllm_jax.serve), queries it, and stops it.

The server itself is tested in test_serve.py; this checks that the example still works end to end.
"""

import importlib.util
import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "server.py")


def test_example_server_answers(checkpoint, capsys):
    spec = importlib.util.spec_from_file_location("nanovllm_example_server", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    path = checkpoint("tiny")
    small = dict(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=512, num_kvcache_blocks=16)
    example.main(["--model", path, "--max-tokens", "4", "--enforce-eager"], **small)
    out = capsys.readouterr().out
    assert f"serving {os.path.basename(path)!r} on http://127.0.0.1:" in out
    assert "completion (" in out and "tokens): " in out and "chat, streamed: " in out
