"""Tensor and expert parallelism over torch.distributed (gloo, processes on this host): every rank loads its
share of a checkpoint, and a sharded run (mixed-length batch, chunked prefill, decode) gives the tokens and
logprobs of one process."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

import qwen35
from conftest import TEXT_IDS, make_hf_model, save_hf
from qwen35.parallel import TensorParallel
from qwen35.parallel.layout import check_shardable

# Shardable over 2 and 4 ranks, with fewer KV heads (2) than 4 ranks.
SHAPE = dict(vocab_size=132, num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=4,
             linear_num_value_heads=8)
MOE = dict(num_experts=8, num_experts_per_tok=3)


@pytest.fixture(scope="module", params=["dense", "moe"])
def checkpoint(request, tmp_path_factory):
    moe = request.param == "moe"
    ref = make_hf_model("causal", moe=moe, seed=3, **SHAPE, **(MOE if moe else {}))
    return request.param, save_hf(ref, tmp_path_factory.mktemp(request.param))


def scripted_run(model) -> dict:
    """Three sequences: two prompts prefilled in chunks next to each other, a third joining, then greedy decode
    steps of all three together. Returns every step's greedy tokens and top-5 logprobs of the last rows."""
    from qwen35.engine.direct import DirectRun

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TEXT_IDS, (n,), generator=gen).tolist() for n in (150, 37, 70)]
    run = DirectRun(model, num_seqs=3, max_len=256)
    steps = [{0: prompts[0][:100], 1: prompts[1][:20]}, {0: prompts[0][100:], 1: prompts[1][20:], 2: prompts[2]}]
    tokens, logprobs, argmax = [], [], []
    for _ in range(6):
        for chunk in steps:
            hidden, batch = run.forward(chunk)
        last = hidden[torch.tensor(batch.starts[1:]) - 1]
        picked = model.greedy_tokens(last)
        lp = torch.log_softmax(model.compute_logits(last, torch.float32), dim=-1)
        tokens.append(picked.tolist())
        argmax.append(lp.argmax(dim=-1).tolist())  # the whole logits' pick, next to greedy_tokens' (head screen)
        logprobs.append(lp.topk(5, dim=-1).values)
        steps = [{i: [t] for i, t in enumerate(picked.tolist())}] if len(picked) == 3 else []
    return {"tokens": tokens, "logprobs": torch.stack(logprobs), "argmax": argmax,
            "screen": getattr(model, "_head_screen", None) is not None}


def _rank(rank: int, size: int, port: int, path: str, expert_parallel: bool, out: str, load: dict | None = None,
          ) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        tp = TensorParallel(rank, size, expert_parallel=expert_parallel)
        model = qwen35.load_model(path, tensor_parallel=tp, progress=False, **(load or {}))
        result = scripted_run(model)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("size,expert_parallel", [(2, False), (4, False), (2, True), (4, True)])
def test_sharded_run_equals_one_process(checkpoint, size, expert_parallel, tmp_path):
    kind, path = checkpoint
    if kind == "dense" and expert_parallel:
        pytest.skip("expert parallelism is for MoE layers")
    alone = scripted_run(qwen35.load_model(path, progress=False))
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(size, _free_port(), str(path), expert_parallel, str(out)), nprocs=size, join=True)
    sharded = torch.load(out)
    assert sharded["tokens"] == alone["tokens"]
    assert float((sharded["logprobs"] - alone["logprobs"]).abs().max()) <= 1e-5


def test_sizes_that_do_not_divide_are_refused():
    from qwen35.config import find_preset

    cfg = find_preset("Qwen3.5-0.8B").text
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide num_attention_heads=8.*"
                                         r"sizes that work for this model: \[1, 2, 4, 8\]"):
        check_shardable(cfg, 3)
    moe = find_preset("Qwen3.5-397B-A17B").text
    check_shardable(moe, 8, expert_parallel=True)
    with pytest.raises(ValueError, match="num_experts=512"):
        check_shardable(moe, 3, expert_parallel=True)


