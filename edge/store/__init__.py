"""Crash-safe session store: every classified cell is persisted before it is counted."""

from hemaedge.edge.store.session import CROPS, DB_NAME, NewCell, SessionStore, StoredCell, write_png

__all__ = ["CROPS", "DB_NAME", "NewCell", "SessionStore", "StoredCell", "write_png"]
