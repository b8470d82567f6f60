"""Helpfulness of the assistant route (bot.eval.helpful, issue 11): the targets and the report's section."""

from __future__ import annotations

from bot.eval.helpful import met
from bot.eval.report import write_report


def test_helpfulness_targets_and_report_section(tmp_path):
    figures = {"ppl_ratio": 1.05, "length_ratio": 0.5, "dialogue_ppl_change": -0.3}
    assert met(figures) == {"ppl_ratio": True, "length_ratio": False, "dialogue_ppl_change": True}
    assert met({})["ppl_ratio"] is None
    ins = {**figures, "n": 1, "ppl_base": 10.0, "ppl_adapter": 10.5, "length_base": 40,
           "length_adapter": 20, "max_tokens": 160, "routed_to": {"assistant": 1}, "met": met(figures),
           "samples": [{"prompt": "How?", "base": "Like so. Then.", "adapter": "So.",
                        "route": "assistant", "routed": "Like so. Then."}]}
    results = {"tasks": {"chat": {"kind": "generate", "status": "ok", "ppl_base": 50.0, "ppl_adapter": 30.0,
                                  "instructions": ins},
                         "assistant": {"kind": "base", "status": "ok", "verdict": "bare backbone"}}}
    _, md = write_report(results, tmp_path, plots=False)
    text = md.read_text()
    assert "| assistant | bare backbone |" in text
    assert "NOT MET" in text and "**assistant**: Like so. Then." in text
