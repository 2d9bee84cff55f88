"""Serve a checkpoint over HTTP: a chat UI at / and an OpenAI-compatible API at /v1.

    python -m scripts.chat_web [--stage sft] [--tag TAG] [--init-from SPEC] [--port 8000]
    python -m scripts.chat_web --host 0.0.0.0 --api-key SECRET      # reachable from other machines

Binds 127.0.0.1 unless --host says otherwise. On GPUs one worker per device (each with its own copy of the
model); on CPU --workers engines share one model. Requests beyond the busy workers wait in a queue of
--max-queue; past that the server answers 429. See reasoning/chat_server.py.
"""

import argparse
import math
import os

import torch

from reasoning.chat import DEFAULT_MAX_TOKENS
from reasoning.chat_server import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, bind_socket, create_app, serve
from reasoning.checkpoint import ModelSource, add_model_args
from reasoning.common import UserError, get_device, print0, run_main
from reasoning.latent import serving_mode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, default_stage="sft")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("REASONING_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on /v1 and /stats (default $REASONING_API_KEY)")
    parser.add_argument("--workers", type=int, default=None,
                        help="concurrent generations (default: one per GPU, or 2 on CPU)")
    parser.add_argument("--max-queue", type=int, default=16, help="requests that may wait for a worker (16)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help=f"seconds a request body may take to arrive, then 408 ({DEFAULT_BODY_TIMEOUT_S:g})")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"reply length when a request sets none ({DEFAULT_MAX_TOKENS}; less when the model's "
                             "context leaves less after the conversation)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: autodetect; cuda = every GPU)")
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: expected a port number in [0, 65535]")
    if not (args.body_timeout > 0 and math.isfinite(args.body_timeout)):
        raise UserError(f"--body-timeout {args.body_timeout}: expected a positive number of seconds")
    for flag, value, low in (("--max-queue", args.max_queue, 0), ("--max-body-bytes", args.max_body_bytes, 1),
                             ("--max-tokens", args.max_tokens, 1),
                             ("--workers", 1 if args.workers is None else args.workers, 1)):
        if value < low:
            raise UserError(f"{flag} {value}: expected an integer >= {low}")

    try:  # before the model loads: a port in use is found out at once
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None
    port = sock.getsockname()[1]  # the real one when --port 0 let the system choose

    device = get_device(args.device)
    if device.type == "cuda" and device.index is None:  # one model copy per GPU
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    else:
        devices = [device]
    source = ModelSource.from_args(args)
    loaded = [source.load(d) for d in devices]
    models, tokenizer, meta = [m for m, _, _ in loaded], loaded[0][1], loaded[0][2]
    tokenizer, latent_steps = serving_mode(tokenizer, meta)  # a chat_latent checkpoint thinks in latent steps
    workers = args.workers or (len(devices) if device.type == "cuda" else 2)
    name = source.label
    app = create_app(models, tokenizer, workers=workers, max_queue=args.max_queue, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes, default_max_tokens=args.max_tokens, model_name=name,
                     body_timeout=args.body_timeout, latent_steps=latent_steps)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print0(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use it")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print0(f"serving {name} on {', '.join(map(str, devices))} with {workers} worker(s): "
           f"UI http://{host}:{port}/  API http://{host}:{port}/v1", flush=True)
    serve(app, sock)


if __name__ == "__main__":
    run_main(main)
