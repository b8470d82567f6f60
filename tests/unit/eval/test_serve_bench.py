"""``bot bench --serve --against llama-server``: usage parsing, ratios, targets, report, CLI.

None of these needs llama-server, except the last test, which runs against the binary that
``scripts/build-llama-server.sh`` puts in ``$BOT_CACHE/llama-server/native/`` and is skipped,
with the reason, when it is not there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_backbone
from openai.types.chat import ChatCompletionChunk
from peft import LoraConfig

from bot.eval import llama_server as ls
from bot.serve import load_bench


def _chunk(content=None, role=None, usage=None, finish=None):
    choices = [] if usage and content is None else [
        {"index": 0, "delta": {"content": content, "role": role}, "finish_reason": finish}]
    data = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": choices}
    if usage:
        data["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": sum(usage)}
    return ChatCompletionChunk.model_validate(data)


class Clock:
    """A clock that advances 0.1 s on every reading."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.1
        return self.t


# ------------------------------------------------------------------ streams
def test_reply_length_comes_from_usage_and_ttft_from_the_first_content():
    clock = Clock()
    # a role-only chunk, an empty one, three pieces, the finish chunk, then usage (choices [])
    chunks = [_chunk("", role="assistant"), _chunk(""), _chunk("Hel"), _chunk("lo"),
              _chunk(" there"), _chunk(None, finish="stop"), _chunk(usage=(37, 5))]
    reply = load_bench.read_stream(chunks, 0.0, clock)
    assert reply["completion_tokens"] == 5  # the server's count, not the 3 pieces
    assert reply["prompt_tokens"] == 37
    assert reply["text"] == "Hello there"
    # the clock is read once per non-empty content chunk... only the first one counts
    assert reply["ttft_ms"] == pytest.approx(100.0)


def test_a_stream_without_usage_is_an_error_not_a_guess():
    with pytest.raises(load_bench.NoUsage, match="without usage after 2 content chunks"):
        load_bench.read_stream([_chunk("a"), _chunk("b"), _chunk(None, finish="stop")], 0.0, Clock())


def test_empty_reply_has_its_ttft_at_the_end():
    reply = load_bench.read_stream([_chunk(None, finish="stop"), _chunk(usage=(10, 0))], 0.0, Clock())
    assert reply["completion_tokens"] == 0 and reply["text"] == ""
    assert reply["ttft_ms"] == pytest.approx(100.0)


def test_level_figures_sum_usage_over_wall_time():
    replies = {i: {"ttft_ms": float(t), "completion_tokens": n, "prompt_tokens": 40, "text": str(i)}
               for i, (t, n) in enumerate([(100, 64), (200, 10), (300, 26), (400, 60)])}
    lv = load_bench.summarize(replies, ["chat: boom"], wall=4.0, clients=2, requests=5)
    assert lv["tokens"] == 160 and lv["tokens_per_s"] == 40.0
    assert lv["failed"] == 1 and lv["errors"] == ["chat: boom"] and lv["requests"] == 5
    assert lv["p50_ttft_ms"] == 250.0
    assert 350 < lv["p95_ttft_ms"] <= 400
    assert lv["mean_reply_tokens"] == 40.0 and lv["mean_prompt_tokens"] == 40.0
    assert lv["texts"][2] == "2"
    empty = load_bench.summarize({}, ["x", "y"], wall=1.0, clients=1, requests=2)
    assert empty["tokens_per_s"] == 0.0 and empty["p95_ttft_ms"] is None and empty["failed"] == 2


def test_cpu_meter_reports_a_share_between_zero_and_one():
    meter = load_bench.CpuMeter(None)
    sum(i * i for i in range(200_000))  # this process's own work is left out
    share = meter.others_share()
    assert share is None or 0.0 <= share <= 1.0