def test_llm_with_tensor_parallel_size_2_generates_what_one_process_does(checkpoint):
    """The engine over two ranks (this process and one it starts): continuous batching of mixed lengths with
    chunked prefill, greedy and seeded sampling with logprobs, prefix cache hits: what one process gives."""
    from qwen35 import LLM, SamplingParams

    kind, path = checkpoint
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TEXT_IDS, (n,), generator=gen).tolist() for n in (90, 7, 200, 33)]
    later = prompts[2][:150] + prompts[1]  # shares 150 tokens with the third, asked after it
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=8, ignore_eos=True, logprobs=2)] * 2
    kw = dict(skip_tokenizer_init=True, max_num_batched_tokens=64, kv_cache_memory_bytes=1 << 24)

    def run(llm):
        return llm.generate(prompts, params, use_tqdm=False) + llm.generate([later], params[0], use_tqdm=False)

    alone = run(LLM(str(path), **kw))
    llm = LLM(str(path), tensor_parallel_size=2, enable_expert_parallel=kind == "moe", **kw)
    try:
        got = run(llm)
        assert llm.engine.cache.all_free()
    finally:
        llm.close_workers()
    for g, a in zip(got, alone, strict=True):
        assert g.outputs[0].token_ids == a.outputs[0].token_ids
        lg = [lp.logprob for d in g.outputs[0].logprobs for lp in d.values()]
        la = [lp.logprob for d in a.outputs[0].logprobs for lp in d.values()]
        assert max(abs(x - y) for x, y in zip(lg, la, strict=True)) <= 1e-5
    assert got[4].num_cached_tokens >= 128


def test_tensor_parallel_refusals(checkpoint):
    from qwen35 import LLM

    _, path = checkpoint
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide"):
        LLM(str(path), tensor_parallel_size=3, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="not a loaded model"):
        LLM(qwen35.load_model(path, progress=False), tensor_parallel_size=2, skip_tokenizer_init=True)


def test_cli_generate_over_two_ranks(tmp_path, capsys):
    from test_engine_support import write_config

    from qwen35.cli import main

    folder = write_config(tmp_path / "tiny", vocab_size=248320)
    args = ["generate", str(folder), "Hello there", "--load-format", "dummy", "--max-tokens", "6", "--temperature",
            "0", "--ignore-eos", "--dtype", "float32"]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main([*args, "--tensor-parallel-size", "2"]) == 0
    assert capsys.readouterr().out == one and one.strip()


def test_a_rank_that_dies_fails_the_engine_with_a_clear_error(checkpoint):
    import time

    from qwen35 import LLM, SamplingParams

    _, path = checkpoint
    llm = LLM(str(path), tensor_parallel_size=2, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22)
    try:
        llm.workers.processes[0].kill()
        llm.workers.processes[0].join(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="qwen35-tp-rank1 exited"):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.monotonic() - t0 < 60
    finally:
        llm.close_workers()


def _start_server(tmp_path):
    from test_server_support import start_serve_process

    return start_serve_process(tmp_path, "--max-model-len", "4096", "--dtype", "float32", "--tensor-parallel-size", "2")


def _stop_server(proc, log) -> None:
    from test_server_support import stop_serve_process

    stop_serve_process(proc, log)


def test_serve_over_two_ranks_answers_the_openai_client(tmp_path):
    import openai

    proc, port, log = _start_server(tmp_path)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        ask = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0,
                   extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
        whole = client.chat.completions.create(**ask)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                           if c.choices)
        assert whole.usage.completion_tokens == 8
        assert whole.choices[0].message.content and whole.choices[0].message.content == streamed
    finally:
        _stop_server(proc, log)


