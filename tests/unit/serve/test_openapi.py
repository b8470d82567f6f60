"""Issue 27 item 5: /openapi.json describes what the server accepts, and a bounded
property-based run (schemathesis) against it on loopback gets no 500.

The tiny random model (helpers.make_state, small limits), a fixed number of
derandomized examples per operation, every request to 127.0.0.1.
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from helpers import AUTH, make_state, post
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from bot.serve.server import BackgroundServer

# a served name in place of the generated one (None: keep it)
SERVED = [None, "a", "tiny-llama", "mood", "auto", "router-encoder", "a:0.5"]
EXAMPLES = int(os.environ.get("OPENAPI_EXAMPLES", 20))  # per operation and mode: ~360 requests


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with BackgroundServer(make_state(tmp_path_factory.mktemp("oas"))) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        yield srv


def operations(srv):
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def check(served, op, mode, seen: dict) -> None:
    """EXAMPLES generated requests to ``op``: none may get a 500; errors are OpenAI-shaped."""
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode), model=st.sampled_from(SERVED))
    def run(case, model):
        if model and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = model  # most random names are 404s: reach the handlers too
        response = case.call(base_url=served.url, headers=AUTH, timeout=60)
        assert response.status_code < 500, (op.path, case.body, response.text[:500])
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
            err = response.json()["error"]
            assert err["message"] and err["type"]

    run()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_500(served, mode):
    """Schemathesis' requests from the served document: valid ones, then ones that break it."""
    ops = operations(served)
    labels = {op.label for op in ops}  # (schemathesis leaves out the document's own path)
    assert {f"POST /v1/{p}" for p in ("chat/completions", "completions", "embeddings", "classify",
                                      "load_lora_adapter", "unload_lora_adapter")} <= labels
    seen = {}
    for op in ops:
        check(served, op, mode, seen)
    print(mode.value, dict(sorted(seen.items())))
    assert sum(seen.values()) >= len(ops), seen
    if mode is GenerationMode.NEGATIVE:
        assert seen.get(400, 0) > 0, seen  # the broken bodies were refused, not accepted


def test_the_document_lists_every_endpoint_and_field(served):
    doc = httpx.get(served.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                 "/v1/classify", "/v1/load_lora_adapter",
                                 "/v1/unload_lora_adapter", "/health", "/metrics",
                                 "/v1/models", "/openapi.json"}
    schemas = doc["components"]["schemas"]
    completion = schemas["CompletionRequest"]
    assert completion["additionalProperties"] is False
    assert completion["required"] == ["model", "prompt"]
    props = completion["properties"]
    assert {"response_format", "guided_json", "guided_regex", "guided_choice",
            "structured_outputs", "logprobs", "echo", "stream", "seed"} <= set(props)
    assert props["echo"]["enum"] == [False]
    assert props["n"]["enum"] == [1]
    assert schemas["ResponseFormat"]["properties"]["type"]["enum"] == \
        ["text", "json_object", "json_schema"]
    assert schemas["EmbeddingRequest"]["properties"]["encoding_format"]["enum"] == \
        ["float", "base64"]


def test_every_documented_field_is_accepted_and_no_other(served):
    """Each property of the chat schema is taken (not 'not supported'); an extra one is refused."""
    doc = httpx.get(served.url + "/openapi.json").json()
    props = doc["components"]["schemas"]["ChatRequest"]["properties"]
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for name in props:
        r = post(served, "/v1/chat/completions", {**body, name: None} if name not in body
                 else body)
        assert "is not supported by bot serve" not in r.text, name
    r = post(served, "/v1/chat/completions", {**body, "tools": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
