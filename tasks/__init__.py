"""Thin Prefect tasks over fedlib's core: retries, names, caching, logging and tracking only."""
