"""`bot eval` on the tiny backbone: --data files, failures, the report's verdict."""

from __future__ import annotations

import json

import pytest
from helpers import make_tiny_backbone, toy_spec

from bot.cli import main
from bot.errors import DataError
from bot.eval import evaluate
from bot.training.train import train_adapter


@pytest.fixture
def trained(tmp_path, monkeypatch):
    bb = make_tiny_backbone()
    spec = toy_spec(tmp_path, epochs=2.0)
    train_adapter(spec, bb, spec.folder)
    monkeypatch.setattr("bot.model.backbone.Backbone.load", classmethod(lambda cls, name=None, **kw: make_tiny_backbone()))
    return spec


def test_eval_on_user_file(trained, tmp_path):
    data = tmp_path / "mine.csv"
    data.write_text("text,label\nthe meow number 500,cat\nthe woof number 501,dog\nthe purr number 502,cat\n")
    out = tmp_path / "rep"
    code = main(["eval", "pets", "--adapters-dir", str(trained.folder.parent), "--data", str(data),
                 "--out", str(out), "--no-router"])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    pets = result["tasks"]["pets"]
    assert pets["status"] == "ok" and pets["n_test"] == 3
    assert pets["adapter"]["n"] == 3 and "baseline" in pets and "zero_shot" in pets
    assert (out / "eval.md").read_text().count("pets") >= 1


def test_eval_data_errors_are_clear(trained, tmp_path):
    bad_col = tmp_path / "cols.csv"
    bad_col.write_text("body,label\nx,cat\n")
    with pytest.raises(DataError, match="Available columns: body, label"):
        evaluate.user_test_rows(trained, str(bad_col))
    bad_label = tmp_path / "labels.csv"
    bad_label.write_text("text,label\nx,cat\ny,horse\n")
    with pytest.raises(DataError, match=r"\['horse'\] are not labels of adapter 'pets'"):
        evaluate.user_test_rows(trained, str(bad_label))


def test_a_broken_adapter_is_reported_and_others_still_evaluated(trained, tmp_path):
    import shutil

    broken = trained.folder.parent / "broken"
    shutil.copytree(trained.folder, broken)
    text = (broken / "adapter.yaml").read_text().replace("name: pets", "name: broken")
    (broken / "adapter.yaml").write_text(text)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "rep"
    assert main(["eval", "--adapters-dir", str(trained.folder.parent), "--out", str(out),
                 "--no-router", "--max-examples", "10"]) == 0
    tasks = json.loads((out / "eval.json").read_text())["tasks"]
    assert tasks["broken"]["status"] == "failed" and "adapter_model.safetensors" in tasks["broken"]["error"]
    assert tasks["pets"]["status"] == "ok"
    assert "failed" in (out / "eval.md").read_text()


def test_negative_transfer_is_said_plainly(trained, tmp_path, monkeypatch):
    """Force the adapter below the baseline: the report must say transfer did not help."""
    from bot.tasks.classify import ClassifyTask

    monkeypatch.setattr(ClassifyTask, "predict",
                        lambda self, texts, **kw: [{"cat": 0.0, "dog": 1.0} for _ in texts])
    out = tmp_path / "rep"
    assert main(["eval", "pets", "--adapters-dir", str(trained.folder.parent), "--out", str(out),
                 "--no-router"]) == 0
    pets = json.loads((out / "eval.json").read_text())["tasks"]["pets"]
    assert pets["adapter"]["accuracy"] < pets["baseline"]["accuracy"]
    assert "transfer did not help" in (out / "eval.md").read_text()


def test_learning_curve_points_are_nested_sizes(trained):
    bb = make_tiny_backbone()
    curve = evaluate.learning_curve(trained, bb, [16, "ALL"], max_examples=20)
    sizes = [n for n, _ in curve["points"]["adapter"]]
    assert sizes[0] == 16 and sizes[1] > 16
    assert all(0 <= acc <= 1 for _, acc in curve["points"]["tfidf+logreg"])