# ------------------------------------------------------------------ traffic and ratios
def test_mixed_traffic_rotates_over_base_chat_and_the_second_adapter():
    jobs = load_bench.traffic_jobs(["p0", "p1", "p2", "p3"], ["base", "chat", "chat2"], "mixed")
    assert jobs == [("base", "p0"), ("chat", "p1"), ("chat2", "p2"), ("base", "p3")]
    assert load_bench.traffic_jobs(["p0", "p1"], ["base", "chat"], "single") == [("chat", "p0"),
                                                                           ("chat", "p1")]
    with pytest.raises(ValueError, match="traffic must be one of"):
        load_bench.traffic_jobs(["p"], ["base"], "bursty")


def _level(tps, p95=500.0):
    return {"tokens_per_s": tps, "p50_ttft_ms": p95 / 2, "p95_ttft_ms": p95, "failed": 0,
            "mean_reply_tokens": 50.0, "others_cpu_share": 0.05}


def _tables(ratios_mixed, ratio_single16):
    def rows(ratios):
        return {str(c): {"bot_serve": _level(r * 50, 800.0 + c), "llama_server": _level(50.0),
                         "ratio": load_bench.ratio(_level(r * 50), _level(50.0))}
                for c, r in ratios.items()}

    return {"mixed": {"models": ["base", "chat", "chat2"], "levels": rows(ratios_mixed)},
            "single": {"models": ["chat"], "levels": rows({16: ratio_single16})}}


def test_ratio_is_bot_over_llama_server_and_none_without_a_figure():
    assert load_bench.ratio(_level(30.0), _level(60.0)) == 0.5
    assert load_bench.ratio(_level(30.0), _level(0.0)) is None
    assert load_bench.ratio({"tokens_per_s": None}, _level(1.0)) is None


def test_issue_keys_come_from_the_right_traffic_and_level():
    keys = load_bench.against_keys(_tables({1: 0.2, 4: 0.3, 8: 0.4, 16: 0.6}, 0.35))
    assert keys == {"vs_llama_server_c1": 0.2, "vs_llama_server_c8": 0.4,
                    "vs_llama_server_c16": 0.6, "vs_llama_server_single_c16": 0.35,
                    "p95_ttft_ms_8": 808.0}
    partial = load_bench.against_keys(_tables({1: 0.2, 8: 0.4}, 0.35))
    assert partial["vs_llama_server_c16"] is None and partial["vs_llama_server_c8"] == 0.4


def test_targets_say_met_or_by_how_much_not():
    low = load_bench.check_target("vs_llama_server_c8", 0.4, 2.0)
    assert low["met"] is False and low["factor"] == 0.2
    assert "NOT MET" in low["text"] and "needs 5.00x more" in low["text"]
    ok = load_bench.check_target("vs_llama_server_c1", 1.0, 0.8)
    assert ok["met"] is True and ok["text"] == "met (1.25x the target)"
    slow = load_bench.check_target("p95_ttft_ms_8", 1500.0, 1000.0)  # lower is better
    assert slow["met"] is False and "1.50x the limit" in slow["text"]
    assert load_bench.check_target("p95_ttft_ms_8", 500.0, 1000.0)["met"] is True
    assert load_bench.check_target("failed", 0, 0)["met"] is True
    failed = load_bench.check_target("failed", 3, 0)
    assert failed["met"] is False and "limit is 0" in failed["text"]
    assert load_bench.check_target("vs_llama_server_c16", None, 3.0)["met"] is None


