"""The subcommands: each takes the parsed arguments and returns the exit code.

Heavy imports (torch, libp2p, the server) happen inside each command, after parsing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.errors import ConfigError, RouteError

if TYPE_CHECKING:
    from node.client import Client
    from node.serve.config import ServerConfig
    from node.serve.engine import Engine
    from node.swarmkey import SwarmKey

__all__ = ["COMMANDS"]

_MODEL_ID = re.compile(r"[0-9a-f]{24}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hugging Face Hub repository, ORG/NAME


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while big packages import: a Ctrl-C inside torch's import could leave
    it deadlocked on an import lock, or end the process by the signal itself; held, it comes
    right after, as a KeyboardInterrupt in our own code (exit code 130). Threads started meanwhile
    keep them blocked, so signals keep going to the main thread."""
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _need_torch(command: str) -> None:
    """Serving needs the `serve` extra; the SDK and the CLI's other commands do not."""
    try:
        with held_signals():
            import torch  # noqa: F401
    except ImportError:
        raise ConfigError(f"{command} needs torch: pip install 'moemesh[serve]'") from None


def _say(message: str) -> None:
    print(f"moemesh: {message}", flush=True)


def _say_when(message: str) -> None:
    """A daemon's line: it runs for days, so each line says when (local time, as logging's do)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} moemesh: {message}", flush=True)


def _events(enabled: bool) -> Any:
    """With --json-events: one JSON object per line on stdout for each event (ready, moved, stopping)."""

    def emit(kind: str, **fields: Any) -> None:
        if enabled:
            print(json.dumps({"event": kind, **fields}), flush=True)

    return emit


def _server_config(args: argparse.Namespace, remote: bool = False) -> ServerConfig:
    from node.serve.config import ServerConfig
    from node.serve.device import resolve_device
    from shards import Checkpoint, parse_layers

    if not args.layers:
        raise ConfigError("--model needs --layers START:END")
    if remote:  # a model id: the span is known once its manifest is fetched
        start, end = 0, 0
    else:
        layers = Checkpoint(args.model).config.num_layers
        start, end = (0, layers) if args.layers == "auto" else parse_layers(args.layers, layers)  # auto: later
    return ServerConfig(
        model=args.model,
        start=start,
        end=end,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        quantize=args.quantize,
        device=resolve_device(args.device),  # "cuda" without a GPU: an error here, before anything loads
        max_memory_bytes=args.max_memory or 0,
        max_sessions=args.max_sessions,
        max_sessions_per_client=args.max_sessions_per_client or 0,
        max_queued_per_client=args.max_queued_per_client,
        max_length=args.max_length,
        kv_budget_bytes=int(args.kv_budget_mb * 1024**2),
        max_message_bytes=args.max_message_mb * 1024**2,
        torch_threads=args.threads,
        max_batch=args.max_batch,
        grace_s=args.grace,
        idle_timeout_s=max(args.idle_timeout, 0.1),
        insecure_lan=args.insecure_lan,
        swarm_key=_swarm_key(args),
    )


def _swarm_key(args: argparse.Namespace) -> SwarmKey | None:
    """The --swarm-key given (ConfigError when the file is not one), else None: an open swarm."""
    from node.swarmkey import SwarmKey

    path = getattr(args, "swarm_key", None)
    return None if path is None else SwarmKey.load(path)


def _keygen(args: argparse.Namespace) -> int:
    from node.swarmkey import DEFAULT_PATH, generate_key_file

    path = (args.path or DEFAULT_PATH).expanduser()
    key = generate_key_file(path)
    _say(f"wrote swarm key {key.id} to {path}; give it to every daemon and client: --swarm-key {path}")
    return 0


def _pinned(peers: list[str], fingerprint: str | None) -> list[str]:
    """The peers, with --fingerprint pinned to the one peer given without #fingerprint."""
    if fingerprint is None:
        return peers
    if len(peers) != 1 or "#" in peers[0]:
        raise ConfigError("--fingerprint goes with one peer given without one; pin others as host:port#fingerprint")
    return [f"{peers[0]}#{fingerprint}"]


# libgomp's idle workers spin before they sleep (300k iterations by default). A serving peer
# is idle between steps most of the time, and threads spinning then steal the cores that the
# next peer of a pipeline (or the volunteer's own programs) need; threads that fall asleep
# between the parallel ops of one step pay a wake-up at each (on this VM, ruinous: a 58M
# Llama's 2-server pipeline took 29-31 ms a token at 10k, 21-24 at 100k, 40 at 1M, in the
# same interleaved rounds). 100k (about 2.7 ms here) outlasts the gaps inside a step and ends
# well before the next. A quantized span's decode step is one C call (kernels.fused) whose few
# parallel regions are microseconds apart, so its workers need far less: after its step a
# 100k spin held a core through the hand-off to the next peer and the answer's way out (bench
# model, int4, interleaved rounds: one serving process 1.10x and a 2-span pipeline 1.26x the
# tokens/s at 10k against 100k; 3k lost on the pipeline again).
GOMP_SPINCOUNT = "100000"
GOMP_SPINCOUNT_QUANTIZED = "10000"


