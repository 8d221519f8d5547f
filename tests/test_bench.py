"""Smoke test of the benchmark harness (bench/) on a tiny config: checkpoint making, the engines' task loop,
the bytes model, the report, and one measurement process end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("transformers")

from bench import bytes_model, models, report, run, worker  # noqa: E402

#: tests check behaviour, not speed: never wait for a quiet machine or repeat a disturbed measurement
NO_WAIT = ("--quiet-wait", "0", "--retries", "0")
from qwen35.config import ModelConfig, find_preset  # noqa: E402
from qwen35.model_info import model_info  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def tiny(cache) -> Path:
    return models.make_checkpoint(cache, "tiny")


def test_checkpoint_is_official_layout_and_cached(cache, tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_text" and cfg["architectures"] == ["Qwen3_5ForCausalLM"]
    assert (tiny / "tokenizer.json").exists()
    assert models.make_checkpoint(cache, "tiny") == tiny  # made once
    twin = models.text_config_dict("tiny-twin")
    assert set(twin["layer_types"]) == {"full_attention"}
    real = models.text_config_dict("0.8b")
    assert real["hidden_size"] == 1024 and real["num_hidden_layers"] == 24 and real["mtp_num_hidden_layers"] == 0
    moe = models.text_config_dict("moe")
    assert (moe["num_hidden_layers"], moe["num_experts"], moe["hidden_size"]) == (4, 256, 2048)


def _spec(engine, path, task):
    return {"engine": engine, "path": str(path), "task": task, "threads": 1, "chunk": 16, "vocab": 500}


def test_engines_agree_and_time(tiny):
    """Ours and transformers load the same weights: same greedy first token; every task yields timings."""
    firsts = {}
    for eng in ("ours", "hf"):
        r = worker.run(_spec(eng, tiny, {"kind": "prefill", "n": 40, "reps": 1}))
        assert len(r["prefill_s"]) == 1 and r["prefill_s"][0] > 0
        firsts[eng] = r["first_token"]
        r = worker.run(_spec(eng, tiny, {"kind": "decode", "context": 20, "steps": 2, "batch": 2}))
        assert len(r["step_s"]) == 2
    assert firsts["ours"] == firsts["hf"]
    r = worker.run(_spec("ours", tiny, {"kind": "decode", "context": 50, "steps": 2, "fill": "synthetic"}))
    assert len(r["step_s"]) == 2 and "fill_s" in r


def test_bytes_model():
    cfg = ModelConfig.from_dict(models.text_config_dict("0.8b"))
    b = bytes_model.decode_bytes(cfg, 1024)
    assert b.weights == 2 * model_info(cfg, 1024).params_active  # tied: the head is the embedding, read once
    assert b.kv == 12288 * 1025
    tw = bytes_model.decode_bytes(bytes_model.twin(cfg), 32768)
    assert tw.kv == 4 * bytes_model.decode_bytes(cfg, 32768).kv
    big = find_preset("Qwen3.5-397B-A17B")
    rows = bytes_model.claim_table(big)
    assert all(1.0 < r["ratio"] < 4.0 for r in rows)  # the layout alone is worth at most 60/15 = 4x
    imp = bytes_model.implied_comparator(big)
    assert imp["batch1_comparator_kv_per_token"] > imp["hybrid_kv_per_token"]


def test_plan_and_report(tmp_path, tiny):
    p = run.make_plan(run.build_args(["--quick"]))
    assert p["rounds"] == 1 and p["prefill"] == [512] and "batch" not in p["sections"]
    p = run.make_plan(run.build_args(["--full"]))
    assert 32768 in p["contexts"] and 32768 not in p["prefill"] and "moe" in p["sections"]
    plan = run.make_plan(run.build_args(["--models", "tiny", "--prefill-lens", "40", "--contexts", "20",
                                         "--sweep", "16,32", "--batches", "2", "--batch-context", "20"]))
    results = []
    for eng in ("ours", "hf"):
        for sec, task in (("prefill", {"kind": "prefill", "n": 40, "reps": 1}),
                          ("decode", {"kind": "decode", "context": 20, "steps": 2, "batch": 1, "fill": "prefill"})):
            results.append({**worker.run(_spec(eng, tiny, task)), "engine": eng, "model": "tiny", "task": task,
                            "section": sec, "round": 0, "rss_mb": 100.0})
    for model in ("tiny", "tiny-twin"):
        for c in (16, 32):
            results.append({"engine": "ours", "model": model, "section": "context", "round": 0,
                            "task": {"kind": "decode", "context": c, "steps": 2, "batch": 1, "fill": "synthetic"},
                            "step_s": [0.01 * c / 16, 0.01 * c / 16]})
    results.append({"section": "bandwidth", "read_gbs": 20.0, "copy_gbs": 15.0, "bf16_head_linear_gbs": 10.0})
    data = {"command": "test", "plan": plan, "started": "now", "loadavg_start": [0, 0, 0], "loadavg_end": [0, 0, 0],
            "machine": {"versions": {}}, "results": results, "notes": ["llama.cpp skipped: test"], "duration_s": 1}
    out = tmp_path / "benchmarks.md"
    report.write(data, out)
    text = out.read_text()
    for needle in ("## Targets", "## Prefill", "## Decode", "## Decode time against context", "8.6x",
                   "llama.cpp skipped: test"):
        assert needle in text
    assert "error" not in text.split("## Targets")[1].split("## Memory")[0]
    assert report.summary_text(data)


def test_one_measurement_process_end_to_end(tmp_path, cache, tiny):
    out = tmp_path / "b.md"
    rc = run.main(["--models", "tiny", "--engines", "ours", "--sections", "decode", "--contexts", "24", "--steps", "2",
                   "--rounds", "1", "--threads", "1", *NO_WAIT, "--cache-dir", str(cache), "--out", str(out)])
    assert rc == 0
    data = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    (res,) = data["results"]
    assert not res.get("error"), res.get("error")
    assert res["rss_mb"] > 50 and len(res["step_s"]) == 2
    assert "## Decode (tiny" in out.read_text()


def test_sweep_measures_every_pair_in_one_process(cache, tiny):
    """Kind "sweep": both models and every context in one process, step by step; each round starts again at the
    context (the synthetic fill and the real prefill)."""
    twin = models.make_checkpoint(cache, "tiny-twin")
    for fill in ("synthetic", "prefill"):
        spec = {"engine": "ours", "paths": {"tiny": str(tiny), "tiny-twin": str(twin)}, "threads": 1, "vocab": 500,
                "task": {"kind": "sweep", "contexts": [16, 40], "steps": 3, "rounds": 2, "fill": fill}}
        r = worker.run(spec)
        assert set(r["sweep"]) == {"tiny", "tiny-twin"} and set(r["fill_s"]) == {
            "tiny@16", "tiny@40", "tiny-twin@16", "tiny-twin@40"}
        for by_ctx in r["sweep"].values():
            assert set(by_ctx) == {"16", "40"}
            assert all(len(rounds) == 2 and all(len(ts) == 3 and min(ts) > 0 for ts in rounds)
                       for rounds in by_ctx.values())


def test_sweep_section_end_to_end_pairs_rounds(tmp_path, cache, tiny):
    """The context section runs one sweep process per round and records one result per (model, context, inner
    round); the report's ratios pair results of the same inner round."""
    out = tmp_path / "b.md"
    rc = run.main(["--models", "tiny", "--engines", "ours", "--sections", "context", "--sweep", "16,32", "--steps",
                   "2", "--rounds", "1", "--sweep-rounds", "2", "--threads", "1", *NO_WAIT, "--cache-dir", str(cache),
                   "--out", str(out)])
    assert rc == 0
    data = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    res = [r for r in data["results"] if r["section"] == "context"]
    assert not any(r.get("error") for r in res)
    assert sorted((r["model"], r["task"]["context"], r["round"]) for r in res) == sorted(
        (m, c, i) for m in ("tiny", "tiny-twin") for c in (16, 32) for i in (0, 1))
    assert report.ratio_contexts(data, "tiny", 32, 16) is not None
    assert report.ratio_models(data, "tiny", "tiny-twin", 32) is not None
    assert "decode at 32 >= 0.75x decode at 16 (synthetic context, paired in one process)" in out.read_text()