def test_a_rank_killed_mid_generation_stops_the_server(tmp_path):
    """The stream in flight ends with an error event, and the server exits with an error naming the rank within
    60 s (requests that reach it meanwhile get 503: server/async_engine.py EngineUnavailable)."""
    import os
    import signal
    import time
    from pathlib import Path

    import openai

    proc, port, log = _start_server(tmp_path)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ranks = [int(c) for c in children if b"qwen35.parallel.workers" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(ranks) == 1
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=3000, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        got = 0
        with pytest.raises(openai.APIError):  # the stream's error event
            for _ in stream:
                got += 1
                if got == 3:
                    os.kill(ranks[0], signal.SIGKILL)
        t0 = time.monotonic()
        assert proc.wait(60) != 0
        assert time.monotonic() - t0 < 60
        assert "exited" in (tmp_path / "server.log").read_text()
    finally:
        _stop_server(proc, log)


def test_torchrun_ranks_follow_rank_0(tmp_path):
    """`torchrun --nproc-per-node 2 -m qwen35 generate ... --tensor-parallel-size 2`: the ranks come from the
    environment, rank 0 prints, the other follows and exits; the text is one process's."""
    import os
    import subprocess
    import sys

    from test_engine_support import write_config

    folder = write_config(tmp_path / "tiny", vocab_size=248320)
    args = ["generate", str(folder), "Hello there", "--load-format", "dummy", "--max-tokens", "6", "--temperature",
            "0", "--ignore-eos", "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "qwen35", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), "-m", "qwen35", *args, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()


def test_info_shows_memory_per_rank(capsys):
    from qwen35.cli import main
    from qwen35.config import find_preset
    from qwen35.model_info import model_info

    cfg = find_preset("Qwen3.5-0.8B")
    one = model_info(cfg, 4096)
    two = model_info(cfg, 4096, tensor_parallel_size=2)
    assert 2 * two.cache_bytes_per_rank == one.cache_bytes  # its KV heads and GDN heads only
    vision = 2 * one.params_vision  # the vision tower is replicated (bf16)
    # a half of the text model, and the replicated norms
    assert 0.5 < (two.weight_bytes_per_rank - vision) / (one.weight_bytes - vision) < 0.51
    moe = find_preset("Qwen3.5-397B-A17B")
    ep = model_info(moe, 4096, tensor_parallel_size=8, expert_parallel=True)
    assert 0.125 < ep.weight_bytes_per_rank / ep.weight_bytes < 0.13
    assert main(["info", "Qwen3.5-0.8B", "--tensor-parallel-size", "2", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "per rank of 2: total" in out


def test_fused_expert_checkpoints_are_read_in_shares(checkpoint, tmp_path):
    """The same MoE weights stored with fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I], as the
    official MoE checkpoints do): every rank reads its rows or columns of them (never a whole tensor) and the
    run is one process's."""
    import re
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    kind, path = checkpoint
    if kind != "moe":
        pytest.skip("experts only")
    tensors, experts = {}, {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name in f.keys():
            m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
            if m:
                experts.setdefault(m[1], {})[(int(m[2]), m[3])] = f.get_tensor(name)
            else:
                tensors[name] = f.get_tensor(name)
    for prefix, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]])
                                                         for e in range(n)])
        tensors[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(path / "config.json", fused / "config.json")
    save_file(tensors, str(fused / "model.safetensors"))
    alone = scripted_run(qwen35.load_model(path, progress=False))
    for expert_parallel in (False, True):
        out = tmp_path / f"rank0-{expert_parallel}.pt"
        mp.spawn(_rank, args=(2, _free_port(), str(fused), expert_parallel, str(out)), nprocs=2, join=True)
        sharded = torch.load(out)
        assert sharded["tokens"] == alone["tokens"]
        assert float((sharded["logprobs"] - alone["logprobs"]).abs().max()) <= 1e-5


@pytest.mark.parametrize("load", [{"quantization": "int8"}, {"dtype": "bfloat16"}], ids=["int8", "bf16"])
def test_int8_and_bf16_shares_stay_close_to_one_process(checkpoint, load, tmp_path):
    """int8 made at load per rank (per-row scales of each rank's columns for the row-parallel layers) and bf16
    (partial sums in fp32 where the kernels give them, rounded once) are not bit-equal to one process of the same
    format: they are about as far from the fp32 run as that process is."""
    kind, path = checkpoint
    exact = scripted_run(qwen35.load_model(path, progress=False))
    alone = scripted_run(qwen35.load_model(path, progress=False, **load))
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, _free_port(), str(path), kind == "moe", str(out), load), nprocs=2, join=True)
    sharded = torch.load(out)
    own = float((alone["logprobs"].float() - exact["logprobs"].float()).abs().max())
    ours = float((sharded["logprobs"].float() - exact["logprobs"].float()).abs().max())
    assert ours <= 1.5 * own + 0.05, (ours, own)
    if load.get("dtype") == "bfloat16":  # each rank's int8 screen of its head rows picks what the logits pick
        from qwen35.ops import cpu_kernels

        assert sharded["screen"] == (cpu_kernels.kernels() is not None)
        assert sharded["tokens"] == sharded["argmax"]
    if load.get("dtype") == "bfloat16" and kind == "dense":
        # rounded once: much nearer to the one-process bf16 run than to fp32. (Not MoE: each rank's routed + shared
        # sum is rounded to bf16 before the fp32 all-reduce, and random routers amplify that last bit: on an AMD
        # EPYC with AVX512-BF16 the runs part at a near-tie within three steps.)
        assert float((sharded["logprobs"].float() - alone["logprobs"].float()).abs().max()) <= 0.5 * own
        pairs = [(a, b) for s, t in zip(sharded["tokens"], alone["tokens"], strict=True)
                 for a, b in zip(s, t, strict=True)]
        assert sum(a == b for a, b in pairs) >= 0.8 * len(pairs)


