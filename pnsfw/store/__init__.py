"""The on-disk store: manifest, shards, projection, locks. Imports no other stage."""

from .projection import Projection
from .store import Store, StoreWriter

__all__ = ["Projection", "Store", "StoreWriter"]
