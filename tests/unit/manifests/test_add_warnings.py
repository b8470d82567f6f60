"""`bot add` warns about labels the data cannot carry, and says nothing for a sensible task
(issue 28, item 8); a refusal of thousands of rare labels stays one line.
"""

from __future__ import annotations

import pytest

from bot.cli import main


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
