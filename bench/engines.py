"""The three engines behind one small interface, so that a task times them the same way.

    eng.open(n_seqs, max_len)          fresh, empty state for n_seqs sequences of up to max_len tokens each
    eng.prefill(i, ids) -> int         feed a prompt to sequence i (in chunks); the greedy next token
    eng.prefill_all(prompts) -> [int]  every sequence's prompt (transformers: one [B, T] call; equal lengths)
    eng.step(tokens) -> [int]          one decode step: one token for every sequence; the greedy next tokens
    eng.synthetic(context)             (ours only) pretend every sequence already holds `context` tokens:
                                       the KV blocks and GDN state are filled with random numbers

A step always includes the head (logits of the new tokens) and the greedy pick, as a real decode does.
"""

from __future__ import annotations

import time


class Unsupported(RuntimeError):
    """This engine cannot run this task."""


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


# ------------------------------------------------------------------------------------------------ ours
class Ours:
    name = "qwen35"

    def __init__(self, path: str, threads: int, chunk: int = 4096, dtype: str = "bfloat16",
                 quantization: str | None = None):
        import inspect

        import torch

        import qwen35

        _threads(threads)
        self.torch = torch
        self.chunk = chunk
        kw = {}
        if quantization:
            if "quantization" not in inspect.signature(qwen35.load_model).parameters:
                raise Unsupported(f"qwen35.load_model has no quantization={quantization!r} yet")
            kw["quantization"] = quantization
        t0 = time.perf_counter()
        self.model = qwen35.load_model(path, dtype=getattr(torch, dtype), progress=False, **kw)
        # as the engine's model runner does: greedy steps read the int8 screen of the head where it applies
        self.head_screen = self.model.enable_head_screen()
        self.load_s = time.perf_counter() - t0
        self.run = None

    def open(self, n_seqs: int, max_len: int) -> None:
        """The engine's own allocator and model runner (qwen35.engine.direct), sized for this task."""
        from qwen35.engine.direct import DirectRun

        self.run = None
        self.run = DirectRun(self.model, num_seqs=n_seqs, max_len=max_len + 16)
        self.cache_bytes = self.run.cache_bytes

    def _forward(self, idx: list[int], chunks) -> list[int]:
        torch = self.torch
        hidden, batch = self.run.forward(dict(zip(idx, chunks, strict=True)))
        last = torch.tensor(batch.starts[1:], dtype=torch.long) - 1
        if self.head_screen:  # greedy, as the engine's model runner: the argmax without the full logits
            return self.model.greedy_tokens(hidden[last]).tolist()
        logits = self.model.compute_logits(hidden[last], torch.float32)  # as the engine's model runner
        return logits.argmax(-1).tolist()

    def prefill(self, i: int, ids: list[int]) -> int:
        nxt = None
        for a in range(0, len(ids), self.chunk):
            nxt = self._forward([i], [ids[a:a + self.chunk]])[0]
        return nxt

    def argmax_all(self, ids: list[int]) -> list[int]:
        """The greedy next token at every position of one prompt (fp32 logits of every position)."""
        self.open(1, len(ids) + 8)
        out = []
        for a in range(0, len(ids), self.chunk):
            hidden, _ = self.run.forward({0: ids[a:a + self.chunk]})
            out += self.model.compute_logits(hidden, self.torch.float32).argmax(-1).tolist()
        return out

    def prefill_all(self, prompts: list[list[int]]) -> list[int]:
        """Several prompts per varlen forward, up to `chunk` tokens each (as an engine's scheduler would)."""
        nxt: list[int | None] = [None] * len(prompts)
        at = [0] * len(prompts)
        while any(a < len(p) for a, p in zip(at, prompts, strict=True)):
            idx, chunks, budget = [], [], self.chunk
            for i, p in enumerate(prompts):
                if at[i] < len(p) and budget > 0:
                    take = p[at[i]:at[i] + budget]
                    idx.append(i)
                    chunks.append(take)
                    budget -= len(take)
            outs = self._forward(idx, chunks)
            for i, c, o in zip(idx, chunks, outs, strict=True):
                at[i] += len(c)
                nxt[i] = o
        return nxt

    def step(self, tokens: list[int]) -> list[int]:
        return self._forward(list(range(len(tokens))), [[t] for t in tokens])

    def synthetic(self, context: int, seed: int = 0) -> None:
        """Random KV for `context` tokens and a random GDN state in every sequence. Decode reads exactly what it
        would after a real prefill of that length; only the values differ."""
        for i in range(len(self.run.seqs)):
            self.run.hold(i, context)
        self.run.fill_random(seed)


class OursFullHead(Ours):
    """qwen35 with the head screen off (QWEN35_HEAD_SCREEN=0): every greedy step reads the whole bf16 head, as
    the peers do. Measured next to `Ours` to show what the screen is worth."""

    name = "qwen35, full head"

    def __init__(self, *args, **kw):
        import os

        os.environ["QWEN35_HEAD_SCREEN"] = "0"
        super().__init__(*args, **kw)


