"""Prefect flows: the federation and its round DAG, composed from `tasks/`."""
