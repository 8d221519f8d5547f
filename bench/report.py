"""Results JSON -> docs/benchmarks.md (+ PNG plots in docs/benchmarks/)."""

from __future__ import annotations

import statistics
from pathlib import Path

ENGINES = ("ours", "llama", "hf")
NAMES = {"ours": "qwen35", "hf": "transformers 5.24", "llama": "llama.cpp (llama-cpp-python 0.3.36)"}
SHORT = {"ours": "qwen35", "hf": "transformers", "llama": "llama.cpp"}
REFERENCE_397B = Path(__file__).resolve().parents[2] / "shared" / "reference" / "Qwen3.5-397B-A17B-FP8"


# ------------------------------------------------------------------------------------------------ metrics
def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def metric(res: dict, what: str) -> float | None:
    """prefill_tps, ttft_ms, decode_tps (all sequences together), ctx_prefill_tps (the real prefill before a decode),
    rss_mb."""
    if res.get("error"):
        return None
    t = res["task"]
    if what == "prefill_tps" and t["kind"] == "prefill":
        return t["n"] / _med(res["prefill_s"])
    if what == "ttft_ms" and t["kind"] == "prefill":
        return 1000 * _med(res["prefill_s"])
    if what == "decode_tps" and "step_s" in res:
        return t.get("batch", 1) / _med(res["step_s"])
    if what == "step_ms" and "step_s" in res:
        return 1000 * _med(res["step_s"])
    if what == "ctx_prefill_tps" and t["kind"] == "decode" and res.get("prefill_s"):
        return t["context"] * t.get("batch", 1) / res["prefill_s"][0]
    if t["kind"] == "e2e":
        return {"decode_tps": res.get("decode_tps"), "ttft_ms": 1000 * res["ttft_s"] if "ttft_s" in res else None,
                "ttft_last_ms": 1000 * res["ttft_last_s"] if "ttft_last_s" in res else None,
                "rss_mb": res.get("rss_mb")}.get(what)
    if what == "rss_mb":
        return res.get("rss_mb")
    return None


def select(data: dict, section: str, model: str | None = None, engine: str | None = None, gguf=None, **task) -> list:
    out = []
    for r in data["results"]:
        if r.get("section") != section or (model and r.get("model") != model) or (engine and r["engine"] != engine):
            continue
        if gguf and r.get("gguf") != gguf:
            continue
        if any(r["task"].get(k) != v for k, v in task.items()):
            continue
        out.append(r)
    return out


def value(data, section, model, engine, what, gguf=None, **task):
    return _med([metric(r, what) for r in select(data, section, model, engine, gguf, **task)])


def ratio(data, section, model, a, b, what, gguf=None, **task) -> float | None:
    """Median over rounds of the per-round ratio a/b (pairs measured next to each other)."""
    ra = {r["round"]: metric(r, what) for r in select(data, section, model, a, gguf, **task)}
    rb = {r["round"]: metric(r, what) for r in select(data, section, model, b, gguf, **task)}
    pairs = [ra[k] / rb[k] for k in ra if k in rb and ra[k] and rb[k]]
    return _med(pairs)


def errors(data, section, model, engine, **task) -> str | None:
    rs = select(data, section, model, engine, **task)
    errs = [r["error"] for r in rs if r.get("error")]
    if rs and len(errs) == len(rs):
        return errs[0]
    return None


def fmt(x, nd=1, unit="") -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}{unit}"
    return f"{x:.{nd}f}{unit}"