def _spin_count(args: argparse.Namespace) -> str:
    return GOMP_SPINCOUNT if getattr(args, "quantize", "none") == "none" else GOMP_SPINCOUNT_QUANTIZED


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("GOMP_SPINCOUNT", _spin_count(args))  # read when torch loads OpenMP, below
    _need_torch("moemesh serve")
    with held_signals():
        from node.serve.lifecycle import Lifecycle, serve
        from node.tls import make_certificate

    if args.layers == "auto":
        raise ConfigError("--layers auto chooses from the swarm's state: use `moemesh daemon`")
    config = _server_config(args)
    event = _events(args.json_events)
    certificate = None if config.insecure_lan else make_certificate()
    fingerprint = certificate.fingerprint if certificate is not None else None

    def ready(engine: Engine, port: int) -> None:
        span = engine.span
        _say(
            f"serving {engine.model_name} ({engine.model_id}) layers {span.start}:{span.end}"
            f" of {span.cfg.num_layers} on {args.host}:{port}"
        )
        if fingerprint is None:
            _say("PLAINTEXT gRPC (--insecure-lan): anyone on the network can read and run requests")
        else:
            _say(f"TLS fingerprint {fingerprint} (clients: --peers {args.host}:{port}#{fingerprint})")
        event(
            "ready",
            grpc_address=f"{args.host}:{port}",
            model_id=engine.model_id,
            layers=[span.start, span.end],
            tls_fingerprint=fingerprint,
        )

    progress = lambda m: print(f"moemesh: {m}", file=sys.stderr, flush=True)  # noqa: E731
    lifecycle = Lifecycle()
    asyncio.run(serve(config, ready, progress=progress, certificate=certificate, lifecycle=lifecycle))
    return 130 if lifecycle.interrupted else 0  # Ctrl-C: what a shell expects; SIGTERM: a clean stop


def _generate(args: argparse.Namespace) -> int:
    from node.client import Client, ClientConfig, Sampling
    from node.client.verify import verdicts

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
        _pinned(args.peers, args.fingerprint) if args.peers else (),
        bootstrap=args.bootstrap or (),
        model_folder=args.model,
        model_id=args.model_id,
        config=ClientConfig(
            insecure_lan=args.insecure_lan,
            exact=args.exact,
            verify_probability=args.verify,
            swarm_key=_swarm_key(args),
            push=not args.relay,
            warm_spares=args.warm_spares,
        ),
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
        if client.verifications:
            print(f"moemesh: spot-checks: {verdicts(client.verifications)}", file=sys.stderr)
            for v in client.verifications:
                if v.verdict in ("lied", "verifier lied"):
                    print(f"moemesh: spot-check: {v}", file=sys.stderr)
    return 0


def _daemon(args: argparse.Namespace) -> int:
    # The cheap checks first: a bad argument is refused before torch or libp2p is imported.
    if args.model is None and args.layers:
        raise ConfigError("--layers needs --model")
    if args.ttl < 3:
        raise ConfigError("--ttl must be at least 3 seconds")
    auto = args.layers == "auto"
    if args.max_layers is not None and not auto:
        raise ConfigError("--max-layers goes with --layers auto")
    if not 0.05 <= args.sync_interval <= 3600:
        raise ConfigError("--sync-interval must be between 0.05 and 3600 seconds")
    from crdt import Limits

    longest = Limits().max_lease_ahead_s  # replicas refuse a lease further ahead than this
    if not 3 * args.sync_interval <= args.lease <= longest:
        raise ConfigError(f"--lease must be at least 3 sync intervals and at most {longest:g} seconds")
    named = str(args.model) if args.model is not None and not args.model.is_dir() else ""
    model_id = named if _MODEL_ID.fullmatch(named) else ""
    hub_id = named if not model_id and _HUB_ID.fullmatch(named) else ""
    remote = bool(model_id or hub_id)
    if named and not remote:
        raise ConfigError(f"--model {named}: no such folder, nor a model id (24 hex digits), nor a Hub id ORG/NAME")
    os.environ.setdefault("GOMP_SPINCOUNT", _spin_count(args))
    server = None
    if args.model is not None:
        _need_torch("moemesh daemon --model")
        server = _server_config(args, remote)
    with held_signals():
        from node.daemon import Daemon, DaemonConfig
        from node.mesh.autonat import AutoNATConfig
        from node.mesh.host import MeshConfig
        from node.mesh.nat import NatConfig
        from node.mesh.relay import RelayConfig
        from node.mesh.weights import WeightsConfig
        from node.swarm.agent import SwarmConfig
        from node.weights.fetch import FetchConfig
        from node.weights.keeper import WeightsPlan

    cache_dir = args.cache_dir or Path(os.environ.get("MOEMESH_CACHE") or Path.home() / ".cache" / "moemesh")
    max_disk = int(args.max_disk * 1e9) if args.max_disk else 0
    plan = WeightsPlan(model_id, hub_id, cache_dir, FetchConfig(max_disk_bytes=max_disk))
    config = DaemonConfig(
        nat=NatConfig(AutoNATConfig(confirmations=args.autonat_confirmations), RelayConfig(serve=args.relay)),
        identity=args.identity,
        mesh=MeshConfig(
            listen_host=args.host, port=args.p2p_port, bootstrap=tuple(args.bootstrap), swarm_key=_swarm_key(args)
        ),
        server=server,
        announce_host=args.announce_host,
        ttl_s=args.ttl,
        swarm=SwarmConfig(
            lease_s=args.lease, sync_interval_s=args.sync_interval, rebalance=auto and not args.no_rebalance
        ),
        auto_layers=auto,
        max_layers=args.max_layers or 0,
        metrics_port=args.metrics_port,
        cache_dir=cache_dir,
        weights=plan,
        layers=args.layers or "",
        serve_weights=WeightsConfig(corrupt=args.test_corrupt_weights, delay_s=args.test_weights_delay),
    )
    daemon = Daemon(config, _say_when, _events(args.json_events))
    asyncio.run(daemon.run())
    return 130 if daemon.lifecycle.interrupted else 0  # Ctrl-C: what a shell expects; SIGTERM: a clean stop


