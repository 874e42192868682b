"""The Ray runner for `index --ray` and `score --ray` (DESIGN §9). Ray is imported only inside functions.

Work units (a slice of the source stream, or a shard) go through CPU decode tasks and embedding actors on
Ray Data; the driver receives each unit's rows in unit order and commits them through the same writer and
commit protocol as a local run, so ids and rows equal a local run of the same sources.
"""

from .cluster import RayCluster, connect

__all__ = ["RayCluster", "connect"]