# ------------------------------------------------------------------ report
def _record(isa, ratios, single):
    tables = _tables(ratios, single)
    levels = {str(c): {**v["bot_serve"], "requests": 32, "speedup": round(r / ratios[1], 2)}
              for (c, v), r in zip(tables["mixed"]["levels"].items(), ratios.values())}
    return {"isa": isa, "features": {"aten_capability": "AVX2", "native_bf16": False,
                                     "precision": "fp32", "threads": 2, "env": {}},
            "models": ["base", "chat", "chat2"], "max_tokens": 64, "levels": levels,
            "identical_to_sequential": "90/96", "speedup_8": levels["8"]["speedup"],
            "p95_ttft_ms_8": levels["8"]["p95_ttft_ms"], "failed": 0,
            "memory": {"rss_mb_1_adapter": 1000.0, "rss_mb_4_adapters": 1003.0,
                       "per_adapter_mb": 1.0, "lora_mb": 4.97, "backbone_mb": 533.0,
                       "adapter_memory_share": 0.0093, "precision": "fp32"},
            "quality": None, "adapter_memory_share": 0.0093,
            "against": {"server": "llama-server", "binary": "/c/llama-server", "version": "v 1",
                        "flags": ["-m", "M.gguf", "--parallel", "16"], "model": "/x/M.gguf",
                        "no_repack_after_crash": isa == "native", "second_adapter": "chat2",
                        "traffic": tables},
            **load_bench.against_keys(tables)}


def test_report_has_both_isas_the_targets_and_native_copies_at_the_top(tmp_path):
    # avx2 measured first: the top-level copies must still be native's
    recs = [_record("avx2", {1: 0.1, 8: 0.3, 16: 0.5}, 0.2),
            _record("native", {1: 0.2, 8: 0.4, 16: 0.6}, 0.35)]
    result = load_bench.make_result(recs, command_line="bot bench --serve --against llama-server",
                               machine="x86_64, 2 CPU cores", code="abc123",
                               against="llama-server")
    assert result["top_level_isa"] == "native"
    assert result["vs_llama_server_c8"] == 0.4 and result["vs_llama_server_single_c16"] == 0.35
    assert result["isa"][0]["vs_llama_server_c8"] == 0.3
    assert result["isa"][1]["targets"]["vs_llama_server_c16"]["met"] is False
    assert set(load_bench.AGAINST_TARGETS) <= set(result["targets"])
    json.dumps(result)  # serve.json must be plain JSON
    md = load_bench.render_serve(result)
    assert "bot bench --serve --against llama-server" in md and "abc123" in md
    assert md.count("### Against llama.cpp's `llama-server`") == 2
    assert "**mixed traffic** (rotating over `base`, `chat`, `chat2`)" in md
    assert "**single traffic** (every request on `chat`)" in md
    assert "| 8 | 20.0 | 50.0 | **0.4x** |" in md  # native, 8 clients
    assert "`--no-repack`" in md  # said where it was needed (native here)
    assert "a copy of `chat` served under a second name" in md
    row = next(line for line in md.splitlines() if line.startswith("| vs_llama_server_c8 |"))
    assert ">= 2" in row and "0.3: NOT MET" in row and "0.4: NOT MET" in row
    assert "| 8 | 32 | 20.0 | 2.0x |" in md  # bot serve alone, vs its own sequential run


def test_report_without_against_keeps_the_serve_only_tables():
    rec = _record("native", {1: 0.2, 8: 0.4}, 0.3)
    rec.pop("against")
    result = load_bench.make_result([rec], command_line="bot bench --serve", machine="m", code="c",
                               against=None)
    assert "vs_llama_server_c8" not in result["targets"]
    md = load_bench.render_serve(result)
    assert "llama-server" not in md and "| speedup_8 |" in md and "Memory (fp32 engine)" in md