def fx(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def cell(data, section, model, engine, what, nd=1, gguf=None, **task) -> str:
    v = value(data, section, model, engine, what, gguf, **task)
    if v is None:
        e = errors(data, section, model, engine, **task)
        if e:
            return "error" if "Unsupported" not in e else "n/a"
        return "–"
    return fmt(v, nd)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


# ------------------------------------------------------------------------------------------------ bytes
def _cfg(name: str):
    from bench.models import text_config_dict
    from qwen35.config import ModelConfig

    return ModelConfig.from_dict(text_config_dict(name))


def bandwidth(data) -> float | None:
    return _med([r.get("read_gbs") for r in data["results"] if r.get("section") == "bandwidth"])


def limit_tps(name: str, context: int, batch: int, bw_gbs: float | None,
              screened: bool = False) -> tuple[float, float | None]:
    """(bytes per token, tok/s limit). `screened`: qwen35's greedy steps, which read the head as int8."""
    from bench.bytes_model import decode_bytes, screened_head_saving

    cfg = _cfg(name)
    b = decode_bytes(cfg, context, batch).per_token - (screened_head_saving(cfg) / batch if screened else 0.0)
    return b, (bw_gbs * 1e9 / b if bw_gbs else None)


# ------------------------------------------------------------------------------------------------ report
def summary_text(data: dict) -> str:
    lines = ["", "section  model  task  " + "  ".join(SHORT[e] for e in ENGINES)]
    seen = set()
    for r in data["results"]:
        if r.get("section") == "bandwidth":
            continue
        key = (r["section"], r["model"], tuple(sorted(r["task"].items())))
        if key in seen:
            continue
        seen.add(key)
        t = r["task"]
        if t["kind"] == "agree":  # no speed: the gguf section's agreement table
            continue
        what = "prefill_tps" if t["kind"] == "prefill" else "decode_tps"
        label = (f"prefill {t['n']}" if t["kind"] == "prefill" else
                 f"{t['kind']}@{t['context']} b{t.get('batch', 1)} {t.get('fill', '')}")
        vals = [fmt(value(data, r["section"], r["model"], e, what, **t), 2) for e in ENGINES]
        lines.append(f"{r['section']}  {r['model']}  {label}  " + "  ".join(vals))
    bw = bandwidth(data)
    if bw:
        lines.append(f"memory read bandwidth {bw:.1f} GB/s")
    for n in data.get("notes", []):
        lines.append("note: " + n)
    return "\n".join(lines)


def write(data: dict, out: Path) -> None:
    out = Path(out)
    figdir = out.parent / "benchmarks"
    figdir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(data, figdir)
    out.write_text(markdown(data, {k: f"benchmarks/{v.name}" for k, v in plots.items()}))


def markdown(data: dict, plots: dict) -> str:
    p = data["plan"]
    m = data["machine"]
    dense = (p.get("models") or ["0.8b"])[0]
    moe = "moe" if p.get("models") is None else (p["models"][-1] if len(p["models"]) > 1 else None)
    bw = bandwidth(data)
    L: list[str] = []
    a = L.append
    a("# Benchmarks: qwen35 against transformers and llama.cpp on this CPU")
    a("")
    a("Generated by `bench/` (`qwen35 bench`); every figure below comes from the run described in *Machine and run*."
      " Rerun with the commands in *How to rerun*; `qwen35 bench --report-only` rewrites this page from "
      "`docs/benchmarks/results.json`.")
    a("")
    a("**Method.** Checkpoints with random weights (normal, std 0.02; GDN decay spread as in trained models) in the "
      "official safetensors layout, saved by transformers, so that the engines read the same numbers; llama.cpp "
      "reads the GGUF made from that folder by the converter of the llama-cpp-python 0.3.36 sdist "
      "(`convert_hf_to_gguf.py --outtype bf16 --no-mtp`). bf16 weights everywhere, "
      f"{p['threads']} threads everywhere. Each measurement is a fresh process (one engine, one task; its peak RSS is "
      "its own) after a warm-up prompt; engines are interleaved round by round (rotating order) and ratios are taken "
      "inside a round, then the median over rounds is reported. The exception is the decode-against-context sweep: "
      "there one process holds every model and context and they take turns step by step, because this host's "
      "memory bandwidth drifts by up to 2x within seconds. Prompts are random token ids, the same for every "
      "engine. A *decode step* is one token per sequence through the model, the head and a greedy pick; decode "
      "tok/s = sequences / median step time. *Prefill* = time to first token (prompt through the model, head on the "
      "last token, greedy pick), one request at a time; ours and transformers prefill in chunks of "
      f"{p['chunk']} tokens, llama.cpp in its n_batch = n_ubatch = 512. llama.cpp flash attention: {p['llama_fa']} "
      "(the default of `llama_cpp.Llama`; a side check with it on, `--llama-fa on`, was not faster here: prefill 4K "
      "129-142 against 137-138 tok/s, decode after 4K 16.6-18.7 against 18.0-19.2 tok/s).")
    a("")
    # ---------------------------------------------------------------- machine
    a("## Machine and run")
    a("")
    a("| | |")
    a("|---|---|")
    a(f"| CPU | {m.get('Model name', '?')} ({m.get('CPU(s)', m.get('cpus'))} CPUs; {m.get('Flags', '')}) |")
    a(f"| memory | {m.get('mem_gib', '?')} GiB |")
    la0, la1 = data.get("loadavg_start"), data.get("loadavg_end")
    a(f"| load average (1/5/15 min) | start {' '.join(f'{x:.2f}' for x in la0)}; end "
      f"{' '.join(f'{x:.2f}' for x in la1 or [])} (shared machine: other jobs ran during the run) |")
    per = [r.get("loadavg_start", [0])[0] for r in data["results"] if r.get("loadavg_start")]
    if per:
        a(f"| 1-min load when measurements started | median {statistics.median(per):.2f}, min {min(per):.2f}, "
          f"max {max(per):.2f} |")
    oth = [r["others_cpu"] for r in data["results"] if r.get("others_cpu") is not None]
    if oth:
        a(f"| CPU share taken by other processes while a measurement ran | median {statistics.median(oth):.0%}, max "
          f"{max(oth):.0%} (a measurement waits for a quiet machine and is repeated, up to "
          f"{p.get('retries', 0)} times, when others took more than {p.get('quiet', 0):.0%}"
          + (f" and it took less than {p['retry_max_s']} s" if p.get("retry_max_s") else "")
          + "; the least disturbed attempt is kept) |")
    v = m.get("versions", {})
    a(f"| software | Python {m.get('python')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
      f"llama-cpp-python {v.get('llama_cpp')}, numpy {v.get('numpy')} |")
    hashes = []
    for r in data["results"]:
        if r.get("src_hash") and r["src_hash"] not in hashes:
            hashes.append(r["src_hash"])
    changed = (f"; **the qwen35 sources changed during the run** ({len(hashes)} versions measured: "
               f"{', '.join(hashes)}; see `src_hash` in results.json)") if len(hashes) > 1 else ""
    if data.get("merged"):  # results of two runs: each section from one of them (bench/merge note below)
        for part in data["merged"]:
            a(f"| run of {part['commit']} | sections {', '.join(part['sections'])}: `{part['command']}`, "
              f"{part['started']}, {part['duration_s'] / 60:.0f} min |")
    else:
        a(f"| qwen35 commit | {m.get('git', '?')}{changed} |")
        a(f"| date, duration | {data.get('started')}, {data.get('duration_s', 0) / 60:.0f} min |")
        a(f"| command | `{data.get('command')}` |")
    a(f"| rounds | {p['rounds']} (engines interleaved), {p['steps']} timed decode steps per measurement |")
    a("")
    # ---------------------------------------------------------------- targets
    a("## Targets")
    a("")
    tg = targets(data, dense, moe)
    a("| target | measured | met? |")
    a("|---|---|---|")
    partial = not {"prefill", "decode"} & set(p["sections"])  # a page of a few sections: only their targets
    for name, meas, ok in tg:
        if ok is None and partial:
            continue
        a(f"| {name} | {meas} | {'**yes**' if ok else 'no' if ok is not None else 'not measured'} |")
    a("")
    if "engines" in plots:
        a(f"![engines relative to llama.cpp]({plots['engines']})")
        a("")
    # ---------------------------------------------------------------- bandwidth + bytes
    bws = [r for r in data["results"] if r.get("section") == "bandwidth"]
    if bws:
        a("## Memory bandwidth and the decode limit")
        a("")
        a(f"Measured with `python -m bench.membw {p['threads']}` (torch, {p['threads']} threads, 1 GiB arrays, median "
          "of 7):")
        a("")
        a("| read (sum) | copy (read + write) | bf16 `F.linear`, 1 token x [248320, 1024] (the 0.8B head) |")
        a("|---|---|---|")
        a(f"| {fmt(_med([r['read_gbs'] for r in bws]))} GB/s | {fmt(_med([r['copy_gbs'] for r in bws]))} GB/s | "
          f"{fmt(_med([r['bf16_head_linear_gbs'] for r in bws]))} GB/s |")
        a("")
        a("Bytes read per decoded token (`bench/bytes_model.py`): every weight a step touches (the head included; for "
          "the tied 0.8B the head *is* the embedding table; for the MoE only the routed experts in use), the KV of "
          "the full-attention layers over the context, and the fp32 GDN state read and written back. Decode cannot "
          "beat bandwidth / bytes; *fraction of limit* = measured tok/s / that.")
        a("")
        a("| model | context | weights | KV | GDN state r+w | bytes/token | limit at read bandwidth |")
        a("|---|---|---|---|---|---|---|")
        from bench.bytes_model import decode_bytes

        for name in [dense, dense + "-twin"] + ([moe] if moe else []):
            for c in sorted(set(p["contexts"]) | set(p["sweep"])) if not name.startswith("moe") else [1024]:
                b = decode_bytes(_cfg(name), c, 1)
                lim = bw * 1e9 / b.per_token if bw else None
                a(f"| {name} | {_k(c)} | {b.weights / 1e9:.3f} GB | {b.kv / 1e6:.1f} MB | {b.state / 1e6:.1f} MB | "
                  f"{b.per_token / 1e9:.3f} GB | {fmt(lim, 1)} tok/s |")
        a("")
    # ---------------------------------------------------------------- prefill
    if select(data, "prefill"):
        a(f"## Prefill ({dense}, batch 1)")
        a("")
        a("tok/s (time to first token in ms). Ratio: ours / peer, paired per round. transformers is not run above "
          f"{p['hf_max']} tokens.")
        a("")
        a("| prompt | " + " | ".join(SHORT[e] for e in ENGINES) + " | ours / llama.cpp | ours / transformers |")
        a("|---|" + "---|" * (len(ENGINES) + 2))
        for n in p["prefill"]:
            cells = []
            for e in ENGINES:
                tps = cell(data, "prefill", dense, e, "prefill_tps", n=n)
                tt = value(data, "prefill", dense, e, "ttft_ms", n=n)
                cells.append(f"{tps} ({fmt(tt, 0)} ms)" if tt else tps)
            r_l = ratio(data, "prefill", dense, "ours", "llama", "prefill_tps", n=n)
            r_h = ratio(data, "prefill", dense, "ours", "hf", "prefill_tps", n=n)
            a(f"| {_k(n)} | " + " | ".join(cells) + f" | {fx(r_l)} | {fx(r_h)} |")
        for c in [c for c in p["contexts"] if c > max(p["prefill"])]:
            cells = []
            for e in ENGINES:
                tps = value(data, "decode", dense, e, "ctx_prefill_tps", context=c, batch=1)
                cells.append(f"{fmt(tps)} ({fmt(1000 * c / tps if tps else None, 0)} ms)" if tps else "–")
            r_l = ratio(data, "decode", dense, "ours", "llama", "ctx_prefill_tps", context=c, batch=1)
            r_h = ratio(data, "decode", dense, "ours", "hf", "ctx_prefill_tps", context=c, batch=1)
            a(f"| {_k(c)} † | " + " | ".join(cells) + f" | {fx(r_l)} | {fx(r_h)} |")
        if any(c > max(p["prefill"]) for c in p["contexts"]):
            a("")
            a("† the prefill that fills the context before a decode measurement (one per round; no warm-up of that "
              "length).")
        a("")
    # ---------------------------------------------------------------- decode
    if select(data, "decode"):
        a(f"## Decode ({dense}, batch 1, after a real prefill of the context)")
        a("")
        a("Decode tok/s; in brackets the fraction of the bandwidth limit (see above). qwen35's fraction is against "
          "the bytes it reads: its greedy steps read the head through the int8 screen (see *The greedy head "
          "screen*); *limit* is the peers'. The bandwidth is one process's measurement, and on this host a "
          "process's bandwidth differs (a bare read measured 26-51 GB/s in back-to-back processes, and drifts "
          "within one), so a fraction can pass 100%, and the ratio of two rows of this table (each a separate "
          "process) is not the engine's: the decode-against-context sweep below measures that side by side. The "
          "prefill of the context itself is also timed (tok/s, chunked as above).")
        a("")
        a("| context | " + " | ".join(SHORT[e] for e in ENGINES) + " | ours / llama.cpp | ours / transformers | "
          "limit | prefill of the context: " + " / ".join(SHORT[e] for e in ENGINES) + " |")
        a("|---|" + "---|" * (len(ENGINES) + 4))
        for c in p["contexts"]:
            _, lim = limit_tps(dense, c, 1, bw)
            _, lim_ours = limit_tps(dense, c, 1, bw, screened=True)
            cells = []
            for e in ENGINES:
                d = value(data, "decode", dense, e, "decode_tps", context=c, batch=1)
                own = lim_ours if e == "ours" else lim
                cells.append(cell(data, "decode", dense, e, "decode_tps", 2, context=c, batch=1)
                             + (f" ({d / own:.0%})" if d and own else ""))
            pf = " / ".join(cell(data, "decode", dense, e, "ctx_prefill_tps", context=c, batch=1) for e in ENGINES)
            a(f"| {_k(c)} | " + " | ".join(cells)
              + f" | {fx(ratio(data, 'decode', dense, 'ours', 'llama', 'decode_tps', context=c, batch=1))}"
              f" | {fx(ratio(data, 'decode', dense, 'ours', 'hf', 'decode_tps', context=c, batch=1))}"
              f" | {fmt(lim, 1)} | {pf} |")
        a("")
    # ---------------------------------------------------------------- batch
    if select(data, "batch"):
        a(f"## Throughput by batch size ({dense}, each sequence after a {p['batch_context']}-token prompt)")
        a("")
        a("Decode tok/s of all sequences together (one step = one token for each). Limit: the bandwidth limit of the "
          "bytes model (weights read once per step for the whole batch, KV and state per sequence); at larger batches "
          "compute, not bandwidth, is the bound.")
        a("")
        a("| batch | " + " | ".join(SHORT[e] for e in ENGINES) + " | ours / llama.cpp | ours / transformers | "
          "limit |")
        a("|---|" + "---|" * (len(ENGINES) + 3))
        for b in p["batches"]:
            _, lim = limit_tps(dense, p["batch_context"], b, bw)
            cells = [cell(data, "batch", dense, e, "decode_tps", 2, batch=b) for e in ENGINES]
            a(f"| {b} | " + " | ".join(cells)
              + f" | {fx(ratio(data, 'batch', dense, 'ours', 'llama', 'decode_tps', batch=b))}"
              f" | {fx(ratio(data, 'batch', dense, 'ours', 'hf', 'decode_tps', batch=b))} | "
              f"{fmt(lim, 1)} |")
        a("")
    # ---------------------------------------------------------------- context sweep
    if select(data, "context"):
        a("## Decode time against context: the hybrid against its all-full-attention twin (ours)")
        a("")
        a("The seed's claim scaled to this machine. `0.8b-twin` is the 0.8B shape with every layer full attention "
          "(`qwen35.model_info.full_attention_twin`). Here the context is *synthetic*: the KV blocks and GDN states "
          "are filled with random numbers instead of a real prefill (a real 32K prefill of the twin would take "
          "hours); a decode step reads exactly what it reads after a real prefill. Every model and context of a round "
          "is measured in one process, taking turns step by step (`bench/worker.py`, kind `sweep`): this host's "
          "memory bandwidth drifts by up to 2x within seconds (a bare read: 23-36 GB/s within one process over a "
          "minute, 26-51 GB/s across processes), so only steps measured side by side give a stable ratio (a check "
          "in one process found no bias from the turns: 1K and 32K steps in blocks of 8 gave the same 32K / 1K, "
          "0.75x, as alternating ones). The ratio columns are medians of per-round ratios; tok/s are medians over "
          "all rounds. "
          "Predicted: the bytes-per-token model (with the head read through qwen35's int8 screen, as these greedy "
          "steps do) at the measured read bandwidth.")
        a("")
        sweep = p["sweep"]
        a("| context | hybrid tok/s | hybrid ms/token | twin tok/s | twin ms/token | hybrid / twin | predicted "
          f"hybrid / twin | hybrid vs its {_k(sweep[0])} | predicted vs {_k(sweep[0])} |")
        a("|---|---|---|---|---|---|---|---|---|")
        # the bytes qwen35 reads: its greedy steps read the head through the int8 screen
        hb1 = limit_tps(dense, sweep[0], 1, None, screened=True)[0]
        for c in sweep:
            h = value(data, "context", dense, "ours", "decode_tps", context=c)
            t = value(data, "context", dense + "-twin", "ours", "decode_tps", context=c)
            hb = limit_tps(dense, c, 1, None, screened=True)[0]
            tb = limit_tps(dense + "-twin", c, 1, None, screened=True)[0]
            rr = ratio_models(data, dense, dense + "-twin", c)
            a(f"| {_k(c)} | {fmt(h, 2)} | {fmt(1000 / h if h else None, 1)} | {fmt(t, 2)} | "
              f"{fmt(1000 / t if t else None, 1)} | {fx(rr)} | {fx(tb / hb)} | "
              f"{fx(ratio_contexts(data, dense, c, sweep[0]))} | {fx(hb1 / hb)} |")
        a("")
        if select(data, "context_real"):
            r1 = value(data, "context_real", dense, "ours", "decode_tps", context=1024)
            r32 = value(data, "context_real", dense, "ours", "decode_tps", context=32768)
            a(f"After real prefills instead (the hybrid only, 1K and 32K prompts prefilled in the same process, decode "
              f"measured the same way, `--long`): {fmt(r1, 2)} tok/s after 1K, {fmt(r32, 2)} after 32K; 32K / 1K "
              f"{fx(ratio_contexts(data, dense, 32768, 1024, 'context_real'))} "
              f"({ratio_range(data, dense, 32768, 1024, 'context_real')}).")
            a("")
        if "context" in plots:
            a(f"![decode against context]({plots['context']})")
            a("")
    # ---------------------------------------------------------------- moe
    if moe and select(data, "moe"):
        a("## MoE: the Qwen3.5-35B-A3B shape cut to 4 layers (batch 1)")
        a("")
        a("Hidden 2048, 256 experts top-8 (expert 512) + shared expert 512, GDN 16/32 heads, attention 16/2, "
          "3 GDN + 1 full-attention layers, untied head.")
        a("")
        a("| | " + " | ".join(SHORT[e] for e in ENGINES) + " | ours / llama.cpp | ours / transformers |")
        a("|---|" + "---|" * (len(ENGINES) + 2))
        cells = [cell(data, "moe", moe, e, "prefill_tps", kind="prefill") for e in ENGINES]
        a("| prefill 512, tok/s | " + " | ".join(cells)
          + f" | {fx(ratio(data, 'moe', moe, 'ours', 'llama', 'prefill_tps', kind='prefill'))}"
          f" | {fx(ratio(data, 'moe', moe, 'ours', 'hf', 'prefill_tps', kind='prefill'))} |")
        cells = [cell(data, "moe", moe, e, "decode_tps", 2, kind="decode") for e in ENGINES]
        a("| decode after 1K, tok/s | " + " | ".join(cells)
          + f" | {fx(ratio(data, 'moe', moe, 'ours', 'llama', 'decode_tps', kind='decode'))}"
          f" | {fx(ratio(data, 'moe', moe, 'ours', 'hf', 'decode_tps', kind='decode'))} |")
        _, lim = limit_tps(moe, 1024, 1, bw)
        a(f"| bandwidth limit for decode | {fmt(lim, 1)} tok/s | | | | |")
        a("")
    # ---------------------------------------------------------------- q8
    if select(data, "q8"):
        a(f"## 8-bit weights ({dense}): qwen35 int8 (weight-only, per-row scales) against llama.cpp Q8_0")
        a("")
        a("| | qwen35 int8 | llama.cpp Q8_0 | ours / llama.cpp | qwen35 bf16 | llama.cpp bf16 |")
        a("|---|---|---|---|---|---|")
        a(f"| prefill 512, tok/s | {cell(data, 'q8', dense, 'ours', 'prefill_tps', kind='prefill')} | "
          f"{cell(data, 'q8', dense, 'llama', 'prefill_tps', kind='prefill')} | "
          f"{fx(ratio(data, 'q8', dense, 'ours', 'llama', 'prefill_tps', kind='prefill'))} | "
          f"{cell(data, 'prefill', dense, 'ours', 'prefill_tps', n=512)} | "
          f"{cell(data, 'prefill', dense, 'llama', 'prefill_tps', n=512)} |")
        a(f"| decode after 1K, tok/s | {cell(data, 'q8', dense, 'ours', 'decode_tps', 2, kind='decode')} | "
          f"{cell(data, 'q8', dense, 'llama', 'decode_tps', 2, kind='decode')} | "
          f"{fx(ratio(data, 'q8', dense, 'ours', 'llama', 'decode_tps', kind='decode'))} | "
          f"{cell(data, 'decode', dense, 'ours', 'decode_tps', 2, context=1024, batch=1)} | "
          f"{cell(data, 'decode', dense, 'llama', 'decode_tps', 2, context=1024, batch=1)} |")
        a("")
    # ---------------------------------------------------------------- fp8
    if select(data, "fp8"):
        a("## FP8 checkpoints (official block-FP8 layout) against our bf16 and llama.cpp Q8_0")
        a("")
        a("The benchmark checkpoint converted to the official `-FP8` layout (e4m3 weights, an fp32 scale per 128x128 "
          "tile, experts per expert; embeddings, head, GDN conv/a/b, routers and shared-expert gates in bf16; "
          "`bench/models.py make_fp8_checkpoint`), loaded as a user would (`qwen35.load_model(folder, "
          "dtype=torch.bfloat16)`: kept in 8 bits). llama.cpp runs the Q8_0 conversion of the same bf16 weights "
          "(llama.cpp has no FP8 type). All three in the same rounds; ratios are per-round medians.")
        a("")
        a("| model | task | qwen35 bf16 | qwen35 FP8 | llama.cpp Q8_0 | FP8 / bf16 | FP8 / Q8_0 |")
        a("|---|---|---|---|---|---|---|")
        for m in sorted({r["model"] for r in select(data, "fp8")}, key=lambda x: (x != dense, x)):
            for kind, what, label, nd in (("prefill", "prefill_tps", "prefill 512, tok/s", 1),
                                          ("decode", "decode_tps", "decode after 1K, tok/s", 2)):
                a(f"| {m} | {label} | {cell(data, 'fp8', m, 'ours', what, nd, kind=kind)} | "
                  f"{cell(data, 'fp8', m, 'ours-fp8', what, nd, kind=kind)} | "
                  f"{cell(data, 'fp8', m, 'llama', what, nd, kind=kind)} | "
                  f"{fx(ratio(data, 'fp8', m, 'ours-fp8', 'ours', what, kind=kind))} | "
                  f"{fx(ratio(data, 'fp8', m, 'ours-fp8', 'llama', what, kind=kind))} |")
            rb = value(data, "fp8", m, "ours", "rss_mb", kind="decode")
            r8 = value(data, "fp8", m, "ours-fp8", "rss_mb", kind="decode")
            a(f"| {m} | peak RSS, MB (decode task) | {fmt(rb, 0)} | {fmt(r8, 0)} | "
              f"{cell(data, 'fp8', m, 'llama', 'rss_mb', 0, kind='decode')} | | |")
        a("")
        a("What the bytes allow (`bench/bytes_model.py`, greedy decode after 1K: both read the head through the "
          "int8 screen, which the official FP8 layout keeps in bf16): the FP8/bf16 decode ratio of a memory-bound "
          "engine is the bf16 bytes over the FP8 bytes.")
        a("")
        a("| model | bf16 GB/token | FP8 GB/token | bound on FP8 / bf16 |")
        a("|---|---|---|---|")
        for label, cfg in fp8_models(data, dense, moe):
            b16, b8 = fp8_bytes(cfg)
            a(f"| {label} | {b16 / 1e9:.3f} | {b8 / 1e9:.3f} | {b16 / b8:.2f}x |")
        a("")
        for m in sorted({r["model"] for r in select(data, "fp8")}, key=lambda x: (x != dense, x)):
            adj = fp8_rss_ratio(data, m)
            if adj is not None:
                a(f"{m}: FP8 weights {adj['fp8_gb']:.2f} GB against {adj['bf16_gb']:.2f} GB in bf16 (plus the head "
                  f"screen's int8 copy in both); the FP8 load's peak RSS less the bf16 run's overhead (its peak RSS "
                  f"less its weights) is {adj['ratio']:.2f}x the FP8 bytes.")
        a("")
    # ---------------------------------------------------------------- gguf
    if select(data, "gguf"):
        a("## GGUF files: llama.cpp's own Q8_0 and Q4_K_M, in both engines")
        a("")
        a("The benchmark checkpoint converted by llama.cpp's converter (`convert_hf_to_gguf.py --outtype q8_0`, and "
          "`--outtype bf16` then llama.cpp's quantize to Q4_K_M through `llama_cpp.llama_model_quantize`, ftype 15: "
          "`bench/models.py make_gguf`). Both engines load the same file: llama.cpp with `llama_cpp.Llama`, qwen35 "
          "with `qwen35.load_model(path, dtype=torch.bfloat16)`, which keeps Q8_0 / Q4_K / Q5_K / Q6_K tensors in "
          "their blocks (`ops/quant/gguf.py`, csrc/gguf.cpp). Ratios are per-round medians.")
        a("")
        a("| model | file | task | qwen35 | llama.cpp | qwen35 / llama.cpp |")
        a("|---|---|---|---|---|---|")
        for m in sorted({r["model"] for r in select(data, "gguf")}, key=lambda x: (x != dense, x)):
            for g in sorted({r["gguf"] for r in select(data, "gguf", m) if r["task"]["kind"] != "agree"}):
                for kind, what, label, nd in (("prefill", "prefill_tps", "prefill 512, tok/s", 1),
                                              ("decode", "decode_tps", "decode after 1K, tok/s", 2),
                                              ("decode", "rss_mb", "peak RSS, MB (decode task)", 0)):
                    r_ = ratio(data, "gguf", m, "ours-gguf", "llama", what, gguf=g, kind=kind)
                    a(f"| {m} | {g.upper()} | {label} | {cell(data, 'gguf', m, 'ours-gguf', what, nd, g, kind=kind)} | "
                      f"{cell(data, 'gguf', m, 'llama', what, nd, g, kind=kind)} | {fx(r_)} |")
        a("")
        agree = [(m, g) for m in sorted({r["model"] for r in select(data, "gguf")}, key=lambda x: (x != dense, x))
                 for g in sorted({r["gguf"] for r in select(data, "gguf", m, kind="agree")})]
        if agree:
            a("Top-1 agreement per position (the greedy next token at each of 256 positions of one random prompt): "
              "qwen35 with the blocks kept (bf16 activations), qwen35 with the file widened exactly to fp32, and "
              "llama.cpp (which also rounds its activations to 8 bits for its dot products).")
            a("")
            a("| model | file | kept vs llama.cpp | exact fp32 vs llama.cpp | kept vs exact fp32 |")
            a("|---|---|---|---|---|")
            for m, g in agree:
                a(f"| {m} | {g.upper()} | {fpct(agreement(data, m, g, 'ours-gguf', 'llama'))} | "
                  f"{fpct(agreement(data, m, g, 'ours-gguf-exact', 'llama'))} | "
                  f"{fpct(agreement(data, m, g, 'ours-gguf', 'ours-gguf-exact'))} |")
            a("")
        a("qwen35's memory against what it must hold: (peak RSS - RSS before loading, i.e. torch and qwen35 "
          "imported) / (file size + the cache it allocated for the decode task).")
        a("")
        for m in sorted({r["model"] for r in select(data, "gguf")}, key=lambda x: (x != dense, x)):
            for g in sorted({r["gguf"] for r in select(data, "gguf", m)}):
                adj = gguf_rss_ratio(data, m, g)
                if adj is not None:
                    a(f"- {m} {g.upper()}: file {adj['file_gb']:.3f} GB + cache {adj['cache_gb']:.3f} GB; peak RSS "
                      f"{adj['peak_gb']:.3f} GB less {adj['base_gb']:.3f} GB before loading: {adj['ratio']:.2f}x")
        a("")
    # ---------------------------------------------------------------- screen
    if select(data, "screen"):
        a(f"## The greedy head screen ({dense}, bf16, decode after 1K)")
        a("")
        a("A greedy step needs the argmax of the logits, not the logits. qwen35 reads an int8 copy of the head with "
          "a bound per vocabulary row on its error, and computes in bf16 only the rows the bounds cannot rule out "
          "(`qwen35/ops/head_screen.py`; the token is exactly the argmax of the full fp32 logits, ties included, "
          "held to that twin in `tests/test_head_screen.py`). Steps that need the logits (sampling, penalties, "
          "logprobs) read the bf16 head. The screen is on by default; `QWEN35_HEAD_SCREEN=0` turns it off, which is "
          "the *full bf16 head* column, measured in the same rounds.")
        a("")
        full, lim = limit_tps(dense, 1024, 1, bw)
        screened, lim_s = limit_tps(dense, 1024, 1, bw, screened=True)
        a(f"Bytes per token after 1K: {full / 1e9:.3f} GB with the full head, {screened / 1e9:.3f} GB through the "
          f"screen (limits {fmt(lim, 1)} and {fmt(lim_s, 1)} tok/s at the read bandwidth above).")
        a("")
        a("| | qwen35 (screen) | qwen35 (full bf16 head) | llama.cpp | screen / full head | ours / llama.cpp | "
          "full head / llama.cpp |")
        a("|---|---|---|---|---|---|---|")
        a(f"| decode tok/s | {cell(data, 'screen', dense, 'ours', 'decode_tps', 2, kind='decode')} | "
          f"{cell(data, 'screen', dense, 'ours-fullhead', 'decode_tps', 2, kind='decode')} | "
          f"{cell(data, 'screen', dense, 'llama', 'decode_tps', 2, kind='decode')} | "
          f"{fx(ratio(data, 'screen', dense, 'ours', 'ours-fullhead', 'decode_tps', kind='decode'))} | "
          f"{fx(ratio(data, 'screen', dense, 'ours', 'llama', 'decode_tps', kind='decode'))} | "
          f"{fx(ratio(data, 'screen', dense, 'ours-fullhead', 'llama', 'decode_tps', kind='decode'))} |")
        a(f"| peak RSS, MB | {cell(data, 'screen', dense, 'ours', 'rss_mb', 0, kind='decode')} | "
          f"{cell(data, 'screen', dense, 'ours-fullhead', 'rss_mb', 0, kind='decode')} | "
          f"{cell(data, 'screen', dense, 'llama', 'rss_mb', 0, kind='decode')} | | | |")
        rounds = sorted({r["round"] for r in select(data, "screen")})
        per = []
        for rd in rounds:
            vals = {e: metric(r, "decode_tps") for e in ("ours", "ours-fullhead", "llama")
                    for r in select(data, "screen", dense, e) if r["round"] == rd}
            per.append("/".join(fmt(vals.get(e), 1) for e in ("ours", "ours-fullhead", "llama")))
        a("")
        a("Each round (screen / full head / llama.cpp, tok/s): " + "; ".join(per) + ".")
        a("")
    if select(data, "e2e"):
        a(f"## End to end through `qwen35.LLM` ({dense}, greedy, ignore_eos, no tokenizer)")
        a("")
        a("The whole engine (scheduler, chunked prefill at its default token budget, sampler) against the bare model "
          "calls measured above. Time to first token: of the first request / of the last one. Decode tok/s: the "
          "tokens produced after every request had its first token, over that time.")
        a("")
        a("| prompt x batch | time to first token (first / last request) | decode tok/s (all sequences) | "
          "bare model, same shape |")
        a("|---|---|---|---|")
        seen = []
        for r in select(data, "e2e"):
            key = (r["task"]["context"], r["task"].get("batch", 1))
            if key in seen:
                continue
            seen.append(key)
            c, b = key
            bare = (value(data, "decode", dense, "ours", "decode_tps", context=c, batch=1) if b == 1 else
                    value(data, "batch", dense, "ours", "decode_tps", context=c, batch=b))
            t1 = value(data, "e2e", dense, "ours", "ttft_ms", context=c, batch=b)
            t2 = value(data, "e2e", dense, "ours", "ttft_last_ms", context=c, batch=b)
            a(f"| {_k(c)} x {b} | {fmt(t1, 0)} / {fmt(t2, 0)} ms | "
              f"{fmt(value(data, 'e2e', dense, 'ours', 'decode_tps', context=c, batch=b), 2)} | {fmt(bare, 2)} |")
        a("")
    # ---------------------------------------------------------------- rss
    rss_rows = [r for r in data["results"] if r.get("rss_mb") and r.get("section") in ("prefill", "decode", "moe")]
    if rss_rows:
        a("## Peak resident memory (MB, the whole measurement process: weights, cache, runtime)")
        a("")
        a("| task | " + " | ".join(SHORT[e] for e in ENGINES) + " |")
        a("|---|" + "---|" * len(ENGINES))
        seen = []
        for r in rss_rows:
            key = (r["section"], r["model"], tuple(sorted(r["task"].items())))
            if key not in seen:
                seen.append(key)
        for sec, model, items in seen:
            t = dict(items)
            label = f"{model} prefill {_k(t['n'])}" if t["kind"] == "prefill" else (
                f"{model} decode after {_k(t['context'])}" + (f", batch {t['batch']}" if t.get("batch", 1) > 1 else ""))
            cells = [fmt(value(data, sec, model, e, "rss_mb", **t), 0) for e in ENGINES]
            a(f"| {label} | " + " | ".join(cells) + " |")
        a("")
    # ---------------------------------------------------------------- 397B
    a("## The bytes-per-token model behind Qwen's 8.6x / 19x (Qwen3.5-397B-A17B)")
    a("")
    a(qwen_claim_section())
    # ---------------------------------------------------------------- notes
    if data.get("notes") or any(r.get("error") for r in data["results"]):
        a("## Not measured / errors")
        a("")
        for n in data.get("notes", []):
            a(f"- {n}")
        for r in data["results"]:
            if r.get("error") and not r.get("unsupported"):
                a(f"- {r['section']} {r['model']} {SHORT.get(r['engine'], r['engine'])} {r['task']}: "
                  f"{r['error'][:300]}")
        a("")
    a("## How to rerun")
    a("")
    a("```")
    a("qwen35 bench --quick          # prefill 512, decode at 1K, the hybrid-vs-twin sweep, bandwidth; one round")
    a("qwen35 bench                  # + prefill 4K, decode at 8K, batch 1/4/16, the MoE; two rounds")
    a("qwen35 bench --full           # + 32K prompts (prefill 32K, decode after a real 32K prefill), int8 vs Q8_0,")
    a("                              #   qwen35.LLM end to end; three rounds")
    a("qwen35 bench --sections decode --contexts 1024,8192 --engines ours,llama   # one table, some engines")
    a("qwen35 bench --report-only    # rewrite this page from docs/benchmarks/results.json")
    a("```")
    a("")
    a("The llama.cpp peer is a benchmark-only dependency: `pip install llama-cpp-python==0.3.36` (compiles, ~12 min) "
      "and, for the GGUF conversion, its sdist: `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 "
      "-d /tmp/llama_sdist && tar xzf /tmp/llama_sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/llama_sdist` "
      "(`--converter` points elsewhere). Plots need `pip install -e .[bench]` (matplotlib). Checkpoints are made "
      "once under `~/.cache/qwen35-bench` (`--cache-dir`). Only the default and `--full` runs rewrite this page; "
      "`--quick` and `--sections` runs write their report and results.json under `~/.cache/qwen35-bench/report/` "
      "(or `--out`). The progress log of the last run: `~/.cache/qwen35-bench/last-run.log`.")
    a("")
    return "\n".join(L)


def _sweep_ratios(data, section, a: tuple[str, int], b: tuple[str, int]) -> list[float]:
    """Per-round decode tok/s of (model, context) `a` over `b` in a sweep section, pairing the rounds (the sweep
    measures every pair in one process, step by step: bench/worker.py)."""
    ra = {r["round"]: metric(r, "decode_tps") for r in select(data, section, a[0], "ours", context=a[1])}
    rb = {r["round"]: metric(r, "decode_tps") for r in select(data, section, b[0], "ours", context=b[1])}
    return [ra[k] / rb[k] for k in ra if k in rb and ra[k] and rb[k]]


def ratio_models(data, a_model, b_model, context) -> float | None:
    """Median over rounds of a_model / b_model at one context of the sweep."""
    return _med(_sweep_ratios(data, "context", (a_model, context), (b_model, context)))


def _context_ratios(data, model, context, base, section="context") -> list[float]:
    return _sweep_ratios(data, section, (model, context), (model, base))


def ratio_contexts(data, model, context, base, section="context") -> float | None:
    """Median over rounds of decode tok/s at `context` / at `base`, one model of the sweep (paired as above)."""
    return _med(_context_ratios(data, model, context, base, section))


def ratio_range(data, model, context, base, section="context") -> str:
    """min-max of the per-round ratios of `ratio_contexts`."""
    xs = _context_ratios(data, model, context, base, section)
    return f"{min(xs):.2f}-{max(xs):.2f} over {len(xs)} rounds" if xs else "–"


def targets(data, dense, moe) -> list[tuple[str, str, bool | None]]:
    out = []

    def add(name, x, thr, desc):
        out.append((name, f"{x:.2f}x ({desc})" if x is not None else "–", None if x is None else x >= thr))

    contexts = data["plan"]["contexts"]
    c0 = 1024 if 1024 in contexts else contexts[0]
    for c in contexts:
        add(f"decode >= 1.0x llama.cpp ({dense} bf16, batch 1, after {_k(c)})",
            ratio(data, "decode", dense, "ours", "llama", "decode_tps", context=c, batch=1), 1.0, "ours / llama.cpp")
    for n in (512, 4096):
        add(f"prefill {_k(n)} >= 1.5x llama.cpp", ratio(data, "prefill", dense, "ours", "llama", "prefill_tps", n=n),
            1.5, "ours / llama.cpp")
    sweep = data["plan"]["sweep"]
    top = max(sweep)
    add(f"decode at {_k(top)} >= 0.75x decode at {_k(sweep[0])} (synthetic context, paired in one process)",
        ratio_contexts(data, dense, top, sweep[0]), 0.75,
        f"median of per-round ratios, {ratio_range(data, dense, top, sweep[0])}")
    if select(data, "context_real"):
        add("decode at 32K >= 0.75x decode at 1K (real prefill, paired in one process)",
            ratio_contexts(data, dense, 32768, 1024, "context_real"), 0.75,
            f"median of per-round ratios, {ratio_range(data, dense, 32768, 1024, 'context_real')}")
    if 32768 in contexts:
        d1 = value(data, "decode", dense, "ours", "decode_tps", context=c0, batch=1)
        d32 = value(data, "decode", dense, "ours", "decode_tps", context=32768, batch=1)
        add(f"decode at 32K >= 0.75x decode at {_k(c0)} (real prefill, separate processes)",
            d32 / d1 if d1 and d32 else None, 0.75, f"{fmt(d32, 2)} / {fmt(d1, 2)} tok/s, decode table")
    add(f"decode at {_k(top)} >= 1.4x the full-attention twin", ratio_models(data, dense, dense + "-twin", top), 1.4,
        "hybrid / twin")
    if moe:
        add("MoE decode >= 1.0x llama.cpp", ratio(data, "moe", moe, "ours", "llama", "decode_tps", kind="decode"),
            1.0, "ours / llama.cpp")
    if select(data, "screen"):
        add(f"decode >= 1.0x llama.cpp ({dense} bf16, batch 1, after 1K; screen section's rounds)",
            ratio(data, "screen", dense, "ours", "llama", "decode_tps", kind="decode"), 1.0, "ours / llama.cpp")
    for m in sorted({r["model"] for r in select(data, "fp8")}):
        add(f"FP8 decode >= 1.6x our bf16 decode ({m}, after 1K)",
            ratio(data, "fp8", m, "ours-fp8", "ours", "decode_tps", kind="decode"), 1.6, "FP8 / bf16")
        add(f"FP8 decode >= 1.0x llama.cpp Q8_0 ({m}, after 1K)",
            ratio(data, "fp8", m, "ours-fp8", "llama", "decode_tps", kind="decode"), 1.0, "FP8 / Q8_0")
        add(f"FP8 prefill >= 0.9x our bf16 prefill ({m}, 512)",
            ratio(data, "fp8", m, "ours-fp8", "ours", "prefill_tps", kind="prefill"), 0.9, "FP8 / bf16")
        adj = fp8_rss_ratio(data, m)
        if adj is not None:
            out.append((f"FP8 peak RSS <= 1.1x the FP8 bytes + the rest ({m})", f"{adj['ratio']:.2f}x",
                        adj["ratio"] <= 1.1))
    for m in sorted({r["model"] for r in select(data, "gguf")}):
        for g in sorted({r["gguf"] for r in select(data, "gguf", m) if r["task"]["kind"] != "agree"}):
            add(f"GGUF {g.upper()} decode >= 1.0x llama.cpp ({m}, after 1K)",
                ratio(data, "gguf", m, "ours-gguf", "llama", "decode_tps", gguf=g, kind="decode"), 1.0,
                "qwen35 / llama.cpp")
            add(f"GGUF {g.upper()} prefill >= 1.3x llama.cpp ({m}, 512)",
                ratio(data, "gguf", m, "ours-gguf", "llama", "prefill_tps", gguf=g, kind="prefill"), 1.3,
                "qwen35 / llama.cpp")
            adj = gguf_rss_ratio(data, m, g)
            if adj is not None:
                out.append((f"GGUF {g.upper()} peak RSS <= 1.15x file + cache ({m})", f"{adj['ratio']:.2f}x",
                            adj["ratio"] <= 1.15))
    if select(data, "q8"):
        add(f"int8 decode >= 1.0x llama.cpp Q8_0 ({dense}, after 1K)",
            ratio(data, "q8", dense, "ours", "llama", "decode_tps", kind="decode"), 1.0, "ours int8 / llama.cpp Q8_0")
    return out


def agreement(data: dict, model: str, gguf: str, a: str, b: str) -> float | None:
    """Fraction of positions where engines a and b pick the same greedy token (the agree task)."""
    ra = [r for r in select(data, "gguf", model, a, gguf, kind="agree") if r.get("argmax")]
    rb = [r for r in select(data, "gguf", model, b, gguf, kind="agree") if r.get("argmax")]
    if not ra or not rb:
        return None
    x, y = ra[0]["argmax"], rb[0]["argmax"]
    n = min(len(x), len(y))
    return sum(p == q for p, q in zip(x[:n], y[:n], strict=True)) / n if n else None


def fpct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def gguf_rss_ratio(data: dict, model: str, gguf: str) -> dict | None:
    """qwen35's peak RSS in the GGUF decode task less its RSS before loading, over the file size plus the cache."""
    rs = [r for r in select(data, "gguf", model, "ours-gguf", gguf, kind="decode")
          if r.get("rss_base_mb") and r.get("file_bytes") and r.get("cache_bytes") and r.get("rss_mb")]
    if not rs:
        return None
    peak, base = _med([r["rss_mb"] for r in rs]) * 2**20, _med([r["rss_base_mb"] for r in rs]) * 2**20
    file, cache = rs[0]["file_bytes"], _med([r["cache_bytes"] for r in rs])
    return {"peak_gb": peak / 1e9, "base_gb": base / 1e9, "file_gb": file / 1e9, "cache_gb": cache / 1e9,
            "ratio": (peak - base) / (file + cache)}


def fp8_bytes(cfg) -> tuple[float, float]:
    """(bf16, FP8) bytes per greedy decoded token after 1K, the head read through qwen35's int8 screen in both."""
    from bench.bytes_model import decode_bytes, screened_head_saving

    saving = screened_head_saving(cfg)
    return (decode_bytes(cfg, 1024, 1, "bf16").per_token - saving,
            decode_bytes(cfg, 1024, 1, "fp8").per_token - saving)


def fp8_models(data: dict, dense: str, moe: str | None) -> list[tuple[str, object]]:
    """The benchmarked shapes, then the full presets they are cut from (FP8 kept as in the official list)."""
    from qwen35.config import find_preset

    out = [(m, _cfg(m)) for m in sorted({r["model"] for r in select(data, "fp8")}, key=lambda x: (x != dense, x))]
    for name in ("Qwen3.5-35B-A3B", "Qwen3.5-397B-A17B"):
        cfg = find_preset(name)
        if cfg is not None:
            out.append((f"{name} (all {cfg.text.num_hidden_layers} layers)", cfg))
    return out


def fp8_rss_ratio(data: dict, model: str) -> dict | None:
    """Peak RSS of the FP8 load against what it must hold: (RSS_fp8 - (RSS_bf16 - bf16 bytes)) / FP8 bytes, the
    runtime, cache and head screen measured by the bf16 run of the same task and taken off."""
    from qwen35.model_info import model_info

    rb = value(data, "fp8", model, "ours", "rss_mb", kind="decode")
    r8 = value(data, "fp8", model, "ours-fp8", "rss_mb", kind="decode")
    if not rb or not r8:
        return None
    info = model_info(_cfg(model), 1024)
    bf16, fp8 = info.weight_bytes_bf16, info.weight_bytes_fp8
    return {"bf16_gb": bf16 / 1e9, "fp8_gb": fp8 / 1e9, "ratio": (r8 * 2**20 - (rb * 2**20 - bf16)) / fp8}


def qwen_claim_section() -> str:
    from bench.bytes_model import claim_table, implied_comparator
    from qwen35.config import ModelConfig, find_preset

    if (REFERENCE_397B / "config.json").exists():
        cfg, src = ModelConfig.from_file(REFERENCE_397B), "the official config (`reference/Qwen3.5-397B-A17B-FP8`)"
    else:
        cfg, src = find_preset("Qwen3.5-397B-A17B"), "the qwen35 preset"
    L = []
    a = L.append
    a(f"From {src}, FP8 weights as published (bf16 for the modules it keeps), bf16 KV, fp32 GDN state. The twin is "
      "the same model with all 60 layers full attention. When decode is memory bound, the time per token is "
      "proportional to the bytes read per token, so the twin/hybrid bytes ratio is the speed-up of the hybrid design "
      "alone. *Many sequences* is the limit where the weights are shared by so many tokens that only each "
      "sequence's KV + state count.")
    a("")
    a("| context | batch | hybrid GB/token (FP8) | hybrid GB/token (bf16 weights) | twin GB/token (FP8) | "
      "twin / hybrid |")
    a("|---|---|---|---|---|---|")
    for r, rb in zip(claim_table(cfg), claim_table(cfg, fmt="bf16"), strict=True):
        a(f"| {_k(r['context'])} | {r['batch'] or 'many sequences'} | {r['hybrid_bytes'] / 1e9:.2f} | "
          f"{rb['hybrid_bytes'] / 1e9:.2f} | {r['twin_bytes'] / 1e9:.2f} | {r['ratio']:.2f}x |")
    imp = implied_comparator(cfg)
    t = cfg.text
    table = claim_table(cfg)
    b1 = [r["ratio"] for r in table if r["batch"] == 1]
    lim = [r["ratio"] for r in table if r["batch"] is None]
    a("")
    a(f"Hybrid per token: {imp['hybrid_weights_read'] / 1e9:.1f} GB of weights (batch 1), "
      f"{imp['hybrid_kv_per_token']:,.0f} B of KV per context token ({len(t.attention_layers)} of "
      f"{t.num_hidden_layers} layers), {imp['hybrid_state'] / 2**20:.0f} MiB of GDN state read and written. The twin "
      f"reads {t.num_hidden_layers / len(t.attention_layers):.0f}x the KV; so the hybrid layout alone is worth "
      f"{lim[0]:.1f}x / {lim[-1]:.1f}x (32K / 256K) when only KV + state count, and {b1[0]:.2f}x / {b1[-1]:.2f}x at "
      "batch 1, where the active weights dominate.")
    a("")
    a("Qwen's 8.6x (32K) / 19x (256K) compare against Qwen3-Max, a larger model whose layout is not public. Read as "
      "bytes ratios they imply a comparator that at batch 1 reads "
      f"{imp['batch1_comparator_weights'] / 1e9:.0f} GB of weights and "
      f"{imp['batch1_comparator_kv_per_token'] / 1e6:.2f} MB of KV per context token; or, in the many-sequence limit, "
      f"{imp['limit_comparator_kv_per_token'][0] / 1e3:.0f} KB (from 32K) / "
      f"{imp['limit_comparator_kv_per_token'][1] / 1e3:.0f} KB (from 256K) of KV per context token (a pure KV model "
      "would give the same number twice). So the published figures are not the hybrid layout alone: they also "
      "carry the comparator's size and KV layout. The part of the claim measured on this machine is the "
      "hybrid-vs-twin sweep above.")
    a("")
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------ plots
def make_plots(data: dict, figdir: Path) -> dict:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        data.setdefault("notes", []).append("plots skipped: matplotlib is not installed (pip install -e .[bench])")
        return {}

    plots = {}
    p = data["plan"]
    dense = (p.get("models") or ["0.8b"])[0]
    bw = bandwidth(data)
    if select(data, "context"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        cs = p["sweep"]
        tc = _cfg(dense).text
        hybrid_label = f"hybrid ({len(tc.linear_layers)} GDN + {len(tc.attention_layers)} attention)"
        for model, label, color in ((dense, hybrid_label, "C0"),
                                    (dense + "-twin", f"twin ({tc.num_hidden_layers} attention)", "C3")):
            ys = [value(data, "context", model, "ours", "step_ms", context=c) for c in cs]
            pts = [(c, y) for c, y in zip(cs, ys, strict=True) if y]
            if pts:
                ax.plot([c for c, _ in pts], [y for _, y in pts], "o-", color=color, label=f"{label}, measured")
            if bw:
                ax.plot(cs, [limit_tps(model, c, 1, None, screened=True)[0] / (bw * 1e9) * 1000 for c in cs], "--",
                        color=color, alpha=0.6, label=f"{label}, bytes / bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [_k(c) for c in cs])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decoded token (batch 1)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"qwen35 decode, {dense} shape, {p['threads']} threads")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = figdir / "decode_vs_context.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots["context"] = path
    bars = []  # (label, section, what, task)
    for n in p["prefill"]:
        bars.append((f"prefill {_k(n)}", "prefill", "prefill_tps", {"n": n}))
    for c in p["contexts"]:
        bars.append((f"decode after {_k(c)}", "decode", "decode_tps", {"context": c, "batch": 1}))
    for b in p["batches"]:
        if b > 1:
            bars.append((f"decode batch {b}", "batch", "decode_tps", {"batch": b}))
    bars = [x for x in bars if select(data, x[1], dense, None, None, **x[3])]
    if bars:
        import numpy as np

        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        w = 0.8 / len(ENGINES)
        xs = np.arange(len(bars))
        for k, e in enumerate(ENGINES):
            base = [value(data, sec, dense, "llama", what, **task) for _, sec, what, task in bars]
            ys = [value(data, sec, dense, e, what, **task) for _, sec, what, task in bars]
            rel = [y / b if y and b else 0 for y, b in zip(ys, base, strict=True)]
            ax.bar(xs + (k - (len(ENGINES) - 1) / 2) * w, rel, w, label=SHORT[e])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(xs, [b[0] for b in bars], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("tok/s relative to llama.cpp")
        ax.set_title(f"{dense} shape, bf16, {p['threads']} threads (higher is better)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = figdir / "engines.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots["engines"] = path
    return plots
