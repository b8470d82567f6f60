"""Fixtures of the serving tests: a real server over loopback on the tiny random model
(helpers.make_state: generation adapter "a", classify adapter "mood", small limits), one per
test module, and the `openai` client pointed at it. A module that needs another server
defines its own ``server`` fixture, which takes precedence."""

from __future__ import annotations

import openai
import pytest
from helpers import KEY, make_state

from bot.serve.server import BackgroundServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with BackgroundServer(make_state(tmp_path_factory.mktemp("cmpl"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
