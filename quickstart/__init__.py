"""One-command entry points: `make demo` (the whole system end to end) and `make up/down/status`."""
