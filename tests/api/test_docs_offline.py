"""Swagger UI works on a closed network: its page loads nothing from another host, and
every script, style and icon it names is a static file this deployment serves."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders

pytestmark = pytest.mark.django_db


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_script = tag == "script"
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def test_the_swagger_page_references_no_external_host(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    page = _Assets()
    page.feed(response.content.decode())
    inline = "\n".join(page.scripts)
    urls = page.urls + re.findall(r"""["'](https?:)?//[^"']+["']""", inline)
    assert page.urls, "the page names no asset at all"
    external = [u for u in page.urls if re.match(r"^(https?:)?//", u)]
    assert external == []
    assert not re.search(r"https?://", inline), inline
    for url in urls:
        assert url.startswith("/" + settings.STATIC_URL.lstrip("/")), url
        assert finders.find(url.split("?", 1)[0][len("/" + settings.STATIC_URL.lstrip("/")) :]), (
            f"{url} is not a static file of this project"
        )
