"""The bundled all-MiniLM-L6-v2 loads as the direct encoder and matches SentenceTransformer (marked `integration`)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ENCODER_TEXTS, st_encode

from bot.routing.encoder import ENCODER_INT8
from bot.routing.fastenc import DirectEncoder


@pytest.mark.integration
def test_bundled_encoder_is_direct_and_matches_sentence_transformers():
    from bot.routing import load_encoder

    direct = load_encoder(int8=False)
    plain = load_encoder(direct=False)
    assert isinstance(direct, DirectEncoder) and not isinstance(plain, DirectEncoder)
    texts = [*ENCODER_TEXTS, "What is the capital of Japan?", "I absolutely loved this movie"]
    assert np.abs(direct.encode(texts) - st_encode(plain, texts)).max() < 1e-5
    # the default (int8 linear layers) stays close to the exact vectors on real text
    default = load_encoder()
    assert default.int8 == ENCODER_INT8
    cosine = (default.encode(texts) * st_encode(plain, texts)).sum(axis=1)
    assert cosine.min() > 0.9, cosine
