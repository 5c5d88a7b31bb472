"""A long-running gRPC process with only health (cbir.server plumbing), for the stack manager tests.

``python -m tests.quickstart.health_only_service --port P [--delay S]`` is NOT_SERVING for ``delay``
seconds, then SERVING, until SIGTERM.
"""

from __future__ import annotations

import argparse
import threading

from cbir.server import ServerOptions, add_common_flags, serve_until_signalled, start_server


def main() -> int:
    parser = argparse.ArgumentParser()
    add_common_flags(parser, env_prefix="CBIR_TEST", port=0, metrics_port=-1)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    running = start_server(ServerOptions.from_args("health-only", args), [], [], serving=args.delay <= 0)
    if args.delay > 0:
        threading.Timer(args.delay, running.set_serving, (True,)).start()
    return serve_until_signalled(running)


if __name__ == "__main__":
    raise SystemExit(main())