def test_report_shows_where_each_isa_step_time_goes():
    rec = _record("native", {1: 0.2, 8: 0.4}, 0.3)
    rec["features"]["step_profile"] = [
        {"rows": r, "kernel": "w8h", "step_ms": 15.0 * r, "profiled_ms": 14.0 * r, "context": 150,
         "adapter": "chat", "ms": {"body": 7.0 * r, "head": 1.5 * r, "lora": 1.0 * r,
                                   "attention": 1.0 * r, "other": 3.5 * r},
         "ops_per_step": {"body": 120, "head": 1, "lora": 96, "attention": 60, "other": 1400}}
        for r in (1, 16)]
    result = load_bench.make_result([rec], command_line="bot bench --serve", machine="m", code="c",
                                    against=None)
    md = load_bench.render_serve(result)
    assert "Where one engine step's time goes" in md
    rows = [line for line in md.splitlines() if line.startswith(("| 1 | w8h", "| 16 | w8h"))]
    assert len(rows) == 2 and "7.0 (50%)" in rows[0] and "1400 / 1677" in rows[1]
    # a record without a profile (transformers runner, or an older serve.json) has no section
    rec["features"].pop("step_profile")
    assert "Where one engine step" not in load_bench.render_serve(result)

# ------------------------------------------------------------------ llama-server helpers
def test_lora_field_names_every_adapter_so_none_takes_a_server_default():
    names = ["chat", "chat2"]
    assert ls.lora_field("chat2", names) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
    assert ls.lora_field("SmolLM2-135M-Instruct", names) == [{"id": 0, "scale": 0.0},
                                                             {"id": 1, "scale": 0.0}]


def test_server_command_splits_context_over_slots_and_loads_loras_unapplied():
    cmd = ls.server_command(Path("/b/llama-server"), Path("/m.gguf"),
                            [Path("/l/chat.gguf"), Path("/l/chat2.gguf")], 8123, parallel=16,
                            ctx_per_slot=512, threads=2)
    assert cmd[0] == "/b/llama-server" and cmd[cmd.index("-m") + 1] == "/m.gguf"
    assert cmd[cmd.index("-c") + 1] == "8192" and cmd[cmd.index("--parallel") + 1] == "16"
    assert cmd[cmd.index("-t") + 1] == "2" and cmd[cmd.index("--port") + 1] == "8123"
    assert [cmd[i + 1] for i, c in enumerate(cmd) if c == "--lora"] == ["/l/chat.gguf",
                                                                        "/l/chat2.gguf"]
    assert "--lora-init-without-apply" in cmd and "--cont-batching" in cmd
    assert "--lora-init-without-apply" not in ls.server_command(Path("b"), Path("m"), [], 1)


def test_missing_binary_says_how_to_build_it(tmp_path, monkeypatch):
    from bot.errors import AssetMissingError

    monkeypatch.setenv("BOT_CACHE", str(tmp_path))
    with pytest.raises(AssetMissingError, match=r"scripts/build-llama-server\.sh") as err:
        ls.find_binary("avx2")
    assert str(tmp_path / "llama-server" / "avx2" / "llama-server") in str(err.value)
    assert "avx2" in ls.missing_reason("avx2")
    with pytest.raises(Exception, match="unknown ISA"):
        ls.find_binary("sse2")
    # the whole benchmark refuses before any slow work
    with pytest.raises(AssetMissingError, match="build-llama-server"):
        load_bench.run_serve_bench(adapters_dir=tmp_path, out_dir=tmp_path, isas=("native",),
                              against="llama-server")
    assert not (tmp_path / "serve.md").exists()


def test_second_adapter_gets_its_own_name_and_same_weights(tmp_path):
    src = tmp_path / "adapters" / "chat"
    src.mkdir(parents=True)
    (src / "adapter.yaml").write_text("name: chat\nkind: generate\ndescription: small talk\n")
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    dest = load_bench.second_adapter_dir(tmp_path / "adapters", tmp_path / "served")
    assert "name: chat2" in (dest / "chat2" / "adapter.yaml").read_text()
    assert "name: chat\n" in (dest / "chat" / "adapter.yaml").read_text()
    assert (dest / "chat2" / "adapter_model.safetensors").read_bytes() == b"weights"
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        load_bench.second_adapter_dir(tmp_path / "adapters", tmp_path / "served2")


