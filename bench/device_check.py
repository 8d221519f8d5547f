"""The short check to run where a GPU is lent: parity with transformers and speed, on one device.

    python -m bench.device_check --device cuda [--model 0.8b] [--prefill 4096] [--context 1024] [--steps 32]

1. Parity (fp32, TF32 off): qwen35 and transformers 5.24 load the same random-weight checkpoint (bench/models.py)
   onto the device; the logits of a 257-token prompt through qwen35's cache path against transformers' forward,
   then 8 greedy tokens from each.
2. Speed (bf16): qwen35's prefill of `--prefill` tokens and its decode after `--context` tokens (real prefill),
   against transformers on the same device (llama.cpp is CPU-only here).
3. FP8: the checkpoint in the official block-FP8 layout, kept in 8 bits on the device (bf16 activations, widened
   per product there), against the same file widened exactly to fp32: logits close, decode speed.
Prints one line `DEVICE_CHECK {json}`; exit status 1 when parity fails. Runs on the CPU too (`--device cpu`: the
tests keep it working without a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Ours:
    """qwen35 on one sequence through its cache path (what the engine runs)."""

    def __init__(self, path: str, dtype, device, max_tokens: int):
        import qwen35
        from qwen35.engine.direct import DirectRun

        self.model = qwen35.load_model(path, dtype=dtype, device=device, progress=False)
        self.run = DirectRun(self.model, num_seqs=1, max_len=max_tokens + 16)
        self.device = device

    def forward(self, ids: list[int]):
        """All-position logits (fp32) of `ids` appended to the sequence."""
        import torch

        hidden, _ = self.run.forward({0: ids})
        return self.model.compute_logits(hidden, torch.float32)

    def last_token(self, ids: list[int]) -> int:
        return int(self.forward(ids)[-1].argmax())

    def restart(self) -> None:
        """An empty sequence in place of the current one."""
        self.run.restart(0)


def parity(path: str, device, vocab: int) -> dict:
    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ids = np.random.default_rng(0).integers(0, vocab, size=257).tolist()
    ours = _Ours(path, torch.float32, device, 300)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    with torch.inference_mode():
        got = ours.forward(ids)
        want = hf(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        diff = (got - want).abs().max().item()
        scale = want.abs().max().item()
        tokens = [int(got[-1].argmax())]
        for _ in range(7):
            tokens.append(ours.last_token([tokens[-1]]))
        ref = hf.generate(torch.tensor([ids], device=device), max_new_tokens=8, do_sample=False)[0, len(ids):]
    ref = ref.tolist()
    return {"logits_max_abs_diff": diff, "logits_max_abs": scale, "greedy_ours": tokens, "greedy_transformers": ref,
            "ok": diff <= 1e-3 * max(1.0, scale) and tokens == ref}


def speed(path: str, device, vocab: int, prefill: int, context: int, steps: int) -> dict:
    import torch
    import transformers

    rng = np.random.default_rng(1)
    out: dict = {}
    with torch.inference_mode():
        ours = _Ours(path, torch.bfloat16, device, max(prefill, context) + steps + 8)
        ids = rng.integers(0, vocab, size=prefill).tolist()
        ours.last_token(ids[:64])  # warm-up
        ours.restart()
        _sync(device)
        t0 = time.perf_counter()
        ours.last_token(ids)
        _sync(device)
        out["ours_prefill_tps"] = prefill / (time.perf_counter() - t0)
        out["ours_decode_tps"] = _decode_tps(ours, rng.integers(0, vocab, size=context).tolist(), steps, device)

        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        x = torch.tensor([rng.integers(0, vocab, size=context).tolist()], device=device)
        r = hf(input_ids=x, use_cache=True, logits_to_keep=1)
        cache, tok = _hf_cache(r), r.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            r = hf(input_ids=tok, cache=cache, use_cache=True)
            cache, tok = _hf_cache(r), r.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
        out["transformers_decode_tps"] = 1 / float(np.median(times))
    return out


def _hf_cache(out):
    """transformers 5.24 returns the cache as `cache` (older releases: `past_key_values`)."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _decode_tps(ours: _Ours, prompt: list[int], steps: int, device) -> float:
    ours.restart()
    tok = ours.last_token(prompt)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        tok = ours.last_token([tok])
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1 / float(np.median(times))


def fp8_check(path: str, device, vocab: int, context: int, steps: int) -> dict:
    import torch

    ids = np.random.default_rng(2).integers(0, vocab, size=65).tolist()
    with torch.inference_mode():
        exact = _Ours(path, torch.float32, device, 100).forward(ids)
        kept = _Ours(path, torch.bfloat16, device, max(100, context) + steps + 8)
        got = kept.forward(ids)
        diff, scale = (got - exact).abs().max().item(), exact.abs().max().item()
        agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
        tps = _decode_tps(kept, np.random.default_rng(3).integers(0, vocab, size=context).tolist(), steps, device)
    quantized = sum(1 for m in kept.model.modules() if type(m).__name__ in ("QuantLinear", "QuantExperts"))
    return {"quantized_modules": quantized, "logits_max_abs_diff": diff, "logits_max_abs": scale,
            "argmax_agreement": agree, "fp8_decode_tps": tps, "ok": quantized > 0 and agree >= 0.9}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from bench import models

    p = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="0.8b", help="a bench checkpoint: 0.8b, moe, tiny")
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cache = models.default_cache_dir() if args.cache_dir is None else Path(args.cache_dir)
    path = str(models.make_checkpoint(cache, args.model))
    vocab = 500 if args.model.startswith("tiny") else 248044
    res = {"device": str(device), "model": args.model,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    res["parity"] = parity(path, device, vocab)
    res["speed"] = speed(path, device, vocab, args.prefill, args.context, args.steps)
    res["fp8"] = fp8_check(str(models.make_fp8_checkpoint(cache, args.model)), device, vocab, args.context,
                           args.steps)
    print("DEVICE_CHECK " + json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    _res = main()
    sys.exit(0 if _res["parity"]["ok"] and _res["fp8"]["ok"] else 1)
