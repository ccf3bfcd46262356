"""The API documentation pages load their scripts and styles from the service itself: they work offline."""
from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def test_docs_and_redoc_need_no_cdn(tmp_path, tiny_checkpoint):
    with TestClient(create_app(Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint))) as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page).text
            assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url: ?'([^']+)'", html)
            scripts = [a for a in assets if a.endswith((".js", ".css"))]
            assert scripts, f"{page} names no script"
            assert "http://" not in html and "https://" not in html, f"{page} loads something from another host"
            for asset in scripts:
                answer = client.get(asset)
                assert answer.status_code == 200 and len(answer.content) > 10_000, asset
