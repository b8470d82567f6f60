"""write_report on a small synthetic results dict, and the plot helpers."""

import json

import pytest

from bot.eval import metrics, plots
from bot.eval.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(topic_baseline=("a", "b", "b", "a")):
    labels = ["a", "b"]
    gold = ["a", "b", "b", "a"]
    cm = metrics.classification_metrics
    return {
        "meta": {"command": "bot eval", "backbone": "tiny", "machine": "cpu", "date": "2025-01-01",
                 "seconds": 1.5},
        "tasks": {
            # adapter 3/4 right, zero-shot 2/4, baseline as given
            "topic": {"kind": "classify", "status": "ok", "n_test": 4,
                      "adapter": cm(gold, ["a", "b", "a", "a"], labels),
                      "zero_shot": cm(gold, ["a", "a", "a", "a"], labels),
                      "baseline": cm(gold, list(topic_baseline), labels),
                      "views": {"headline": cm(gold[:2], ["a", "b"], labels)}},
            "chat": {"kind": "generate", "status": "ok", "ppl_base": 20.0, "ppl_adapter": 15.0,
                     "samples": [{"prompt": "hi | there", "base": "hello\nworld", "adapter": "hey"}]},
            "broken": {"status": "failed", "error": "adapter.yaml missing"},
        },
        "router": {**metrics.router_metrics(["topic", "chat"], ["topic", "(fallback)"], [False, True])},
        "curves": {"topic": {"points": {"adapter": [[4, 0.5], [8, 0.75]],
                                        "tfidf+logreg": [[4, 0.5], [8, 0.6]]}}},
    }


def _first_table(md: str) -> list[str]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_write_report(tmp_path):
    res = _results()
    json_path, md_path = write_report(res, tmp_path)
    assert json_path.exists() and md_path.exists()
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(res))
    md = md_path.read_text()

    table = _first_table(md)
    assert table[0].split("|")[1:6] == [" task ", " adapter (95 % interval) ", " base zero-shot ",
                                        " TF-IDF baseline (95 % interval) ", " verdict "]
    topic = next(r for r in table if r.startswith("| topic "))
    # adapter 75 %, zero-shot 50 %, baseline 100 % -> adapter loses to baseline
    assert "75.0 %" in topic and "50.0 %" in topic and "100.0 %" in topic
    assert "transfer did not help" in topic
    chat = next(r for r in table if r.startswith("| chat "))
    assert "20.00 → 15.00" in chat and "-25.0 %" in chat
    broken = next(r for r in table if r.startswith("| broken "))
    assert "failed" in broken and "adapter.yaml missing" in broken
    # the summary table comes before every other section
    assert md.index("| task |") < md.index("## ")

    assert "## Failed adapters" in md and "**broken**" in md
    assert "## Router" in md and "fallback rate 50.0 %" in md
    assert "![topic confusion matrix](topic_confusion.png)" in md
    assert "hi \\| there" in md and "hello<br>world" in md  # cell-safe samples
    assert "headline" in md
    for png in ("topic_confusion.png", "router_confusion.png", "topic_learning_curve.png", "summary.png"):
        assert f"({png})" in md
        assert (tmp_path / png).read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp files


def test_verdict_positive_when_adapter_wins(tmp_path):
    _, md_path = write_report(_results(topic_baseline=["b", "b", "b", "b"]), tmp_path, plots=False)
    md = md_path.read_text()
    topic = next(r for r in _first_table(md) if r.startswith("| topic "))
    assert "transfer did not help" not in topic and "+25.0 points" in topic
    assert "![topic confusion matrix]" not in md  # plots off and no file: no dead link


def test_minimal_results(tmp_path):
    res = {"tasks": {"x": {"kind": "classify", "adapter": metrics.classification_metrics(["a"], ["a"], ["a"])}},
           "router": None}
    json_path, md_path = write_report(res, tmp_path, plots=False)
    assert json.loads(json_path.read_text())["router"] is None
    assert "| x | 100.0 % | — | — |" in md_path.read_text()


def test_nan_is_written_as_null(tmp_path):
    json_path, _ = write_report({"tasks": {"g": {"kind": "generate", "ppl_base": float("nan"),
                                                  "ppl_adapter": 3.0}}}, tmp_path, plots=False)
    assert json.loads(json_path.read_text())["tasks"]["g"]["ppl_base"] is None


@pytest.mark.parametrize("draw", [
    lambda p: plots.plot_confusion([[2, 1], [0, 3]], ["a", "b"], "t", p),
    lambda p: plots.plot_learning_curve({"adapter": [(32, 0.6), (128, 0.8)], "tfidf+logreg": [(32, 0.5)]}, "t", p),
    lambda p: plots.plot_bar_summary([{"task": "topic", "adapter": 0.9, "base zero-shot": 0.4,
                                         "tfidf baseline": None}], p),
])
def test_plots_write_png(tmp_path, draw):
    path = draw(tmp_path / "sub" / "plot.png")
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_a_view_where_the_adapter_loses_is_said_plainly(tmp_path):
    res = _results(topic_baseline=["b", "b", "b", "b"])
    cm = metrics.classification_metrics
    topic = res["tasks"]["topic"]
    topic["views"]["lede"] = cm(["a", "b"], ["b", "b"], ["a", "b"])  # adapter 50 %
    topic["views_baseline"] = {"headline": cm(["a", "b"], ["a", "a"], ["a", "b"]),  # 50 %: adapter leads
                               "lede": cm(["a", "b"], ["a", "b"], ["a", "b"])}  # 100 %: adapter loses
    topic["baseline_trained_on"] = ["text", "headline"]
    md = write_report(res, tmp_path, plots=False)[1].read_text()
    assert "trains on the adapter's own examples: text, headline" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "+50.0 points" in rows["headline"] and "loses by 50.0 points" in rows["lede"]
    assert "On lede, the adapter does not beat the TF-IDF baseline." in md


def test_intervals_and_the_paired_verdict_reach_the_report(tmp_path):
    res = _results()
    topic = res["tasks"]["topic"]
    topic["adapter"]["interval"] = [0.71, 0.95]
    topic["baseline"]["interval"] = [0.40, 0.70]
    topic["vs_baseline"] = metrics.paired_difference([True] * 30 + [False] * 2 + [True] * 68,
                                                     [False] * 30 + [True] * 2 + [True] * 68)
    topic["verdict"] = metrics.transfer_verdict(0.98, 0.70, None, topic["vs_baseline"])
    topic["scored"] = "all 100 held-out examples (about 0.5 min here)"
    md = write_report(res, tmp_path, plots=False)[1].read_text()
    assert "Scored on all 100 held-out examples" in md
    assert "(71.0-95.0)" in md and "(40.0-70.0)" in md
    assert "The adapter beats the TF-IDF baseline: +28.0 points (95 % interval" in md
