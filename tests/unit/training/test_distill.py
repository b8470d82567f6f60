"""Self-distillation data for the chat adapter (bot.training.distill, issue 11): extra rows join
training only, replies are cut at whole sentences, and the committed files are well formed.
"""

from __future__ import annotations

import json

import pytest
from helpers import REPO

from bot.errors import SpecError
from bot.manifests.spec import AdapterSpec
from bot.training.distill import whole_sentences
from bot.training.train import data_files, training_rows


def test_train_extra_rows_join_training_only_and_survive_a_save(tmp_path):
    folder = tmp_path / "talk"
    folder.mkdir()
    rows = [{"prompt": f"question {i}?", "reply": f"answer {i}."} for i in range(40)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = [{"prompt": "why?", "reply": "Because. It is so."}] * 3
    (folder / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    (folder / "extra.meta.json").write_text("{}")
    spec = AdapterSpec(name="talk", kind="generate", folder=folder,
                       data={"path": "data.jsonl", "train_extra": ["extra.jsonl"]})
    _, splits = training_rows(spec)
    assert sum(r["prompt"] == "why?" for r in splits.train) == 3
    assert all(r["prompt"] != "why?" for r in splits.val + splits.test)
    assert {p.name for p in data_files(spec, folder)} == {"data.jsonl", "extra.jsonl", "extra.meta.json"}
    with pytest.raises(SpecError, match="train_extra"):
        AdapterSpec(name="talk", kind="generate", data={"path": "d.jsonl", "train_extra": "x.jsonl"})


def test_a_cut_reply_keeps_whole_sentences_only():
    assert whole_sentences("One. Two! Three is cut mid") == "One. Two!"
    assert whole_sentences("no end at all") == ""
    assert whole_sentences("Say \"hi.\" Then go") == "Say \"hi.\""


def test_the_committed_distillation_file_is_not_the_held_out_set():
    rows = [json.loads(line) for line in (REPO / "adapters/chat/self_distill.jsonl").open()]
    held = {json.loads(line)["prompt"].lower() for line in (REPO / "tests/data/instructions.jsonl").open()}
    assert len(rows) >= 400 and all(r["reply"] for r in rows)
    assert not {r["prompt"].lower() for r in rows} & held
    meta = json.loads((REPO / "adapters/chat/self_distill.meta.json").read_text())
    assert meta["command"].startswith("bot distill") and meta["rows"] == len(rows)


def test_instructions_file_is_well_formed():
    rows = [json.loads(line) for line in (REPO / "tests/data/instructions.jsonl").open()]
    assert len(rows) >= 40 and len({r["prompt"] for r in rows}) == len(rows)
    assert {r["kind"] for r in rows} == {"question", "request"}
    assert all(len(r["reply"].split(". ")) >= 2 for r in rows if "\n" not in r["reply"])