def _status(args: argparse.Namespace) -> int:
    from node.mesh.reader import SwarmReader
    from node.swarm.status import crdt_report, format_crdt_report, format_report, report

    with SwarmReader(args.bootstrap, traversal=True, swarm_key=_swarm_key(args)) as reader:
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
    from node.client import Client, ClientConfig

    peers = _pinned(args.peers, args.fingerprint)
    config = ClientConfig(insecure_lan=args.insecure_lan, swarm_key=_swarm_key(args))
    with Client(peers, config=config) as client:
        for address in peers:
            i = client.info(address)
            print(
                f"{address.partition('#')[0]}: {i.model_name} ({i.model_id})"
                f" layers {i.start}:{i.end} of {i.num_layers},"
                f" max length {i.max_length}, version {i.version}"
            )
    return 0


def _build_demo(args: argparse.Namespace) -> int:
    from node.demo_model import build_demo_model

    print(build_demo_model(args.out))
    return 0


def _api(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("moemesh api needs the api extra: pip install 'moemesh[api]'") from None
    from node.api import ApiConfig, run_api

    event = _events(args.json_events)

    def ready(address: str) -> None:
        _say(
            f"OpenAI-compatible API on http://{address}/v1, dashboard http://{address}/, metrics http://{address}/metrics"
        )
        event("ready", http_address=address)

    client = _swarm_client(args)
    config = ApiConfig(default_max_tokens=args.default_max_tokens, max_streams=args.max_streams)
    run_api(
        client,
        host=args.host,
        port=args.port,
        bootstrap=args.bootstrap or (),
        peers=args.peers or (),
        config=config,
        ready=ready,
    )
    return 0


def _swarm_client(args: argparse.Namespace) -> Client:
    """The SDK client of `api` and `chat`: --peers (pinned with --fingerprint) or --bootstrap."""
    from node.client import Client, ClientConfig

    return Client(
        _pinned(args.peers, args.fingerprint) if args.peers else (),
        bootstrap=args.bootstrap or (),
        model_folder=args.model,
        model_id=args.model_id,
        config=ClientConfig(insecure_lan=args.insecure_lan, swarm_key=_swarm_key(args)),
    )


def _chat(args: argparse.Namespace) -> int:
    from node.cli.chat import Conversation, repl
    from node.client import Sampling

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    with _swarm_client(args) as client:
        return repl(client, Conversation(args.system), max_new_tokens=args.max_new_tokens, sampling=sampling)


def _manifest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from shards.manifest import load_manifest

    if not (args.path / "config.json").is_file():
        raise ConfigError(f"{args.path}: not a checkpoint folder (no config.json)")
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="hashing", disable=None) as bar:
        manifest = load_manifest(args.path, progress=bar.update, total=lambda n: setattr(bar, "total", n))
    if args.out is not None:
        args.out.write_bytes(manifest.canonical())
    print(f"model id {manifest.model_id}: {len(manifest.tensors)} tensors, {manifest.total_bytes / 1e9:.3f} GB,"
          f" {len(manifest.files)} tokenizer files")  # fmt: skip
    return 0


COMMANDS = {
    "serve": _serve,
    "daemon": _daemon,
    "status": _status,
    "generate": _generate,
    "info": _info,
    "build-demo-model": _build_demo,
    "api": _api,
    "chat": _chat,
    "manifest": _manifest,
    "keygen": _keygen,
}
