"""response_format on the real backbone: its replies validate against the schema (marked `integration`)."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
from helpers import post, reply

from bot.serve.server import BackgroundServer


@pytest.mark.integration
def test_real_backbone_replies_validate(tmp_path):
    from bot.model.backbone import Backbone
    from bot.serve.state import ServerState, scheduler_for

    bb = Backbone.load()
    state = ServerState(bb, {}, scheduler_for(bb, {}, precision="fp32", max_len=512), None, None)
    cases = [
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                          "age": {"type": "integer", "minimum": 0,
                                                  "maximum": 120}},
         "required": ["name", "age"], "additionalProperties": False},
        {"type": "object", "properties": {"colours": {"type": "array", "maxItems": 3, "items": {
            "enum": ["red", "green", "blue"]}}}, "required": ["colours"],
         "additionalProperties": False},
    ]
    with BackgroundServer(state) as srv:
        for schema in cases:
            r = post(srv, "/v1/chat/completions", {
                "model": bb.info.name, "max_tokens": 60, "messages": [
                    {"role": "user", "content": "Describe a person as JSON."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "p",
                                                                          "schema": schema}}})
            text, reason = reply(r)
            assert reason == "stop", text
            jsonschema_rs.validate(schema, json.loads(text))
