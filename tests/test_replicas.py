"""Several API replicas sharing one PostgreSQL database and one MLflow server.

- The API-key cache (THYROID_CAD_KEY_CACHE_S), in process: how long a revoked key lives.
- Two real `thyroid-cad serve` processes on loopback ports, one audit database, one
  registry: both serve, a promotion reaches both, both audit into one table (no request id
  lost or doubled), a key created once works on both, a revoked key stops on both.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.db import Database
from service.keys import KeyStore


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _predict(client: TestClient, token: str) -> int:
    files = {"file": ("x.png", _png(), "image/png")}
    headers = {"Authorization": f"Bearer {token}"}
    return client.post("/v1/predict?heatmap=none", files=files, headers=headers).status_code


@pytest.mark.parametrize("cache_s", [300.0, 0.0])
def test_a_revoked_key_lives_as_long_as_the_key_cache(served, cache_s):
    settings = served.settings.model_copy(update={"key_cache_s": cache_s})
    db = Database(settings.audit_url())
    keys = KeyStore(db)
    key_id, token = keys.create_key("predict", "cache-test")
    with TestClient(create_app(settings)) as client:
        assert _predict(client, token) == 200  # verified once, now cached
        assert keys.revoke_key(key_id)
        # 300 s: this process still trusts what it verified; 0 s: it asks every time.
        assert _predict(client, token) == (200 if cache_s else 401)
    db.dispose()


def test_the_key_cache_is_a_setting(monkeypatch):
    from service.config import Settings

    monkeypatch.setenv("THYROID_CAD_KEY_CACHE_S", "1.5")
    assert Settings().key_cache_s == 1.5
    monkeypatch.setenv("THYROID_CAD_KEY_CACHE_S", "-1")
    with pytest.raises(ValueError):
        Settings()