def test_images_over_two_ranks(tmp_path):
    """An image prompt (chunked, so a chunk ends inside the image) over 2 ranks: rank 0 encodes the picture, every
    rank embeds its vocabulary rows and places the features; the tokens and logprobs are one process's."""
    from test_llm_vision import REAL_IDS, make_tiny_vl, picture

    make_tiny_vl(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture(0, (120, 90))},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    params = qwen35.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    kw = dict(dtype="float32", max_num_batched_tokens=32, kv_cache_memory_bytes=1 << 24)
    alone = qwen35.LLM(str(tmp_path), **kw).chat(messages, params, use_tqdm=False)[0]
    llm = qwen35.LLM(str(tmp_path), tensor_parallel_size=2, **kw)
    try:
        got = llm.chat(messages, params, use_tqdm=False)[0]
    finally:
        llm.close_workers()
    assert got.prompt_token_ids.count(REAL_IDS["image_token_id"]) > 32  # the image spans chunks
    assert got.outputs[0].token_ids == alone.outputs[0].token_ids
    lg = [lp.logprob for d in got.outputs[0].logprobs for lp in d.values()]
    la = [lp.logprob for d in alone.outputs[0].logprobs for lp in d.values()]
    assert max(abs(x - y) for x, y in zip(lg, la, strict=True)) <= 1e-5


def test_a_rank_that_stops_answering_fails_the_engine_within_the_timeout(checkpoint, monkeypatch):
    import os
    import signal
    import time

    from qwen35 import LLM, SamplingParams
    from qwen35.parallel.workers import RankLost

    _, path = checkpoint
    monkeypatch.setenv("QWEN35_TP_TIMEOUT_S", "5")
    llm = LLM(str(path), tensor_parallel_size=2, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22)
    worker = llm.workers.processes[0]
    try:
        os.kill(worker.pid, signal.SIGSTOP)  # alive, but silent
        t0 = time.monotonic()
        with pytest.raises(RankLost, match="out of step"):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.monotonic() - t0 < 30
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        llm.close_workers()


def test_preemption_over_two_ranks(checkpoint):
    """A cache that holds the longest request but not all at once: requests are preempted and recomputed on
    every rank alike; the tokens are one process's."""
    from qwen35 import LLM, SamplingParams
    from qwen35.model.cache import CacheLayout
    from qwen35.parallel.layout import local_text_config

    kind, path = checkpoint
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, TEXT_IDS, (n,), generator=gen).tolist() for n in (150, 120, 170, 90)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = LLM(str(path), skip_tokenizer_init=True).generate(prompts, params, use_tqdm=False)
    share = local_text_config(qwen35.config.ModelConfig.from_file(path).text, TensorParallel(0, 2, kind == "moe"))
    lay = CacheLayout.of(share, torch.float32)
    per_seq = 1 + -(-256 // (16 * lay.blocks_per_region))  # a state and the blocks of 256 tokens
    llm = LLM(str(path), tensor_parallel_size=2, enable_expert_parallel=kind == "moe", skip_tokenizer_init=True,
              max_model_len=256, kv_cache_memory_bytes=(per_seq + 2) * lay.region_bytes, max_num_batched_tokens=64)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
    finally:
        llm.close_workers()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in alone]


