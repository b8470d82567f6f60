"""Issue 27 item 3: /v1/completions (OpenAI's legacy shape) on the chat endpoint's engine and guards.

A real server over loopback on the tiny random model (helpers.make_state):
generation adapter "a", classify adapter "mood", greedy by default, no end-of-sequence.
"""

from __future__ import annotations

import json
import math
import threading

import httpx
import pytest
from helpers import (
    AUTH,
    assert_openai_error,
    connect,
    make_state,
    metric,
    post,
    request_head,
    slow_steps,
    wait_until,
)

from bot.engine import SamplingParams
from bot.serve.server import BackgroundServer


def engine_text(srv, prompt: str, adapter: str | None, n: int) -> str:
    """The same greedy reply straight from the engine (no HTTP)."""
    ids = srv.state.token_ids([prompt])[0]
    return srv.state.scheduler.generate(ids, adapter, SamplingParams(max_tokens=n))


def test_openai_client_gets_the_engines_greedy_text(server, client):
    r = client.completions.create(model="a", prompt="Once upon a time", max_tokens=6,
                                  temperature=0)
    assert r.object == "text_completion" and r.model == "a"
    [choice] = r.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.text == engine_text(server, "Once upon a time", "a", 6)
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == len("Once upon a time")  # the byte tokenizer: one a byte
    base = client.completions.create(model="tiny-llama", prompt="Once upon a time", max_tokens=6)
    assert base.choices[0].text == engine_text(server, "Once upon a time", None, 6)
    assert base.choices[0].text != choice.text, "the adapter changed nothing: was it applied?"


