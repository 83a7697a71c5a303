"""Shared plumbing of every service: config, logging, gRPC bootstrap, telemetry, errors."""
