"""The client SDK: find a chain of peers covering every layer, then stream generated tokens.

    with Client(["127.0.0.1:7001#3f2a...", "127.0.0.1:7002#91bc..."], model_folder="~/model") as client:
        for piece in client.generate_text("What is a mixture of experts?", max_new_tokens=64):
            print(piece, end="", flush=True)

Every channel is TLS pinned to a certificate fingerprint (`node.tls`): the one a peer's
signed record names, or the one given as `host:port#fingerprint`. A peer address given
without one is trusted on first use, with a warning. A peer whose certificate is not the
pinned one is refused like a peer that is down (PeerUntrusted): routes go around it.
Plaintext only with `ClientConfig(insecure_lan=True)`, and only to peers without a pin.

Imports no torch: hidden states are relayed between hops as the bytes they arrived as,
and only the last hop's fp32 logits are decoded (with numpy) to pick the next token.

`Client` finds peers (from addresses, or from the swarm's DHT records: its `PeerFinder`,
node.client.discovery), keeps the channels to them (through local tunnels for peers behind
NAT), plans routes and keeps the avoid list; an `InferenceSession` runs one generation along
a route and asks the client, through the narrow `SessionHost` it implements, for
replacements when a hop fails.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from node.client.channels import Channels
from node.client.config import ClientConfig
from node.client.discovery import PeerFinder
from node.client.known import KnownPeers
from node.client.pace import PeerPace
from node.client.sampling import Sampling, sample
from node.client.session import InferenceSession
from node.client.stream import ask_info
from node.client.verify import SpotChecker, Verification
from node.errors import ConfigError, PeerError, RouteError
from node.plan.peers import (
    UNKNOWN_BLOCK_SECONDS,
    PeerInfo,
    PeerView,
    peer_from_info,
)
from node.plan.routing import Hop, best_chain
from node.tls import p2p_address, split_pin

if TYPE_CHECKING:
    from node.client.text import TextCodec

__all__ = ["Client"]

log = logging.getLogger(__name__)
SLOWDOWN_NOTICED = 2.0  # a peer this many times slower than it normally was loses routes in proportion
PACE_WEIGHT = 0.3  # of a peer's newest decode step in the moving average of its pace: a slowdown shows in a few


class Client:
    """Finds peers covering a model, from a list of addresses or from the swarm's DHT.

    Either `peers` ("host:port#fingerprint", or "host:port" to trust on first use) or
    `bootstrap` (libp2p multiaddrs of any daemon of the swarm; the client joins the DHT as a
    client and reads signed records, and pins each peer to its record's fingerprint).
    A peer's address in routes and errors is the string it was dialed by, pin included.
    """

    def __init__(
        self,
        peers: Sequence[str] = (),
        *,
        bootstrap: Sequence[str] = (),
        model_folder: str | Path | None = None,
        model_id: str | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        if not peers and not bootstrap:
            raise ConfigError("give peer addresses (host:port) or a bootstrap multiaddr")
        for peer in peers:
            split_pin(peer)  # ConfigError now for a malformed fingerprint
        self.config = config or ClientConfig()
        self._channels = Channels(
            self.config.max_message_bytes, self.config.info_timeout_s, self.config.insecure_lan, self.config.swarm_key
        )
        self._lock = threading.Lock()  # sessions of one client may run in several threads
        self._avoid: dict[str, float] = {}  # peer -> until (monotonic)
        self._known: KnownPeers | None = None
        self.recoveries: list[str] = []  # every failed hop this client's sessions replaced
        self.verifications: list[Verification] = []  # every spot-check of a peer's outputs (node.client.verify)
        self._spot = SpotChecker(self, self.verifications)
        self._pace: dict[str, PeerPace] = {}  # address -> its pace as this client's sessions measured it
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="moemesh-client")
        self.finder = PeerFinder(peers, bootstrap, model_id, self.config, self.info, self._pool)
        self._text: TextCodec | None = None
        self._text_lock = threading.Lock()
        if model_folder is not None:
            from node.client.text import TextCodec

            self._text = TextCodec(Path(model_folder).expanduser())

    @property
    def peers(self) -> list[str]:
        """The peer addresses this client was given (none: it reads the swarm's records)."""
        return self.finder.peers

    @property
    def bootstrap(self) -> list[str]:
        return self.finder.bootstrap

    @property
    def model_id(self) -> str | None:
        """The model asked for (None: the one the given peers serve)."""
        return self.finder.model_id

    # -- channels ---------------------------------------------------------------------------

    def channel(self, address: str) -> grpc.Channel:
        """The channel to `address` ("host:port#fingerprint" or "host:port"), made on first use:
        TLS pinned to the fingerprint (PeerUntrusted when the peer presents another
        certificate, PeerUnavailable when it answers no TLS), plaintext only with insecure_lan."""
        return self._channels.get(address, self.finder.path(address))

    def close(self) -> None:
        self._channels.close()
        self.finder.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- discovery (node.client.discovery) ---------------------------------------------------

    def info(self, address: str) -> PeerInfo:
        """What the peer at `address` serves, and its limits and load (PeerError if it does not answer)."""
        return peer_from_info(address, ask_info(self.channel(address), address, self.config.info_timeout_s))

    def paths(self) -> dict[str, str]:
        """How this client reaches each peer behind NAT that it tunnels to: relayed or hole-punched.
        (Other peers are dialed directly over gRPC.)"""
        return self.finder.paths()

    def candidates(self, refresh: bool = False) -> KnownPeers:
        """The model and every peer able to run some of its layers; asked once, then kept until
        `refresh` (a recovery that found no replacement among them asks again)."""
        with self._lock:
            known = self._known
        if known is None or refresh:
            known = self.finder.find()
            if self.config.exact:  # full-precision weights only: quantized peers are left out
                exact = [p for p in known.peers if p.quantization == "none"]
                if len(exact) < len(known.peers):
                    log.info("exact: leaving out %d quantized peers", len(known.peers) - len(exact))
                quantized = tuple(f"{p.peer_id} ({p.quantization})" for p in known.peers if p.quantization != "none")
                known = replace(known, peers=exact, quantized=quantized)
            with self._lock:
                self._known = known
        return known

    # -- routes (what a session asks for, as its SessionHost) ---------------------------------

    def avoid(self, hop: Hop, error: PeerError) -> None:
        """Leave the peer of `hop` out of routes for a while (it failed)."""
        log.info("avoiding %s for %g s: %s", hop.address, self.config.avoid_s, error)
        with self._lock:
            self._avoid[hop.peer or hop.address] = time.monotonic() + self.config.avoid_s

    def observed(self, hop: Hop, seconds: float) -> None:
        """A session's decode step through `hop` took `seconds`: the peer's pace as this client sees it."""
        with self._lock:
            pace = self._pace.get(hop.address)
            if pace is None:
                pace = self._pace[hop.address] = PeerPace(PACE_WEIGHT)
            pace.add(seconds / max(hop.end - hop.start, 1))

    def slowdown(self, address: str) -> float:
        """How many times slower the peer at `address` answers now than it normally did, as this
        client measured it from real steps (1.0 when not measured)."""
        with self._lock:
            pace = self._pace.get(address)
            return pace.slowdown if pace is not None else 1.0

    def _usable(self, peers: Sequence[PeerView]) -> list[PeerView]:
        """The peers not avoided, each one's throughput divided by how much slower it got than this
        client normally saw it (its own network and overhead cancel out of that ratio; under
        SLOWDOWN_NOTICED it is noise of a shared machine)."""
        now = time.monotonic()
        with self._lock:
            avoided = {p for p, until in self._avoid.items() if until > now}
        usable = []
        for p in peers:
            if p.peer_id in avoided:
                continue
            slowdown = self.slowdown(p.address)
            if slowdown >= SLOWDOWN_NOTICED:
                p = replace(p, throughput=(p.throughput or 1 / UNKNOWN_BLOCK_SECONDS) / slowdown)
            usable.append(p)
        return usable

    def replacement(self, start: int, end: int, refresh: bool = False) -> list[Hop]:
        """A chain of peers not avoided for blocks [start, end), or RouteError naming the gap."""
        known = self.candidates(refresh)
        return best_chain(self._usable(known.peers), known.num_layers, start, end)

    def usable_peers(self) -> tuple[str, int, list[PeerView]]:
        """(model id, number of layers, the known peers not avoided now): what a spot-check verifies with."""
        known = self.candidates()
        return known.model_id, known.num_layers, self._usable(known.peers)

    def recovered(self, note: str) -> None:
        """A session replaced a failed hop (`note` says how): kept in `recoveries`."""
        self.recoveries.append(note)

    def spare(self, hop: Hop) -> Hop | None:
        """The nearest other peer (not avoided) serving all of `hop`'s layers; None when none is known."""
        known = self.candidates()
        peers = [
            p
            for p in self._usable(known.peers)
            if p.start <= hop.start and hop.end <= p.end and p.address != hop.address and p.peer_id != hop.peer
        ]
        if not peers:
            return None
        best = min(peers, key=lambda p: p.rtt_s)
        return Hop(best.address, hop.start, hop.end, best.peer_id)

    def push_address(self, hop: Hop) -> str | None:
        """Where another peer pushes to `hop`: its address with the fingerprint pinned (the one
        trusted on first use when none was given); for a peer behind NAT, which our tunnel
        reaches, its peer id ("p2p:<peer-id>#fingerprint"): the pushing daemon tunnels to it
        itself (a server that cannot says so, and we relay that link)."""
        target, pin = split_pin(hop.address)
        pid = self.finder.tunnelled_peer(hop.address)
        if pid is not None:  # the record's pin (none only with insecure_lan)
            return p2p_address(pid, pin) if pin or self.config.insecure_lan else None
        pin = pin or self._channels.first_seen(hop.address)
        return f"{target}#{pin}" if pin else (target if self.config.insecure_lan else None)

    def route(self) -> tuple[str, list[Hop]]:
        """Find what the peers serve and plan a chain; returns (model id, hops)."""
        known = self.candidates(refresh=True)
        try:
            hops = best_chain(self._usable(known.peers), known.num_layers)
        except RouteError as e:
            if not known.peers and known.refused:  # every peer that answered speaks another protocol
                raise known.refused[0] from None
            raise known.explain(e) from None
        if self.config.hole_punch_wait_s > 0:
            self.finder.wait_for_hole_punch(hops)
        return known.model_id, hops

    def session(
        self, max_length: int, route: tuple[str, list[Hop]] | None = None, push: bool | None = None
    ) -> InferenceSession:
        """Open a session on every hop of `route` (default: a route planned now); `push` (default:
        the config's) has each hop push its output straight to the next."""
        model_id, hops = route or self.route()
        return InferenceSession(self, hops, model_id, max_length, push)

    # -- generation -------------------------------------------------------------------------

    @property
    def text(self) -> TextCodec:
        """The tokenizer and chat template: the model folder's, else the swarm's (fetched once
        from a peer serving the model, then cached per model id: node.client.tokenizer)."""
        with self._text_lock:
            if self._text is None:
                from node.client.text import TextCodec
                from node.client.tokenizer import swarm_tokenizer
                from node.textfiles import cache_root

                known = self.candidates()
                peers = sorted(known.peers, key=lambda p: p.rtt_s)  # nearest first
                root = self.config.tokenizer_cache or cache_root()
                timeout_s = self.config.info_timeout_s
                folder = swarm_tokenizer(known.model_id, [p.address for p in peers], self.channel, root, timeout_s)
                self._text = TextCodec(folder)
            return self._text

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        *,
        sampling: Sampling | None = None,
        stop_at_eos: bool = True,
        chat: bool = False,
        route: tuple[str, list[Hop]] | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids as they are produced (through `route`, or one planned now)."""
        sampling = sampling or Sampling()
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if isinstance(prompt, str):
            ids = self.text.encode(self.text.chat_prompt(prompt)) if chat else self.text.encode(prompt, raw=True)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ConfigError("the prompt is empty")
        eos = set(self._text.eos_token_ids) if (stop_at_eos and self._text) else set()
        with self.session(len(ids) + max_new_tokens, route) as session:
            session.check = self._spot.plan(len(ids), max_new_tokens)
            chunk = self.config.prefill_chunk
            for i in range(0, len(ids), chunk):
                logits = session.step(ids[i : i + chunk])
            token = sample(logits, sampling, 0)
            for step in range(1, max_new_tokens + 1):
                yield token
                if token in eos or step == max_new_tokens:
                    return
                token = session.next_token([token], sampling, step)  # sampled by the last hop

    def generate_text(self, prompt: str, max_new_tokens: int = 64, **kwargs: Any) -> Iterator[str]:
        """Yield decoded text pieces as tokens arrive (whole characters only)."""
        ids: list[int] = []
        shown = ""
        for token in self.generate(prompt, max_new_tokens, **kwargs):
            ids.append(token)
            text = self.text.decode(ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
                continue
            yield text[len(shown) :]
            shown = text
