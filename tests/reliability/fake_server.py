"""`python -m tests.reliability.fake_server --port P [--delay S] [--step-delay S] [--drain-timeout S]`:
the real server stack (deploylm.serving.serve, uvicorn, draining shutdown) over the scripted FakeGenerator,
so faults can be timed exactly (a request that takes `--delay` seconds is surely in flight)."""
from __future__ import annotations

import argparse

from deploylm.serving import ServeConfig, serve
from tests.reliability.fakes import FakeGenerator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    args = parser.parse_args()
    config = ServeConfig(model_name="fake", drain_timeout_s=args.drain_timeout)
    serve(FakeGenerator(delay=args.delay, step_delay=args.step_delay), config, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
