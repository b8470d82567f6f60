"""The direct sentence encoder (bot.routing.fastenc) and the router-only evaluation.

``DirectEncoder`` must give the vectors ``SentenceTransformer.encode`` gives (to 1e-5): the
router's stored example embeddings and its fitted head depend on them. The unit tests use a
tiny random BERT built here; the integration test uses the bundled all-MiniLM-L6-v2.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ENCODER_TEXTS, st_encode

from bot.errors import DataError
from bot.routing.fastenc import DirectEncoder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for t in ENCODER_TEXTS for w in t.lower().replace("?", " ? ").split()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", *words]))
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(words) + 6, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    transformer = models.Transformer(str(folder), max_seq_length=24)
    return SentenceTransformer(modules=[transformer, models.Pooling(32, "mean"), models.Normalize()],
                               device="cpu")


def test_direct_encoder_gives_the_vectors_of_encode(tiny_model):
    direct = DirectEncoder(tiny_model, batch_size=3)  # several batches, sorted by length
    got = direct.encode(ENCODER_TEXTS)
    assert got.shape == (len(ENCODER_TEXTS), 32) and got.dtype == np.float32
    assert np.abs(got - st_encode(tiny_model, ENCODER_TEXTS)).max() < 1e-5
    for text in ENCODER_TEXTS:  # one at a time, as the router embeds a turn
        assert np.abs(direct.encode([text]) - st_encode(tiny_model, [text])).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_int8_encoder_is_close_but_not_identical(tiny_model):
    exact, int8 = DirectEncoder(tiny_model).encode(ENCODER_TEXTS), DirectEncoder(tiny_model, int8=True).encode(ENCODER_TEXTS)
    cosine = (exact * int8).sum(axis=1)
    assert cosine.min() > 0.9 and np.abs(exact - int8).max() > 1e-6
    assert DirectEncoder(tiny_model, int8=True).name_hint.endswith("|int8-rows")


def test_direct_encoder_refuses_another_pooling(tiny_model):
    from sentence_transformers import SentenceTransformer, models

    cls_model = SentenceTransformer(modules=[tiny_model[0], models.Pooling(32, "cls")], device="cpu")
    with pytest.raises(DataError, match="mean Pooling.*Fix:"):
        DirectEncoder(cls_model)


def test_router_only_eval_keeps_the_other_sections_of_a_report(tmp_path, monkeypatch):
    import json

    from bot.eval import router_eval

    (tmp_path / "eval.json").write_text(json.dumps({"tasks": {"topic": {"status": "failed", "error": "x"}},
                                                    "latency": {"first_token_ms": 5.0}}))
    section = {"n": 4, "accuracy": 0.75, "n_handwritten": 2, "labels": ["a", "b"], "per_class": {},
               "by_source": {"hand-written: a": {"accuracy": 0.5, "n": 2},
                             "test split: b": {"accuracy": 1.0, "n": 2}}}
    monkeypatch.setattr(router_eval, "scan", lambda d: ([_Spec("a"), _Spec("b")], {}))
    monkeypatch.setattr("bot.eval.router_eval.build_router", lambda specs: "router")
    monkeypatch.setattr("bot.eval.evaluate.eval_router", lambda specs, session: dict(section))
    results = router_eval.run_router_eval(adapters_dir=tmp_path, out=tmp_path, latency=False,
                                          command_line="bot eval --only router")
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["tasks"]["topic"]["error"] == "x" and saved["latency"] == {"first_token_ms": 5.0}
    assert saved["router"]["accuracy"] == 0.75 and saved["router"]["command"] == "bot eval --only router"
    lines = router_eval.summary_lines(results["router"])
    assert lines[0].startswith("router accuracy 75.0% on 4") and "hand-written: a" in lines[1]


class _Spec:
    def __init__(self, name):
        self.name = name