def test_a_list_of_prompts_gets_one_choice_each_in_order(server, client):
    prompts = ["alpha", "a much longer second prompt", "z"]
    r = client.completions.create(model="a", prompt=prompts, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, p in zip(r.choices, prompts):
        assert c.text == engine_text(server, p, "a", 4)
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert r.usage.completion_tokens == 12


def test_streaming_gives_the_same_text_and_usage_at_the_end(server, client):
    whole = client.completions.create(model="a", prompt=["hello", "bye"], max_tokens=8)
    parts = {0: "", 1: ""}
    reasons, last = {}, None
    for chunk in client.completions.create(model="a", prompt=["hello", "bye"], max_tokens=8,
                                           stream=True):
        assert chunk.object == "text_completion"
        for c in chunk.choices:
            parts[c.index] += c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
        last = chunk
    assert parts == {0: whole.choices[0].text, 1: whole.choices[1].text}
    assert reasons == {0: "length", 1: "length"}
    assert last.usage.completion_tokens == 16


def test_logprobs_top_k_are_the_models_and_the_greedy_token_is_the_best(client):
    r = client.completions.create(model="a", prompt="The sky is", max_tokens=5, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        # 3 alternatives; bytes that are half a UTF-8 character all read "\ufffd" (one key)
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-5)  # greedy: the argmax
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
    none = client.completions.create(model="a", prompt="The sky is", max_tokens=2)
    assert none.choices[0].logprobs is None


def test_chat_logprobs_use_chats_shape(client):
    r = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == r.choices[0].message.content


@pytest.mark.parametrize("body,param,words", [
    ({"echo": True}, "echo", ["echo is not supported", "Fix"]),
    ({"n": 2}, "n", ["only n=1"]),
    ({"best_of": 3}, "best_of", ["best_of"]),
    ({"suffix": "end"}, "suffix", ["suffix"]),
    ({"presence_penalty": 0.5}, "presence_penalty", ["repetition_penalty"]),
    ({"logit_bias": {"5": 1}}, "logit_bias", ["logit_bias"]),
    ({"frobnicate": 1}, "frobnicate", ["'frobnicate' is not supported", "docs/api.md"]),
    ({"logprobs": 21}, "logprobs", ["[0, 20]"]),
    ({"max_tokens": 0}, "max_tokens", ["at least 1"]),
    ({"max_tokens": 1000}, "prompt", ["context limit of 256", "shorten the prompt"]),
    ({"prompt": ""}, "prompt", ["non-empty"]),
    ({"prompt": []}, "prompt", ["non-empty"]),
    ({"prompt": [1, 2, 3]}, "prompt", ["token-id prompts"]),
    ({"prompt": [f"p{i}" for i in range(9)]}, "prompt", ["9 texts", "--max-classify-inputs"]),
    ({"prompt": "x" * 9000}, "prompt", ["characters", "--max-input-chars"]),
    ({"model": "mood"}, "model", ["classify adapter", "/v1/classify"]),
    ({"model": "auto"}, "model", ["auto"]),
    ({"temperature": 3}, "temperature", ["[0.0, 2.0]"]),
])
def test_bad_fields_are_400_naming_the_field(server, body, param, words):
    r = post(server, "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2, **body})
    assert_openai_error(r, 400, *words, param=param)


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    r = post(server, "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2,
                                         "echo": False, "presence_penalty": 0, "best_of": 1,
                                         "logit_bias": {}, "user": "me", "n": 1})
    assert r.status_code == 200, r.text


def test_unknown_model_is_404_and_metrics_count_the_endpoint(server):
    r = post(server, "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert_openai_error(r, 404, "does not exist", param="model")
    before = metric(server, 'bot_requests_total{endpoint="/v1/completions",model="a",status="200"}')
    assert post(server, "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 1}
                ).status_code == 200
    assert wait_until(lambda: metric(
        server, 'bot_requests_total{endpoint="/v1/completions",model="a",status="200"}')
        == before + 1)


def test_the_api_key_is_required(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "a", "prompt": "hi"})
    assert_openai_error(r, 401, "API key")
    assert post(server, "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 1},
                headers=AUTH).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_every_row(tmp_path, monkeypatch, stream):
    state = make_state(tmp_path)
    sched = state.scheduler
    slow_steps(monkeypatch, sched)
    with BackgroundServer(state) as srv:
        body = json.dumps({"model": "a", "prompt": ["go on", "and on"], "max_tokens": 200,
                           "stream": stream}).encode()
        sock = connect(srv)
        sock.sendall(request_head(srv, "/v1/completions", len(body)) + body)
        assert wait_until(lambda: sched.steps >= 10), "the request never started decoding"
        assert sched.in_flight() == 2
        sock.close()
        at_close = sched.steps
        assert wait_until(lambda: sched.in_flight() == 0, 5, 0.002)
        assert sched.steps - at_close <= 3
        assert wait_until(lambda: metric(srv, 'bot_requests_total{endpoint="/v1/completions",'
                                              'model="a",status="499"}') == 1)


def test_a_full_queue_refuses_all_prompts_and_keeps_none(tmp_path):
    state = make_state(tmp_path, max_queue=2)
    gate = threading.Event()
    with BackgroundServer(state) as srv:
        holder = threading.Thread(target=state.scheduler.call, args=(gate.wait,))
        holder.start()  # the engine answers nothing meanwhile: the first two stay queued
        r = post(srv, "/v1/completions", {"model": "a", "prompt": ["a", "b", "c"], "max_tokens": 2})
        gate.set()
        holder.join(30)
        assert_openai_error(r, 429, "limit 2")
        assert wait_until(lambda: state.scheduler.in_flight() == 0)
        assert metric(srv, "bot_generated_tokens_total") == 0, "a refused prompt was decoded"


@pytest.mark.parametrize("message,words,param", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     ["'image_url'", "text parts only"], "messages.0.content"),
    ({"role": "user", "content": "hi", "tool_calls": [{"id": "1"}]},
     ["'tool_calls' is not supported"], "messages.0"),
])
def test_chat_message_parts_and_fields_it_cannot_use_are_400(server, message, words, param):
    r = post(server, "/v1/chat/completions", {"model": "a", "max_tokens": 2, "messages": [message]})
    assert_openai_error(r, 400, *words, param=param)


def test_chat_accepts_the_null_fields_openais_own_replies_carry(server):
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "hello", "refusal": None, "tool_calls": None,
                "function_call": None, "annotations": [], "name": "bot"},
               {"role": "user", "content": "again"}]
    r = post(server, "/v1/chat/completions", {"model": "a", "max_tokens": 2, "messages": history})
    assert r.status_code == 200, r.text
