"""Issue 28 item 4: no request body reaches a 500, on any endpoint (property-based, bounded).

Hypothesis builds bodies around the fields each endpoint reads (right and wrong types, huge
and negative numbers, lone surrogates, deep nesting, raw bytes) and sends them to a real
server over loopback; every answer must be a success or an OpenAI-shaped 4xx.
"""

from __future__ import annotations

import json

import httpx
import pytest
from helpers import AUTH, make_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.serve.server import BackgroundServer

ENDPOINTS = ("/v1/chat/completions", "/v1/classify", "/v1/load_lora_adapter",
             "/v1/unload_lora_adapter")

text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # surrogates too
numbers = st.one_of(st.integers(-(10 ** 25), 10 ** 25), st.integers(-3, 10),
                    st.floats(allow_nan=False), st.floats(-3, 3))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=12)


def mostly(valid, wrong=anything):
    """``valid`` three times in four, else anything at all (so most bodies get far in)."""
    return st.one_of(valid, valid, valid, wrong)


served = st.sampled_from(["a", "mood", "auto", "tiny-llama"])
words = st.text(st.characters(codec="utf-8", categories=["L", "N", "Zs"]), min_size=1, max_size=30)
content = st.one_of(words, text, st.lists(mostly(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]), "text": mostly(words)})), max_size=3))
message = st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "system", "assistant"]))},
                                optional={"content": mostly(content)})
chat = st.fixed_dictionaries(
    {"model": mostly(served, st.one_of(text, anything)),
     "messages": mostly(st.lists(message, min_size=1, max_size=3))},
    optional={"max_tokens": mostly(st.integers(0, 4), numbers),
              "max_completion_tokens": mostly(st.integers(0, 4), numbers),
              "seed": mostly(st.integers(-(2 ** 63), 2 ** 64 - 1), numbers),
              "temperature": mostly(st.floats(0, 2), numbers), "top_p": mostly(st.floats(0, 1)),
              "repetition_penalty": mostly(st.floats(0.5, 2)), "n": mostly(st.just(1)),
              "stream": mostly(st.booleans()),
              "stop": mostly(st.one_of(words, st.lists(words, max_size=5)), text)})
good_chat = st.fixed_dictionaries(
    {"model": served, "max_tokens": st.integers(1, 3),
     "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": words}),
                          min_size=1, max_size=2)},
    optional={"temperature": st.floats(0, 2), "seed": st.integers(-(2 ** 63), 2 ** 64 - 1),
              "top_p": st.floats(0.05, 1), "stream": st.booleans(),
              "stop": st.lists(words, max_size=4), "repetition_penalty": st.floats(0.5, 2)})
CHAT_KEYS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "seed",
             "top_p", "stream", "stop", "n", "repetition_penalty", "content", "text part"]


@st.composite
def one_wrong(draw, good=good_chat):
    """A valid chat body with one field (or the last message's content) set to anything."""
    body = draw(good)
    key, value = draw(st.sampled_from(CHAT_KEYS)), draw(st.one_of(anything, text, numbers))
    if key == "content":
        body["messages"][-1]["content"] = value
    elif key == "text part":
        body["messages"][-1]["content"] = [{"type": "text", "text": value}]
    else:
        body[key] = value
    return body


classify = st.fixed_dictionaries(
    {"model": mostly(st.just("mood"), st.one_of(served, text, anything))},
    optional={"input": mostly(st.one_of(words, st.lists(words, max_size=10), text,
                                        st.lists(text, max_size=3)))})
# never a served adapter's name for unloading: the other examples need them
unserved = st.one_of(st.sampled_from(["tiny-llama", "", "../../evil", "new-one", "auto"]), text,
                     anything)
adapter = st.fixed_dictionaries(
    {"lora_name": unserved},
    optional={"lora_path": st.one_of(text, anything, st.sampled_from(["/", "/tmp", ".", "/dev/null"]))})
BODIES = {"/v1/chat/completions": st.one_of(good_chat, one_wrong(), chat), "/v1/classify": classify,
          "/v1/load_lora_adapter": adapter, "/v1/unload_lora_adapter": adapter}


def encode(body) -> bytes:
    """JSON as a client would send it; lone surrogates travel as \\udxxx escapes."""
    return json.dumps(body, ensure_ascii=True).encode()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    state = make_state(tmp_path_factory.mktemp("fuzz"), default_max_tokens=3)
    with BackgroundServer(state) as srv, httpx.Client(base_url=srv.url, headers=AUTH,
                                                      timeout=30) as http:
        yield http


def check(r: httpx.Response) -> None:
    assert r.status_code != 500 and r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["type"] != "server_error", err


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_no_body_reaches_a_500(client, data):
    path = data.draw(st.sampled_from(ENDPOINTS))
    body = data.draw(st.one_of(BODIES[path], anything))
    r = client.post(path, content=encode(body), headers={"Content-Type": "application/json"})
    check(r)
    if path == "/v1/chat/completions" and isinstance(body, dict) and body.get("stream") is True \
            and r.status_code == 200:
        assert '"error"' not in r.text, r.text[-300:]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(path=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=200))
def test_no_raw_bytes_reach_a_500(client, path, raw):
    check(client.post(path, content=raw, headers={"Content-Type": "application/json"}))
