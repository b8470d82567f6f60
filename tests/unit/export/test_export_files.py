"""Issue 28 items 8 and 11 and the export minor: what `bot add`, `bot train`'s metrics and
`bot export` write stays small, warns, and never deletes a user's files."""

from __future__ import annotations

import json
import random

import pytest
from helpers import make_adapter, make_tiny_backbone
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from bot.cli import main
from bot.errors import ExportError
from bot.eval.metrics import DENSE_LABELS, TOP_CONFUSIONS, classification_metrics
from bot.export.vllm import export


# ------------------------------------------------------------------ item 8
def _predictions(n_labels, per_label, wrong=0.3, seed=0):
    rng = random.Random(seed)
    labels = [f"label-{i:05d}" for i in range(n_labels)]
    truth = [lab for lab in labels for _ in range(per_label)]
    preds = [rng.choice(labels) if rng.random() < wrong else t for t in truth]
    return labels, truth, preds


def test_8_metrics_of_3000_labels_stay_a_few_kb():
    labels, truth, preds = _predictions(3000, 3)
    m = classification_metrics(truth, preds, labels)
    size = len(json.dumps(m))
    assert size < 30_000, f"metrics are {size:,} bytes for 3,000 labels"
    assert "confusion" not in m and m["n_labels"] == 3000
    assert m["accuracy"] == pytest.approx(sum(t == p for t, p in zip(truth, preds)) / len(truth))
    _, _, f1, _ = precision_recall_fscore_support(truth, preds, labels=labels, zero_division=0)
    assert m["macro_f1"] == pytest.approx(f1.mean())
    top = m["top_confusions"]
    assert 0 < len(top) <= TOP_CONFUSIONS and all(c["true"] != c["pred"] for c in top)
    assert [c["count"] for c in top] == sorted((c["count"] for c in top), reverse=True)
    assert len(m["per_class"]) == DENSE_LABELS and "lowest F1" in m["per_class_kept"]
    worst = min(f1)
    assert min(v["f1"] for v in m["per_class"].values()) == pytest.approx(worst)


def test_8_metrics_of_few_labels_keep_the_full_matrix_and_match_sklearn():
    labels, truth, preds = _predictions(7, 20, wrong=0.4, seed=3)
    preds[0] = "(fallback)"  # a prediction-only label becomes an extra column, as before
    m = classification_metrics(truth, preds, labels)
    every = labels + ["(fallback)"]
    assert m["labels"] == every
    assert m["confusion"] == confusion_matrix(truth, preds, labels=every).tolist()
    p, r, f, s = precision_recall_fscore_support(truth, preds, labels=every, zero_division=0)
    for i, lab in enumerate(every):
        got = m["per_class"][lab]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i]))
    assert m["macro_f1"] == pytest.approx(f[:-1].mean())  # "(fallback)" has no support


def _labels_csv(path, n_labels, per_label):
    rows = ["text,label"] + [f"example {i} of class {k},c{k}" for k in range(n_labels)
                             for i in range(per_label)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("n_labels,per_label,words", [
    (300, 5, "5.0 rows per label on average, below 20"),
    (1200, 25, "more than 1,000 labels"),
])
def test_8_bot_add_warns_about_labels_the_data_cannot_carry(tmp_path, capsys, n_labels, per_label,
                                                            words):
    csv = _labels_csv(tmp_path / "many.csv", n_labels, per_label)
    assert main(["add", "many", "--from", str(csv), "--adapters-dir", str(tmp_path / "ad")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "warning:" in err and words in err and "Fix: merge labels" in err, err
    assert (tmp_path / "ad" / "many" / "adapter.yaml").exists(), "a warning, not a refusal"


@pytest.mark.parametrize("n_labels,per_label", [(3, 40), (2, 6), (50, 20), (1000, 20)])
def test_8_bot_add_says_nothing_for_a_sensible_task(tmp_path, capsys, n_labels, per_label):
    """Few labels on little data, TREC-like 50 labels, 1,000 labels of 20 rows: no warning."""
    csv = _labels_csv(tmp_path / "ok.csv", n_labels, per_label)
    assert main(["add", "ok", "--from", str(csv), "--adapters-dir", str(tmp_path / "ad")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_8_a_refusal_of_thousands_of_rare_labels_stays_one_line(tmp_path, capsys):
    csv = _labels_csv(tmp_path / "rare.csv", 2000, 2)
    assert main(["add", "rare", "--from", str(csv), "--adapters-dir", str(tmp_path / "ad")]) == 2
    err = capsys.readouterr().err
    assert "and 1,990 more" in err and len(err) < 2000


# ------------------------------------------------------------------ item 11
@pytest.fixture
def exported(tmp_path):
    bb = make_tiny_backbone()
    make_adapter(bb, tmp_path / "adapters", "talk", "generate")
    out = tmp_path / "out"
    export(["talk"], out, backbone=bb, adapters_dir=tmp_path / "adapters")
    return bb, tmp_path / "adapters", out


def test_11_an_export_lists_what_it_wrote(exported):
    _, _, out = exported
    files = json.loads((out / "export.json").read_text())["files"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == on_disk and "README.md" in files and "talk/adapter_config.json" in files


def test_11_re_export_refuses_to_delete_files_it_did_not_write(exported):
    bb, adapters, out = exported
    (out / "notes.txt").write_text("mine")
    (out / "talk" / "eval.md").write_text("mine too")
    with pytest.raises(ExportError, match=r"2 file\(s\) no export wrote \(notes.txt, talk/eval.md\)"
                                          r".*--force"):
        export(["talk"], out, backbone=bb, adapters_dir=adapters)
    assert (out / "notes.txt").read_text() == "mine" and (out / "talk" / "eval.md").exists()


def test_11_force_moves_them_to_the_trash_first(exported):
    bb, adapters, out = exported
    (out / "notes.txt").write_text("mine")
    (out / "talk" / "eval.md").write_text("mine too")
    export(["talk"], out, backbone=bb, adapters_dir=adapters, force=True)
    assert not (out / "notes.txt").exists() and (out / "README.md").exists()
    [trash] = (out.parent / ".trash").iterdir()
    assert trash.name.startswith("out-")
    assert (trash / "notes.txt").read_text() == "mine"
    assert (trash / "talk" / "eval.md").read_text() == "mine too"
    export(["talk"], out, backbone=bb, adapters_dir=adapters)  # its own files only: no refusal


def test_11_an_older_export_without_a_file_list_keeps_the_user_files(exported):
    bb, adapters, out = exported
    manifest = json.loads((out / "export.json").read_text())
    del manifest["files"]
    (out / "export.json").write_text(json.dumps(manifest))
    (out / "mine").mkdir()
    (out / "mine" / "run.sh").write_text("vllm serve ...")
    with pytest.raises(ExportError, match=r"mine/run.sh"):
        export(["talk"], out, backbone=bb, adapters_dir=adapters)
    (out / "mine" / "run.sh").unlink()
    (out / "mine").rmdir()
    export(["talk"], out, backbone=bb, adapters_dir=adapters)  # base/, talk/, README.md: ours


def test_minor_export_below_a_file_names_the_file_not_errno(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export", "talk", "--to", str(tmp_path / "file" / "sub"),
                 "--adapters-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'file'} is a file, so" in err and "Fix: pass --to a folder" in err
    assert "Errno" not in err
