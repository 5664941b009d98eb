"""fedlib's pure core: everything a federation computes, nothing about where it runs.

Nothing here imports Prefect; `tasks/` and `flows/` wire these functions into Prefect runs.
"""

__version__ = "0.1.0"
