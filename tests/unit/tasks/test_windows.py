"""Long texts read whole: cut into overlapping windows, pooled alike in predict and the engine,
and said so in the eval report. (Training that stops: tests/unit/tasks/test_stopping.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_backbone

from bot.engine.pooling import pool_windows
from bot.engine.scheduler import classify_now
from bot.manifests.spec import AdapterSpec
from bot.tasks.classify import ClassifyTask

TEMPLATE = "Classify this.\n\n{text}\n\nTopic:"


def long_text(words=120):
    return " ".join(f"w{i}" for i in range(words))


def test_a_long_text_is_cut_into_overlapping_windows_that_cover_it_whole():
    bb = make_tiny_backbone()
    text = long_text()
    windows = bb.windows(TEMPLATE, text, 96, 16)
    assert len(windows) > 2
    bodies = [w[len("Classify this.\n\n"):-len("\n\nTopic:")] for w in windows]
    assert all(w.endswith("Topic:") for w in windows)
    assert all(len(bb.tokenizer(w)["input_ids"]) <= 96 for w in windows)
    assert text.startswith(bodies[0]) and text.endswith(bodies[-1])
    for a, b in zip(bodies, bodies[1:]):  # each window starts inside the previous one
        assert text.index(b) < text.index(a) + len(a)
        assert text.index(b) > text.index(a)
    assert " ".join(bodies).count("w119") >= 1 and "w0 " in bodies[0]


def test_window_limit_and_short_texts_keep_the_old_prompt():
    bb = make_tiny_backbone()
    text = long_text()
    assert bb.windows(TEMPLATE, text, 96, 1) == [bb.fit_template(TEMPLATE, text, 96)]
    assert len(bb.windows(TEMPLATE, text, 96, 2)) == 2
    assert bb.windows(TEMPLATE, "short", 96, 8) == [TEMPLATE.format(text="short")]


def test_pooling_is_a_normalised_geometric_mean_and_leaves_single_windows_alone():
    one = torch.tensor([[0.7, 0.2, 0.1]]).log()
    assert torch.allclose(pool_windows(one, [0]).exp(), one.exp())
    sure, vague = torch.tensor([0.9, 0.05, 0.05]), torch.tensor([1 / 3, 1 / 3, 1 / 3])
    pooled = pool_windows(torch.stack([sure.log(), vague.log(), vague.log()]), [0, 0, 0]).exp()[0]
    geo = (sure * vague * vague) ** (1 / 3)
    assert torch.allclose(pooled, geo / geo.sum(), atol=1e-6)
    assert pooled.argmax() == 0 and pooled[0] > 0.5  # the sure window still decides
    two = pool_windows(torch.stack([sure.log(), vague.log(), sure.log()]), [0, 1, 1]).exp()
    assert two.shape == (2, 3) and torch.allclose(two.sum(-1), torch.ones(2))


def _task(bb, max_windows=8):
    spec = AdapterSpec.from_dict({"name": "pets", "kind": "classify", "labels": ["cat", "dog"],
                                  "template": TEMPLATE, "lora": {"r": 4},
                                  "train": {"max_length": 64, "max_windows": max_windows}})
    torch.manual_seed(0)
    bb.add_adapter("pets", spec.lora.to_peft(model=bb.base))
    return ClassifyTask(spec, bb)


def test_predict_and_the_engine_pool_the_windows_of_a_long_text_alike():
    bb = make_tiny_backbone()
    task = _task(bb)
    text = long_text(60)
    probs = task.predict([text, "meow"])
    assert task.last_windows[0] > 1 and task.last_windows[1] == 1
    prompts = task.prompts(text)
    each = task.log_probs_from_states(bb.pooled(prompts, "pets", 64))
    expected = pool_windows(each, [0] * len(prompts)).exp()[0]
    assert [probs[0][x] for x in task.labels] == pytest.approx(expected.tolist(), abs=1e-5)
    engine = classify_now(bb, {"pets": task}, [text, "meow"], ["pets", "pets"], 64, chunk=3)
    for a, b in zip(engine, probs):
        assert [a[x] for x in task.labels] == pytest.approx([b[x] for x in task.labels], abs=1e-4)


def test_evaluate_says_which_texts_were_windowed_and_which_were_cut_at_the_limit():
    task = _task(make_tiny_backbone(), max_windows=2)
    two = max(w for w in range(1, 200) if len(task.prompts(long_text(w))) == 2
              and len(task.backbone.windows(TEMPLATE, long_text(w), 64, 3)) == 2)  # read whole in 2
    rows = [{"text": long_text(200), "label": "cat"}, {"text": long_text(two), "label": "cat"},
            {"text": "woof", "label": "dog"}]
    assert len(task.prompts(long_text(200))) == 2 and task._cut(long_text(200))
    assert not task._cut(long_text(two)) and not task._cut("woof")
    result = task.evaluate(rows)
    # both long texts hit the 2-window limit; only the first has text past it
    assert result["text"]["windowed"] == {"texts": 2, "windows": 5, "max_windows": 2, "at_limit": 1}


def test_training_items_are_windows_labelled_as_their_text():
    task = _task(make_tiny_backbone())
    items, groups = task._items([{"text": long_text(60), "label": "dog"}, {"text": "meow", "label": "cat"}])
    assert len(items) > 2 and {label for _, label in items[:-1]} == {1} and items[-1][1] == 0
    assert groups == [0] * (len(items) - 1) + [1]


def test_the_eval_report_says_which_texts_were_read_as_windows():
    """Through eval_classify's real result: the whole text's figures sit under "adapter"."""
    from bot.eval.evaluate import eval_classify
    from bot.eval.report import _windowed_text

    task = _task(make_tiny_backbone(), max_windows=2)
    rows = [{"text": long_text(200), "label": "cat", "views": {"headline": "a cat"}},
            {"text": "woof", "label": "dog", "views": {"headline": "a dog"}}]
    result = eval_classify(task, rows, rows * 3, with_zero_shot=False)
    line = _windowed_text(result)
    assert "text: 1 of 2 texts, 3 windows in all" in line, line
    assert "1 were longer than the limit of 2 windows" in line
    assert "headline" not in line
    assert _windowed_text({"adapter": {"n": 5, "windowed": {"texts": 0}}, "views": {}}) == ""
