"""An OpenAI-compatible HTTP server over GLM-130B: completions (streaming, log-probs, echo scoring, blank filling),
continuous batching, tensor parallelism.

    bash scripts/server.sh                              # the configured model (the demo model without a checkpoint)
    python server.py <generate.py's model flags> --host 127.0.0.1 --port 8000 --max-slots 8 --max-queue 64

Under torchrun with --model-parallel-size > 1, rank 0 serves HTTP and broadcasts each engine step's work; the
other ranks apply it. SIGINT/SIGTERM: in-flight requests get --shutdown-timeout seconds to finish, the rest are
cancelled, and every rank exits. See README.md "Serving" and docs/performance.md "Serving".
"""
import argparse
import os
import signal

import torch

from generation.engine import Engine
from initialize import initialize, initialize_model_and_tokenizer
from model import mpu
from model.errors import UserError, main_entry
from server.protocol import DEFAULT_MAX_REQUEST_BYTES


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max-slots", type=int, default=8, help="sequences decoded together (KV-cache rows)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait for a slot; past it a request gets 429 at once")
    g.add_argument("--max-n", type=int, default=8, help="the largest n (choices per prompt) a request may ask")
    g.add_argument("--served-model-name", default="glm-130b", help="the model name clients ask for")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="larger request bodies get 413 before they are read (default 4 MiB)")


def validate_server_args(args) -> None:
    checks = [(0 < args.port < 65536, f"--port must be in 1..65535, got {args.port}"),
              (args.max_slots >= 1, f"--max-slots must be >= 1, got {args.max_slots}"),
              (args.max_queue >= 1, f"--max-queue must be >= 1, got {args.max_queue}"),
              (args.max_n >= 1, f"--max-n must be >= 1, got {args.max_n}"),
              (args.max_request_bytes >= 1024, f"--max-request-bytes must be >= 1024, got {args.max_request_bytes}"),
              (args.world_size == args.model_parallel_size,
               f"server.py serves one model replica: start --model-parallel-size ({args.model_parallel_size}) "
               f"processes, not {args.world_size}")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def serve(args, engine, tokenizer) -> None:
    """Rank 0: the engine thread and the HTTP server, until a signal stops them."""
    import uvicorn

    from server.app import build_app
    from server.metrics import Metrics
    from server.protocol import Limits
    from server.scheduler import Scheduler, exit_engine_failed

    metrics = Metrics()
    scheduler = Scheduler(engine, args.max_queue, metrics, distributed=mpu.get_model_parallel_world_size() > 1,
                          on_fatal=lambda: setattr(server, "should_exit", True))
    limits = Limits(args.served_model_name, args.max_sequence_length, args.max_n, args.max_queue,
                    args.max_request_bytes, tokenizer.max_token_chars)
    app = build_app(scheduler, tokenizer, limits, metrics)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)  # the engine cancels first

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            scheduler.drain(args.shutdown_timeout)
            super().handle_exit(sig, frame)

    server = Server(config)
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal it caught once it has stopped
        signal.signal(sig, lambda *_: None)
    scheduler.start()
    print(f"> Serving {args.served_model_name} on http://{args.host}:{args.port} ({args.max_slots} slots, "
          f"queue {args.max_queue}, model parallel {mpu.get_model_parallel_world_size()}, pid {os.getpid()})",
          flush=True)
    try:
        server.run()
    finally:
        scheduler.stop()
    if scheduler.failed is not None:  # the engine failed: exit non-zero so that a supervisor restarts the server
        exit_engine_failed(mpu.get_rank())
    if not server.started:
        raise UserError(f"cannot serve on {args.host}:{args.port} (see the message above)")


@main_entry
def main(argv=None) -> None:
    args = initialize(add_server_args, argv)
    validate_server_args(args)
    model, tokenizer = initialize_model_and_tokenizer(args)
    engine = Engine(model, tokenizer, args.max_slots, args.max_sequence_length)
    with torch.no_grad():
        if mpu.get_rank() == 0:
            serve(args, engine, tokenizer)
        else:
            from server.scheduler import follow
            for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when every rank stops
                signal.signal(sig, signal.SIG_IGN)
            follow(engine)
    print(f"> server rank {mpu.get_rank()} stopped", flush=True)


if __name__ == "__main__":
    main()
