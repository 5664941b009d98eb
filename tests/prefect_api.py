"""Synchronous calls to a Prefect server's API from test code, for the drills and deployment tests
that each run their own server."""

from __future__ import annotations

import asyncio


def client_call(api_url: str, fn):
    """`await fn(client)` with a Prefect client of the server at `api_url`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def call():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(call())
