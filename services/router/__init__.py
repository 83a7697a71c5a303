"""The router: worker registry, health, load-balancing policies; serves the worker contract."""
