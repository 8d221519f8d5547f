"""`qwen35 generate`: in process on a tiny dummy model, and as a subprocess resolving a hub id offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import test_engine_support  # noqa: F401  (one torch thread)
from test_engine_support import write_config

from qwen35.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """Real vocabulary size (text prompts go through the real tokenizer), tiny everything else."""
    return write_config(tmp_path_factory.mktemp("cli") / "tiny", vocab_size=248320)


def test_generate_streams_text(tiny_folder, capsys):
    rc = main(["generate", str(tiny_folder), "Hello there", "--load-format", "dummy", "--max-tokens", "6",
               "--temperature", "0", "--ignore-eos", "--dtype", "float32"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # some text came out
    assert "length limit" in captured.err
    # greedy is deterministic; sampling flags are accepted
    rc = main(["generate", str(tiny_folder), "Hello there", "--load-format", "dummy", "--max-tokens", "6",
               "--temperature", "0", "--ignore-eos"])
    assert rc == 0 and capsys.readouterr().out == captured.out
    rc = main(["generate", str(tiny_folder), "Hello there", "--load-format", "dummy", "--max-tokens", "6",
               "--temperature", "0", "--ignore-eos", "--dtype", "float32", "--no-enable-prefix-caching"])
    assert rc == 0 and capsys.readouterr().out == captured.out
    rc = main(["generate", str(tiny_folder), "Hi", "--load-format", "dummy", "--max-tokens", "4", "--temperature",
               "0.9", "--top-p", "0.9", "--top-k", "5", "--seed", "3"])
    assert rc == 0


def test_generate_bad_flag_value_is_a_clean_error(tiny_folder, capsys):
    rc = main(["generate", str(tiny_folder), "Hi", "--load-format", "dummy", "--top-p", "7"])
    assert rc == 2 and "top_p" in capsys.readouterr().err


def test_generate_hub_id_offline(tmp_path):
    """MODEL as a hub id, resolved from a local cache with the hub's layout (no network)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen"
    snap = repo / "snapshots" / commit
    write_config(snap, vocab_size=248320)
    (snap / "generation_config.json").write_text(json.dumps({"eos_token_id": [248046, 248044],
                                                             "temperature": 0.6}))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # One interpreter for both runs (the hub reads its settings at import, so they go in the environment).
    script = (
        "import sys\n"
        "from qwen35.cli import main\n"
        "rc = main(['generate', 'tiny-org/tiny-qwen', 'Hello', '--load-format', 'dummy', '--max-tokens', '3',"
        " '--temperature', '0'])\n"
        "print('\\nRC1', rc)\n"
        "rc = main(['generate', 'tiny-org/not-cached', 'Hello', '--load-format', 'dummy'])\n"
        "print('RC2', rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    text, _, rest = proc.stdout.rpartition("\nRC1 ")
    assert text.strip() and rest.split() == ["0", "RC2", "2"], proc.stdout
    assert "not-cached" in proc.stderr and "offline" in proc.stderr
