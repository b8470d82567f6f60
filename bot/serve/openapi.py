"""The OpenAPI 3.1 document ``bot serve`` answers at ``GET /openapi.json``.

Built from the same pydantic models the handlers validate bodies with (the handlers parse
bodies themselves, off the event loop, so FastAPI's own document would show no bodies).
Bounds that the handlers check in code, with their own messages, are written into the
schemas as plain JSON Schema keywords (``json_schema_extra`` in bot.serve.api), so the
document describes what the server accepts; a property-based run (schemathesis,
tests/unit/serve/test_openapi.py) sends it generated requests and finds no 500.
"""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
# what a POST can answer besides 200 (bot.serve.limits.Guard and the handlers)
ERRORS = {"400": "bad body: the message names the field and the fix",
          "401": "missing or wrong API key", "403": "adapter loading needs an API key",
          "404": "unknown model or adapter", "408": "the body arrived too slowly",
          "413": "body over --max-body-bytes", "429": "queue full (Retry-After)",
          "500": "unexpected error (never for bad input; tests/unit/serve/test_openapi.py)"}


def document(posts: dict[str, tuple[type[BaseModel], str, bool]], secured: bool,
             version: str = "1") -> dict:
    """The document for ``posts`` = {path: (body model, summary, may stream)}."""
    models = list(dict.fromkeys(m for m, _, _ in posts.values()))
    _, top = models_json_schema([(m, "validation") for m in models],
                                ref_template="#/components/schemas/{model}")
    schemas = {**top.get("$defs", {}), "Error": ERROR}
    errors = {code: {"description": text, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for code, text in ERRORS.items()}
    paths: dict = {}
    for path, (model, summary, streams) in posts.items():
        ok = {"application/json": {"schema": {"type": "object"}}}
        if streams:
            ok["text/event-stream"] = {"schema": {"type": "string"}}
        paths[path] = {"post": {
            "operationId": path.strip("/").replace("/", "_"), "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
            "responses": {"200": {"description": "OK", "content": ok}, **errors}}}
    for path, summary, kind in (("/health", "liveness, served models, requests in flight", "json"),
                                ("/metrics", "Prometheus metrics", "text"),
                                ("/v1/models", "served models (OpenAI's list)", "json"),
                                ("/openapi.json", "this document", "json")):
        media = "application/json" if kind == "json" else "text/plain"
        paths[path] = {"get": {"operationId": path.strip("/").replace("/", "_").replace(".", "_"),
                               "summary": summary, "responses": {"200": {
                                   "description": "OK", "content": {media: {"schema": {
                                       "type": "object" if kind == "json" else "string"}}}}}}}
    doc = {"openapi": "3.1.0",
           "info": {"title": "bot serve", "version": version,
                    "description": "OpenAI- and vLLM-compatible API of one backbone with LoRA "
                                   "adapters; docs/api.md lists every field"},
           "paths": paths, "components": {"schemas": schemas}}
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
