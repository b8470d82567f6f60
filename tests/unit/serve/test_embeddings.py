"""Issue 27 item 2: /v1/embeddings (OpenAI's shape): the router's encoder, or the backbone's
mean-pooled final hidden states with an adapter, computed on the engine thread.

A real server over loopback on the tiny random model (helpers.make_state):
generation adapter "a", classify adapter "mood", the router over HashEncoder.
"""

from __future__ import annotations

import base64
import struct
import threading

import numpy as np
import pytest
import torch
from helpers import HashEncoder, assert_openai_error, make_state, post

import bot.engine.scheduler as scheduler_module
from bot.serve.server import BackgroundServer


def reference(srv, text: str, adapter: str | None) -> np.ndarray:
    """transformers' own forward of one unpadded text, averaged and normalised by hand."""
    bb = srv.state.backbone
    ids = torch.tensor([srv.state.token_ids([text])[0]])
    with torch.no_grad():
        if adapter is None:
            with bb.peft.disable_adapter():
                out = bb.peft(input_ids=ids, output_hidden_states=True)
        else:
            bb.peft.set_adapter(adapter)
            out = bb.peft(input_ids=ids, output_hidden_states=True)
    vec = out.hidden_states[-1][0].float().mean(0)
    return (vec / vec.norm()).numpy()


def test_the_openai_client_gets_the_backbones_mean_pooled_states(server, client):
    texts = ["hello there", "a much longer text than the first one, padded beside it", "x"]
    r = client.embeddings.create(model="tiny-llama", input=texts)  # the client asks for base64
    assert r.model == "tiny-llama" and [d.index for d in r.data] == [0, 1, 2]
    for d, text in zip(r.data, texts):
        vec = np.array(d.embedding)
        assert vec.shape == (32,) and abs(np.linalg.norm(vec) - 1) < 1e-5
        np.testing.assert_allclose(vec, reference(server, text, None), atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(t) for t in texts)  # one token a byte


def test_an_adapter_is_active_while_embedding(server, client):
    text = "the adapter changes the states"
    with_a = np.array(client.embeddings.create(model="a", input=text).data[0].embedding)
    base = np.array(client.embeddings.create(model="tiny-llama", input=text).data[0].embedding)
    np.testing.assert_allclose(with_a, reference(server, text, "a"), atol=1e-5)
    assert np.abs(with_a - base).max() > 1e-3, "adapter 'a' changed nothing"
    mood = np.array(client.embeddings.create(model="mood", input=text).data[0].embedding)
    np.testing.assert_allclose(mood, reference(server, text, "mood"), atol=1e-5)


def test_router_encoder_gives_the_routers_own_vectors(client):
    texts = ["hello how are you", "terrible product"]
    r = client.embeddings.create(model="router-encoder", input=texts)
    want = HashEncoder().encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), want, atol=1e-6)


def test_float_and_base64_formats_carry_the_same_values(server):
    body = {"model": "a", "input": ["same text"]}
    floats = post(server, "/v1/embeddings", {**body, "encoding_format": "float"}).json()
    packed = post(server, "/v1/embeddings", {**body, "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    values = struct.unpack(f"<{len(raw) // 4}f", raw)
    np.testing.assert_allclose(values, floats["data"][0]["embedding"], atol=1e-7)
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"


def test_backbone_embeddings_run_on_the_engine_thread(server, monkeypatch):
    seen = []
    real = scheduler_module.embed_now

    def spy(*args, **kw):
        seen.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(scheduler_module, "embed_now", spy)
    assert post(server, "/v1/embeddings", {"model": "a", "input": ["t"] * 3}).status_code == 200
    assert seen and set(seen) == {"bot-engine"}


@pytest.mark.parametrize("body,status,param,words", [
    ({"model": "nope"}, 404, "model", ["does not exist", "router-encoder"]),
    ({"input": [f"t{i}" for i in range(9)]}, 400, "input", ["9 texts", "--max-classify-inputs"]),
    ({"input": "x" * 9000}, 400, "input", ["characters", "--max-input-chars"]),
    ({"input": ""}, 400, "input", ["non-empty"]),
    ({"input": []}, 400, "input", ["non-empty"]),
    ({"dimensions": 8}, 400, "dimensions", ["dimensions=8", "Fix"]),
    ({"encoding_format": "int8"}, 400, "encoding_format", ["encoding_format"]),
    ({"truncate": True}, 400, "truncate", ["'truncate' is not supported"]),
])
def test_bad_requests_are_refused_naming_the_field(server, body, status, param, words):
    r = post(server, "/v1/embeddings", {"model": "a", "input": "hi", **body})
    assert_openai_error(r, status, *words, param=param)


def test_a_text_over_the_context_is_400_before_the_engine(tmp_path):
    state = make_state(tmp_path)
    with BackgroundServer(state) as srv:
        r = post(srv, "/v1/embeddings", {"model": "a", "input": ["ok", "y" * 300]})
        assert_openai_error(r, 400, "input text 1 has 300 tokens", "context limit of 256",
                            param="input")


def test_router_encoder_tokens_are_counted_up_to_its_limit_on_a_private_tokenizer():
    from types import SimpleNamespace

    from helpers import make_tokenizer

    from bot.serve import embeddings

    tok = make_tokenizer()
    encoder = SimpleNamespace(tokenizer=tok, max_seq_length=5)
    assert embeddings._encoder_tokens(encoder, ["hello world", "hi"]) == 5 + 2  # a byte a token
    assert embeddings._counters[id(encoder)][1] is not tok, "counted on the encoder's own tokenizer"
