"""The wire contract at `/contract`: a browsable HTML page, and the AsyncAPI document it shows."""

from __future__ import annotations

import functools

import yaml
from litestar import Response, get

from contracts import html
from contracts.export import ASYNCAPI


@functools.cache
def _page() -> bytes:
    # The document is part of the package: rendered once per process.
    return html.render(yaml.safe_load(ASYNCAPI.read_text())).encode()


@get("/contract", include_in_schema=False)
async def contract_page() -> Response[bytes]:
    return Response(_page(), media_type="text/html; charset=utf-8")


@get("/contract/asyncapi.yaml", include_in_schema=False)
async def contract_document() -> Response[bytes]:
    return Response(ASYNCAPI.read_bytes(), media_type="application/yaml")


ROUTES = [contract_page, contract_document]