# ------------------------------------------------------------------------------------------------ transformers
class HF:
    name = "transformers"

    def __init__(self, path: str, threads: int, chunk: int = 4096, dtype: str = "bfloat16"):
        import torch
        import transformers

        _threads(threads)
        torch.set_flush_denormal(True)  # the same favour our engine gets (GDN decay underflows)
        self.torch = torch
        self.chunk = chunk
        t0 = time.perf_counter()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.load_s = time.perf_counter() - t0
        self.cache = None
        self.n_seqs = 0

    def open(self, n_seqs: int, max_len: int) -> None:
        self.cache = None
        self.n_seqs = n_seqs

    def _call(self, ids) -> list[int]:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1].argmax(-1).tolist()

    def prefill(self, i: int, ids: list[int]) -> int:
        if self.n_seqs != 1:
            raise Unsupported("transformers: one cache holds one batch; use prefill_all")
        return self.prefill_all([ids])[0]

    def prefill_all(self, prompts: list[list[int]]) -> list[int]:
        torch = self.torch
        if len({len(p) for p in prompts}) != 1:
            raise Unsupported("transformers: prompts of one batch must have equal lengths here")
        ids = torch.tensor(prompts, dtype=torch.long)
        nxt = None
        for a in range(0, ids.shape[1], self.chunk):
            nxt = self._call(ids[:, a:a + self.chunk])
        return nxt

    def step(self, tokens: list[int]) -> list[int]:
        return self._call(self.torch.tensor(tokens, dtype=self.torch.long)[:, None])

    def synthetic(self, context: int, seed: int = 0) -> None:
        raise Unsupported("transformers: no synthetic context (its cache is filled by a real prefill only)")


# ------------------------------------------------------------------------------------------------ llama.cpp
class Llama:
    """llama-cpp-python: the model loaded by `llama_cpp.Llama` (as its users do), each task in a context of its own
    made with the same parameters (n_threads, n_batch 512, n_ubatch 512, flash attention as given), plus n_seq_max
    for batches. Tokens go in through `llama_decode` with our own batch so that several sequences can decode
    together; the greedy pick reads the logits llama.cpp returns."""

    name = "llama.cpp"

    def __init__(self, path: str, threads: int, chunk: int = 512, flash_attn: str = "off"):
        try:
            import llama_cpp
        except ImportError as e:
            raise Unsupported(f"llama_cpp is not importable ({e}); pip install llama-cpp-python==0.3.36") from e
        import numpy as np

        self.lc = llama_cpp
        self.np = np
        self.threads = threads
        self.n_batch = chunk
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                                   n_batch=chunk, n_ubatch=chunk, logits_all=False, verbose=False,
                                   flash_attn=flash_attn == "on")
        self.load_s = time.perf_counter() - t0
        self.fa = {"off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                   "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attn]
        self.n_vocab = self.llm.n_vocab()
        self.ctx = None
        self.batch = None
        self.pos: list[int] = []

    def _free(self) -> None:
        if self.batch is not None:
            self.lc.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.lc.llama_free(self.ctx)
            self.ctx = None

    def open(self, n_seqs: int, max_len: int) -> None:
        lc = self.lc
        self._free()
        p = lc.llama_context_default_params()
        src = self.llm.context_params
        for f, _ in type(p)._fields_:
            try:
                setattr(p, f, getattr(src, f))
            except (AttributeError, TypeError):
                pass
        p.n_seq_max = n_seqs
        p.n_ctx = n_seqs * (max_len + 16)
        p.n_batch = max(self.n_batch, n_seqs)
        p.n_ubatch = max(self.n_batch, n_seqs)
        p.n_threads = p.n_threads_batch = self.threads
        p.flash_attn_type = self.fa
        p.kv_unified = False
        self.ctx = lc.llama_init_from_model(self.llm._model.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp: could not create a context")
        self.batch = lc.llama_batch_init(max(self.n_batch, n_seqs), 0, n_seqs)
        self.pos = [0] * n_seqs

    def _decode(self, items: list[tuple[int, int, bool]]) -> list[int]:
        """items: (seq, token, want_logits); positions follow each sequence's count."""
        b = self.batch
        b.n_tokens = len(items)
        outs = []
        for j, (s, tok, want) in enumerate(items):
            b.token[j] = tok
            b.pos[j] = self.pos[s]
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = s
            b.logits[j] = want
            self.pos[s] += 1
            if want:
                outs.append(j)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        res = []
        for j in outs:
            ptr = self.lc.llama_get_logits_ith(self.ctx, j)
            res.append(int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax()))
        return res

    def prefill(self, i: int, ids: list[int]) -> int:
        nxt = None
        for a in range(0, len(ids), self.n_batch):
            part = ids[a:a + self.n_batch]
            last = a + len(part) == len(ids)
            r = self._decode([(i, t, last and k == len(part) - 1) for k, t in enumerate(part)])
            if r:
                nxt = r[0]
        return nxt

    def prefill_all(self, prompts: list[list[int]]) -> list[int]:
        return [self.prefill(i, p) for i, p in enumerate(prompts)]

    def argmax_all(self, ids: list[int]) -> list[int]:
        """The greedy next token at every position of one prompt (logits requested for every token)."""
        self.open(1, len(ids) + 8)
        out = []
        for a in range(0, len(ids), self.n_batch):
            out += self._decode([(0, t, True) for t in ids[a:a + self.n_batch]])
        return out

    def step(self, tokens: list[int]) -> list[int]:
        return self._decode([(s, t, True) for s, t in enumerate(tokens)])

    def synthetic(self, context: int, seed: int = 0) -> None:
        raise Unsupported("llama.cpp: no synthetic context")


class OursExact(Ours):
    """A GGUF widened exactly to float32 at load (the weights' own values, nothing rounded): the reference that
    llama.cpp's agreement with the kept blocks is set against."""

    def __init__(self, path: str, threads: int, chunk: int = 4096, dtype: str = "float32",
                 quantization: str | None = None):
        super().__init__(path, threads, chunk, dtype="float32")


ENGINES = {"ours": Ours, "ours-fullhead": OursFullHead, "ours-fp8": Ours, "ours-gguf": Ours,
           "ours-gguf-exact": OursExact, "hf": HF, "llama": Llama}
