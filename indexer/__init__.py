"""Durable HNSW catalogue index service (hnswlib + SQLite item store) and the reindex CLI."""
