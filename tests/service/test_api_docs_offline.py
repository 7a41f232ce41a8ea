"""/docs and /redoc work offline: their pages reference only this server's own URLs, and each
of those answers 200 (no CDN, no web fonts)."""

from __future__ import annotations

import re

import pytest
from service_support import Service

_URL = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']"""
                  r"""|(?:url|openapi_url)\s*:\s*['"]([^'"]+)['"]""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_use_local_assets_only(shared_service: Service, page: str) -> None:
    async with shared_service.client(None) as c:
        r = await c.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        assert "cdn" not in html.lower() and "fonts.googleapis" not in html
        urls = {a or b for a, b in _URL.findall(html)}
        assert urls, html
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), (page, url)
        assert any(u.endswith(".js") for u in urls) and "/openapi.json" in urls, urls
        for url in sorted(urls):
            got = await c.get(url)
            assert got.status_code == 200, (url, got.status_code)
            assert got.content, url