def test_loras_written_once_per_weights_and_copied_for_a_second_name(tmp_path):
    import gguf

    from bot.model.families import DEFAULT_TARGET_MODULES

    bb = make_tiny_backbone()
    torch.manual_seed(0)
    bb.add_adapter("chat", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                      target_modules=list(DEFAULT_TARGET_MODULES)))
    files = ls.write_loras(bb, {"chat": "chat", "chat2": "chat"}, tmp_path)
    assert list(files) == ["chat", "chat2"]  # the order of the --lora flags, so of the ids
    assert files["chat2"].read_bytes() == files["chat"].read_bytes()
    reader = gguf.GGUFReader(str(files["chat2"]))
    assert len(reader.tensors) == 2 * 7 * bb.base.config.num_hidden_layers
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_backbone_without_gguf_source_is_refused_with_the_fix():
    from bot.errors import BotError

    with pytest.raises(BotError, match="not converted from a GGUF file.*--backbone FILE.gguf"):
        ls.model_gguf(make_tiny_backbone())


# ------------------------------------------------------------------ CLI
def test_cli_flags_reach_the_benchmark(monkeypatch):
    from bot.cli import build_parser, main

    seen = {}

    def fake(**kw):
        seen.update(kw)
        return {"targets": {"vs_llama_server_c8": 2.0}, "vs_llama_server_c8": 0.5,
                "top_level_isa": "native"}

    monkeypatch.setattr(load_bench, "run_serve_bench", fake)
    assert main(["bench", "--serve", "--against", "llama-server", "--isa", "native",
                 "--levels", "1,8,8", "--traffic", "single", "--requests", "8",
                 "--out", "/tmp/x/load_bench.md"]) == 0
    assert seen["against"] == "llama-server" and seen["isas"] == ("native",)
    assert seen["levels"] == (1, 8) and seen["traffic"] == ("single",)
    assert seen["n_requests"] == 8 and str(seen["out_dir"]) == "/tmp/x"
    args = build_parser().parse_args(["bench", "--serve"])
    assert args.levels == (1, 4, 8, 16) and args.traffic == "both" and args.against is None
    assert args.isa == "both"


def test_cli_refuses_bad_levels_and_against_without_serve(capsys):
    from bot.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--serve", "--levels", "0,x"])
    assert "comma-separated client counts" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="add --serve"):
        main(["bench", "--against", "llama-server"])


# ------------------------------------------------------------------ the real server


def test_classify_check_times_one_batched_request_against_one_per_text(tmp_path):
    from helpers import make_state

    from bot.serve.limits import Limits
    from bot.serve.server import BackgroundServer

    state = make_state(tmp_path, api_key=None, limits=Limits(max_classify_inputs=64))
    texts = [f"held-out text number {i}, {'great' if i % 2 else 'awful'}" for i in range(16)]
    with BackgroundServer(state) as srv:
        out = load_bench.measure_classify(srv.url + "/v1", texts, "mood")
    assert out["model"] == "mood" and out["texts"] == 16
    assert out["batched_s"] > 0 and out["single_s"] > 0
    assert out["speedup"] > 0  # from the unrounded times
    # the same texts get the same labels either way (bf16 rounding may flip a near-tie)
    assert out["same_label"] >= 14
    rec = {"classify": out}
    lines = load_bench.render_serve({"command": "c", "machine": "m", "against": None, "targets": {},
                                "isa": [{**rec, "isa": "native", "features": {
                                    "aten_capability": "AVX2", "native_bf16": False,
                                    "threads": 2, "env": {}}, "models": [], "max_tokens": 8,
                                    "memory": {"precision": "fp32", "rss_mb_1": 1, "rss_mb_4": 2,
                                               "per_adapter_mb": 0.1, "lora_mb": 0.1,
                                               "adapter_memory_share": 0.01, "backbone_mb": 10},
                                    "targets": {}}]})
    assert "as one request" in lines and f"({out['speedup']}x" in lines
