"""Structured-output fields of /v1/chat/completions and /v1/completions, turned into a Grammar.

OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``) and vLLM's
spellings (``guided_json``, ``guided_regex``, ``guided_choice`` and the newer
``structured_outputs: {json | regex | choice}``). At most one may be set per request.
The grammar (bot.engine.grammar) masks each token of the reply inside the engine's
batched step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bot.engine.grammar import Grammar
from bot.errors import ApiError, GrammarError


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: the schema under ``schema``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # every schema is enforced strictly here


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (one of ``json``, ``regex``, ``choice``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None


class Structured(BaseModel):
    """The fields a generating endpoint adds for structured output."""

    response_format: ResponseFormat | None = None
    guided_json: dict | None = None  # vLLM
    guided_regex: str | None = None  # vLLM
    guided_choice: list[str] | None = None  # vLLM
    structured_outputs: StructuredOutputs | None = None  # vLLM >= 0.10


def _asked(body: Structured) -> list[tuple[str, str, object]]:
    """(field, kind, value) of every constraint the request sets."""
    out = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        out.append(("response_format", "json_object", None))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ApiError(400, "response_format of type json_schema needs json_schema.schema. "
                           'Fix: {"type": "json_schema", "json_schema": {"name": "reply", '
                           '"schema": {...}}}', param="response_format.json_schema")
        out.append(("response_format.json_schema.schema", "json", rf.json_schema.schema_))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                       ("guided_choice", "choice")):
        if getattr(body, name) is not None:
            out.append((name, kind, getattr(body, name)))
    so = body.structured_outputs
    if so is not None:
        parts = [(f"structured_outputs.{n}", k, v) for n, k, v in
                 (("json", "json", so.json_), ("regex", "regex", so.regex),
                  ("choice", "choice", so.choice)) if v is not None]
        if not parts:
            raise ApiError(400, "structured_outputs sets none of json, regex or choice",
                           param="structured_outputs")
        out += parts
    return out


def grammar_for(body: Structured, tokenizer, n_vocab: int) -> Grammar | None:
    """The request's Grammar (None: free text). Blocking (compiles): call it from a worker.

    Raises:
        ApiError: two constraints at once, or one that does not compile (400 naming it).
    """
    asked = _asked(body)
    if not asked:
        return None
    if len(asked) > 1:
        names = [a[0] for a in asked]
        raise ApiError(400, f"{' and '.join(names)} are both set; a reply follows one grammar. "
                       "Fix: keep one of them", "conflicting_fields", names[1])
    field, kind, value = asked[0]
    try:
        if kind == "json_object":
            return Grammar.json_object(tokenizer, n_vocab)
        if kind == "json":
            return Grammar.json_schema(tokenizer, n_vocab, value)
        if kind == "regex":
            return Grammar.regex(tokenizer, n_vocab, value)
        return Grammar.choice(tokenizer, n_vocab, value)
    except GrammarError as err:
        raise ApiError(400, f"{field}: {err}. Fix: send a valid one (docs/api.md lists what is "
                       "supported)", "invalid_grammar", field) from None