def test_device_check_runs_on_cpu(cache, tiny):
    """The GPU check script (bench/device_check.py), on the CPU: parity with transformers holds and every speed
    figure comes out, so that it is ready where a device is lent."""
    from bench import device_check

    res = device_check.main(["--device", "cpu", "--model", "tiny", "--cache-dir", str(cache), "--prefill", "48",
                             "--context", "24", "--steps", "2"])
    assert res["parity"]["ok"], res["parity"]
    assert len(res["parity"]["greedy_ours"]) == 8
    assert all(v > 0 for v in res["speed"].values())
    assert res["fp8"]["ok"] and res["fp8"]["fp8_decode_tps"] > 0, res["fp8"]


def test_merge_takes_each_section_from_one_run():
    from bench import merge

    def run_of(commit, sections):
        return {"command": f"bench {commit}", "started": "t", "duration_s": 60, "machine": {"git": commit},
                "plan": {"sections": sections, "prefill": [1], "batches": [2], "batch_context": 3}, "notes": [],
                "results": [{"section": s, "commit": commit} for s in sections + ["context_real"]]}

    new = run_of("new", ["bandwidth", "decode", "context"])
    old = run_of("old", ["prefill", "decode", "batch", "context"])
    m = merge.merge(new, old, ["prefill", "batch"], "why")
    assert sorted((r["section"], r["commit"]) for r in m["results"]) == sorted(
        [("bandwidth", "new"), ("decode", "new"), ("context", "new"), ("context_real", "new"), ("prefill", "old"),
         ("batch", "old")])
    assert m["plan"]["sections"] == ["bandwidth", "prefill", "decode", "batch", "context"]
    assert [p["sections"] for p in m["merged"]] == [["bandwidth", "decode", "context"], ["prefill", "batch"]]
    assert m["notes"][-1].endswith("why")
    with pytest.raises(ValueError, match="unknown sections"):
        merge.merge(new, old, ["prefil"])
