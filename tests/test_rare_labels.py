"""`bot add --min-per-label`: rare labels are refused by default, kept on request, and training agrees."""

from __future__ import annotations

from bot.cli import main
from bot.spec import AdapterSpec
from bot.train import training_rows


def test_rare_labels_refused_by_default_and_kept_with_min_per_label(tmp_path, capsys):
    src = tmp_path / "q.csv"
    lines = ["text,label"] + [f"how do I do thing {i},manner" for i in range(30)]
    lines += [f"what is word {i},def" for i in range(30)] + ["who won the cup in 1966,rare", "who ran fastest,rare"]
    src.write_text("\n".join(lines) + "\n")
    adapters = tmp_path / "adapters"
    args = ["add", "q", "--adapters-dir", str(adapters), "--from", str(src)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "{'rare': 2}" in err and "--min-per-label 1" in err
    assert main([*args, "--min-per-label", "1"]) == 0
    spec = AdapterSpec.from_dir(adapters / "q")
    assert spec.labels == ["def", "manner", "rare"] and spec.data["min_per_label"] == 1
    spec, splits = training_rows(spec)  # bot train accepts what bot add accepted
    assert sum(s for s in splits.sizes().values()) == 62