def test_a_script_without_a_main_guard_can_start_ranks(tmp_path):
    """The ranks are fresh interpreters (python -m qwen35.parallel.workers), not multiprocessing children that
    re-import the caller's script: an LLM made at a script's top level works, and the script exits cleanly."""
    import os
    import subprocess
    import sys

    from test_engine_support import write_config

    folder = write_config(tmp_path / "tiny", vocab_size=248320)
    script = tmp_path / "top_level.py"
    script.write_text(
        "import qwen35\n"
        f"llm = qwen35.LLM({str(folder)!r}, load_format='dummy', tensor_parallel_size=2, skip_tokenizer_init=True,\n"
        "                 kv_cache_memory_bytes=1 << 22)\n"
        "out = llm.generate([[1, 2, 3]], qwen35.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),\n"
        "                   use_tqdm=False)\n"
        "print('tokens', list(out[0].outputs[0].token_ids))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tokens [") and len(eval(done.stdout.split(" ", 1)[1])) == 3


# Every share of this shape is whole 128 x 128 FP8 tiles at 2 ranks (as the official FP8 releases' shapes are at 8).
FP8_SHAPE = dict(vocab_size=132, hidden_size=128, head_dim=128, num_attention_heads=4, num_key_value_heads=2,
                 linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=2,
                 linear_num_value_heads=4, intermediate_size=256,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                      mrope_section=[16, 8, 8], mrope_interleaved=True))
FP8_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fp8_checkpoints_over_two_ranks(moe, tmp_path):
    """An FP8 checkpoint (block-128 e4m3 with tile scales, written as the official releases are): each rank reads
    its whole tiles and their scales. Widened to fp32 the run is one process's (1e-5); kept in 8 bits (bf16) it
    is as near to the fp32 run as one process is."""
    from fp8_checkpoints import write_fp8_checkpoint

    ref = make_hf_model("causal", moe=moe, seed=5, **FP8_SHAPE, **(FP8_MOE if moe else {}))
    src = save_hf(ref, tmp_path / "bf16")
    path = write_fp8_checkpoint(src, tmp_path / "fp8")
    results = {}
    for dtype in ("float32", "bfloat16"):
        alone = scripted_run(qwen35.load_model(path, dtype=dtype, progress=False))
        out = tmp_path / f"rank0-{dtype}.pt"
        mp.spawn(_rank, args=(2, _free_port(), str(path), moe, str(out), {"dtype": dtype}), nprocs=2, join=True)
        results[dtype] = alone, torch.load(out)
    alone, sharded = results["float32"]
    assert sharded["tokens"] == alone["tokens"]
    assert float((sharded["logprobs"] - alone["logprobs"]).abs().max()) <= 1e-5
    exact = alone["logprobs"]
    alone8, sharded8 = results["bfloat16"]
    own = float((alone8["logprobs"].float() - exact).abs().max())
    assert float((sharded8["logprobs"].float() - exact).abs().max()) <= 1.5 * own + 0.05


def test_fp8_shares_must_be_whole_tiles():
    from qwen35.config import find_preset
    from qwen35.parallel.layout import Sharder

    cfg = find_preset("Qwen3.5-0.8B").text  # 2 KV heads of 256 over 4 ranks: ranks 2 and 3 use head 1
    sharder = Sharder(cfg, TensorParallel(2, 4))
    assert sharder.block_cuts("model.layers.3.self_attn.k_proj.scale", 128) == (0, [slice(2, 4)])
    small = dict(vars(cfg))
    tiny = type(cfg)(**{**small, "head_dim": 64, "num_key_value_heads": 4})
    with pytest.raises(ValueError, match="k_proj.weight: tensor parallelism over 128x128-block weights needs"):
        Sharder(tiny, TensorParallel(1, 4)).block_cuts("model.layers.3.self_attn.k_proj.scale", 128)