def test_no_zero_shot_skips_the_column(trained, tmp_path, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("zero-shot ran despite --no-zero-shot")

    monkeypatch.setattr(evaluate, "zero_shot", never)
    out = tmp_path / "rep"
    assert main(["eval", "pets", "--adapters-dir", str(trained.folder.parent), "--out", str(out),
                 "--no-router", "--no-zero-shot"]) == 0
    pets = json.loads((out / "eval.json").read_text())["tasks"]["pets"]
    assert pets["zero_shot"] is None and "no-zero-shot" in pets["zero_shot_note"]
    assert pets["adapter"]["n"] > 0 and pets["baseline"]["accuracy"] > 0


def test_interrupted_zero_shot_keeps_the_adapter_scores_on_disk(trained, tmp_path, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "zero_shot", interrupted)
    out = tmp_path / "rep"
    assert main(["eval", "pets", "--adapters-dir", str(trained.folder.parent), "--out", str(out),
                 "--no-router"]) == 130
    pets = json.loads((out / "eval.json").read_text())["tasks"]["pets"]
    assert pets["adapter"]["n"] > 0 and pets["baseline"] is not None and pets["zero_shot"] is None
    assert "pets" in (out / "eval.md").read_text()


def test_zero_shot_is_skipped_with_a_reason_for_many_or_ambiguous_labels(tokenizer):
    many = [f"label{i}" for i in range(evaluate.ZERO_SHOT_MAX_LABELS + 1)]
    assert "21 labels" in evaluate.zero_shot_skip_reason(many, tokenizer)
    # the tiny byte-level tokenizer: 'DESC:manner' and 'DESC:def' share the first token 'D'
    assert "same token" in evaluate.zero_shot_skip_reason(["DESC:manner", "DESC:def"], tokenizer)
    assert evaluate.zero_shot_skip_reason(["cat", "dog"], tokenizer) is None


def test_run_eval_takes_keywords_and_the_cli_shows_its_log_lines(trained, tmp_path, capsys):
    results = evaluate.run_eval(adapters_dir=trained.folder.parent, names=["pets"], out=tmp_path / "kw",
                                max_examples=10, no_router=True, command_line="test")
    assert results["tasks"]["pets"]["status"] == "ok" and results["meta"]["command"] == "test"
    assert json.loads((tmp_path / "kw" / "eval.json").read_text())["tasks"]["pets"]["n_test"] <= 10
    assert not evaluate.all_failed(results)
    capsys.readouterr()
    assert main(["eval", "pets", "--adapters-dir", str(trained.folder.parent), "--out", str(tmp_path / "cli"),
                 "--no-router", "--max-examples", "10"]) == 0
    out, err = capsys.readouterr()
    assert "pets: adapter " in err and "| tfidf " in err  # logged by the library, shown by the CLI
    assert f"wrote {tmp_path / 'cli' / 'eval.md'}" in out


def test_a_bad_curve_is_a_usage_error(trained, capsys):
    with pytest.raises(SystemExit) as done:
        main(["eval", "--curve", "32,abc", "--adapters-dir", str(trained.folder.parent)])
    assert done.value.code == 2 and "expected positive sizes or ALL" in capsys.readouterr().err


def test_the_tfidf_baseline_trains_on_the_views_the_adapter_trains_on(trained, monkeypatch):
    """A headline baseline trained on articles only would flatter the adapter's headline score."""
    from bot.manifests.registry import load_task

    seen = {}
    real = evaluate.M.tfidf_baseline

    def spy(texts, labels, queries):
        seen["texts"] = list(texts)
        return real(texts, labels, queries)

    monkeypatch.setattr(evaluate.M, "tfidf_baseline", spy)
    task = load_task(make_tiny_backbone(), trained)
    task.spec.train.view_repeats = {"headline": 2, "lede": 0}  # ledes are evaluated, never trained
    rows = [{"text": f"the {word} number {i}", "label": label,
             "views": {"headline": f"{word} {i}", "lede": f"lede {word} {i}"}}
            for i in range(12) for word, label in (("meow", "cat"), ("woof", "dog"))]
    out = evaluate.eval_classify(task, rows[:4], rows[4:], with_zero_shot=False)
    assert out["baseline_trained_on"] == ["text", "headline"]
    assert "meow 4" in seen["texts"] and seen["texts"].count("meow 4") == 1
    assert not any(t.startswith("lede") for t in seen["texts"])
    assert len(seen["texts"]) == 2 * len(rows[4:])
    assert set(out["views_baseline"]) == {"headline", "lede"}


def test_budget_scores_the_whole_split_when_it_fits_and_says_how_many_when_not():
    import time as _time

    class Slow:
        def __init__(self, per_text):
            self.per_text = per_text

        def predict(self, texts, **kw):
            _time.sleep(self.per_text * len(texts))
            return [{"a": 1.0} for _ in texts]

    rows = [{"text": f"t{i}", "label": "a"} for i in range(100)]
    kept, note = evaluate.budgeted_rows(Slow(0.0), rows, budget_s=10)
    assert kept == rows and note.startswith("all 100 held-out examples")
    kept, note = evaluate.budgeted_rows(Slow(0.01), rows, budget_s=0.5)  # ~50 rows fit
    assert 16 <= len(kept) < 100 and kept == rows[:len(kept)]
    assert f"the first {len(kept)} of 100 held-out examples" in note and "--max-examples" in note
