"""loradock's running process: HTTP API, registry, metrics and lifecycle."""
