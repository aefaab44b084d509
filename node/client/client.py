"""The client SDK: find a chain of peers covering every layer, then stream generated tokens.

    with Client(["127.0.0.1:7001", "127.0.0.1:7002"], model_folder="~/model") as client:
        for piece in client.generate_text("What is a mixture of experts?", max_new_tokens=64):
            print(piece, end="", flush=True)

Imports no torch: hidden states are relayed between hops as the bytes they arrived as,
and only the last hop's fp32 logits are decoded (with numpy) to pick the next token.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from node.errors import (
    ConfigError,
    MoemeshError,
    PeerError,
    PeerRefused,
    PeerTimeout,
    PeerUnavailable,
    RouteError,
    SessionClosed,
    peer_error,
)
from node.plan.routing import Candidate, Hop, best_chain
from protocol import DEFAULT_MAX_MESSAGE_BYTES, check_tensor, grpc_options, make_tensor
from protocol.shard_pb2 import (
    CloseSession,
    InfoRequest,
    InfoResponse,
    OpenSession,
    SessionRequest,
    SessionResponse,
    Step,
    Tensor,
)

if TYPE_CHECKING:
    from node.client.text import TextCodec
    from node.mesh.reader import SwarmReader
    from protocol.mesh_pb2 import PeerRecord, ShardAd

__all__ = ["Client", "ClientConfig", "Hop", "InferenceSession", "PeerInfo", "Sampling", "plan_route", "sample"]

log = logging.getLogger(__name__)
_SERVICE = "/moemesh.v1.Shard/"


@dataclass(frozen=True)
class ClientConfig:
    step_timeout_s: float = 120.0  # one prefill chunk through one hop
    decode_timeout_s: float = 30.0  # one token through one hop: longer means the peer hangs
    info_timeout_s: float = 10.0  # Info, and opening a session
    prefill_chunk: int = 512  # prompt tokens per step
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_retries: int = 5  # attempts to replace one failed hop
    retry_backoff_s: float = 0.25  # wait before the 2nd attempt; doubles each time (at most 5 s)
    recovery_deadline_s: float = 120.0  # time to replace one failed hop
    avoid_s: float = 60.0  # a peer that failed is left out of routes this long
    hole_punch_wait_s: float = 0.0  # after routing through a relay, wait this long for a direct path


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; else temperature + nucleus (top-p) sampling with a seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class PeerInfo:
    address: str
    model_id: str
    model_name: str
    start: int
    end: int
    num_layers: int
    vocab_size: int
    max_length: int
    version: str
    active_sessions: int = 0
    draining: bool = False
    kv_free_bytes: int = 0
    batched_steps: int = 0  # decode steps it ran batched with other sessions' since it started

    @classmethod
    def from_response(cls, address: str, r: InfoResponse) -> PeerInfo:
        return cls(
            address,
            r.model_id,
            r.model_name,
            r.start,
            r.end,
            r.num_layers,
            r.vocab_size,
            r.capacity.max_length,
            r.version,
            r.capacity.active_sessions,
            r.capacity.draining,
            r.capacity.kv_free_bytes,
            r.capacity.batched_steps,
        )


def plan_route(peers: Sequence[PeerInfo], rtts: dict[str, float] | None = None) -> list[Hop]:
    """The chain of the given peers with the fewest round trips (measured RTTs when known).

    Peers may overlap; a hop runs a sub-span of its peer's span. Raises RouteError naming
    the layers that no peer serves.
    """
    if not peers:
        raise RouteError("no peer answered")
    return best_chain(_peer_candidates(peers, rtts or {}), peers[0].num_layers)


def _peer_candidates(peers: Sequence[PeerInfo], rtts: dict[str, float]) -> list[Candidate]:
    """Peers given by address: keyed by it; compute time unknown, so round trips decide."""
    return [
        Candidate(
            p.address, p.address, p.start, p.end, block_seconds=0.0, rtt_seconds=max(rtts.get(p.address, 0), 1e-3)
        )
        for p in peers
    ]


def sample(logits: np.ndarray, sampling: Sampling, step: int) -> int:
    """Pick the next token from fp32 logits [V]; deterministic for a given (seed, step)."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    rng = np.random.default_rng([sampling.seed or 0, step])
    z = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if sampling.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]
        kept = probs[keep] / probs[keep].sum()
        return int(keep[rng.choice(len(keep), p=kept)])
    return int(rng.choice(len(probs), p=probs))


_END = object()

# Statuses after which the step is retried on another peer: the peer failed, is leaving, is
# full, or lost the session. Others (a bad argument, past max length) would fail anywhere.
_FAILOVER = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def _should_fail_over(error: PeerError) -> bool:
    return not isinstance(error, PeerRefused) or error.code in _FAILOVER


class _HopStream:
    """One InferenceSession stream to one hop: sync gRPC, answers read by a thread of its own
    so that every step waits with a timeout."""

    def __init__(self, client: Client, hop: Hop, model_id: str, max_length: int) -> None:
        self.hop = hop
        self._config = client.config
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._broken: PeerError | None = None
        call = client.channel(hop.address).stream_stream(
            _SERVICE + "InferenceSession",
            request_serializer=SessionRequest.SerializeToString,
            response_deserializer=SessionResponse.FromString,
        )
        self._call = call(iter(self._requests.get, _END), wait_for_ready=False)
        threading.Thread(target=self._read, name=f"moemesh-hop-{hop.address}", daemon=True).start()
        self._step_ids = itertools.count()
        request = OpenSession(model_id=model_id, start=hop.start, end=hop.end, max_length=max_length)
        self._requests.put(SessionRequest(open=request))
        self.max_length = self._answer("opened", self._config.info_timeout_s).opened.max_length

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(_END)
        except grpc.RpcError as e:  # the call itself is the error
            self._responses.put(e)

    def _answer(self, expect: str, timeout: float) -> SessionResponse:
        if self._broken is not None:
            raise self._broken
        try:
            response = self._responses.get(timeout=timeout)
        except queue.Empty:
            self._call.cancel()
            self._broken = PeerTimeout(self.hop.address, f"no answer within {timeout:g} s")
            raise self._broken from None
        if response is _END:
            self._broken = PeerUnavailable(self.hop.address, "the stream ended without an answer")
        elif isinstance(response, grpc.RpcError):
            self._broken = peer_error(self.hop.address, response)
        elif response.WhichOneof("kind") != expect:
            self._broken = PeerError(self.hop.address, f"expected {expect}, got {response.WhichOneof('kind')}")
        if self._broken is not None:
            raise self._broken
        return response  # type: ignore[no-any-return]

    def _send(self, tensor: Tensor, position: int, last_only: bool) -> float:
        step = Step(step_id=next(self._step_ids), position=position, input=tensor, last_only=last_only)
        self._requests.put(SessionRequest(step=step))
        tokens = tensor.shape[1] if len(tensor.shape) > 1 else 1
        return self._config.decode_timeout_s if tokens == 1 else self._config.step_timeout_s

    def step(self, tensor: Tensor, position: int, last_only: bool) -> Tensor:
        return self._answer("result", self._send(tensor, position, last_only)).result.output

    def replay(self, steps: Sequence[_Record]) -> list[Tensor]:
        """Send every step at once and collect the outputs in order (one round trip, not one per
        step; the server runs a stream's steps in order)."""
        timeouts = [self._send(r.input, r.position, r.last_only) for r in steps]
        return [self._answer("result", t).result.output for t in timeouts]

    def close(self) -> None:
        if self._broken is None:
            try:
                self._requests.put(SessionRequest(close=CloseSession()))
                self._answer("closed", self._config.info_timeout_s)
            except PeerError as e:
                log.debug("closing session on %s: %s", self.hop.address, e)
        self._requests.put(_END)
        self._call.cancel()


@dataclass(frozen=True)
class _Record:
    """One step as a hop received it: enough to replay it to a replacement."""

    position: int
    input: Tensor
    last_only: bool


class InferenceSession:
    """A generation session across a chain of hops; each hop keeps its own KV cache.

    The session keeps every step's input to every hop. When a hop fails (killed, reset,
    hung, an error status, told to move by a peer shutting down), the layers it ran are
    routed to other peers, its past inputs are replayed to them, step by step as it got
    them, to rebuild the same KV cache, and the step goes on. So a failure changes no token.
    """

    def __init__(self, client: Client, hops: Sequence[Hop], model_id: str, max_length: int) -> None:
        self.hops = list(hops)
        self.max_length = max_length
        self.model_id = model_id
        self.position = 0
        self.recoveries: list[str] = []  # what failed and where its layers went, in order
        self._client = client
        self._closed = False
        self._streams: list[_HopStream | None] = [None] * len(self.hops)
        self._history: list[list[_Record]] = [[] for _ in self.hops]
        try:
            for k in range(len(self.hops)):
                self._open(k)
        except BaseException:
            self.close()
            raise

    def _open(self, k: int) -> _HopStream:
        stream = self._streams[k]
        while stream is None:
            try:
                stream = self._streams[k] = _HopStream(self._client, self.hops[k], self.model_id, self.max_length)
            except PeerError as e:
                if not _should_fail_over(e):
                    raise
                self._recover(k, e)
                stream = self._streams[k]
        return stream

    def step(self, ids: Sequence[int], position: int | None = None, last_only: bool = True) -> np.ndarray:
        """Feed token ids at `position` (default: after the last step); return fp32 logits.

        The result is ``[V]`` when `last_only`, else ``[T, V]``.
        """
        if self._closed:
            raise SessionClosed("the session is closed")
        position = self.position if position is None else position
        for history in self._history:  # a step at an earlier position rolls every cache back
            while history and history[-1].position >= position:
                history.pop()
        tensor = make_tensor("int64", (1, len(ids)), np.asarray(ids, dtype="<i8").tobytes())
        k = 0
        while k < len(self.hops):
            try:
                out = self._open(k).step(tensor, position, last_only)
            except PeerError as e:
                if not _should_fail_over(e):
                    raise
                self._recover(k, e)
                continue  # the same input, to the replacement
            self._history[k].append(_Record(position, tensor, last_only))
            tensor = out
            k += 1
        self.position = position + len(ids)
        meta = check_tensor(tensor, what="logits")
        if meta.dtype != "float32" or len(meta.shape) != 3:
            raise PeerError(self.hops[-1].address, f"expected fp32 logits [1, T, V], got {meta.dtype} {meta.shape}")
        logits = np.frombuffer(tensor.data, dtype="<f4").reshape(meta.shape)[0]
        return logits[-1] if last_only else logits

    def _recover(self, k: int, error: PeerError) -> None:
        """Replace hop k by a chain of other peers holding the same KV cache, or raise."""
        failed = self.hops[k]
        config = self._client.config
        self._client.avoid(failed, error)
        stream = self._streams[k]
        if stream is not None:
            stream.close()
            self._streams[k] = None
        deadline = time.monotonic() + config.recovery_deadline_s
        problems = [f"{failed.address}: {error}"]
        for attempt in range(config.max_retries):
            if attempt:
                time.sleep(min(config.retry_backoff_s * 2 ** (attempt - 1), 5.0))
            if time.monotonic() > deadline:
                break
            try:
                hops = self._client.replacement(failed.start, failed.end, refresh=attempt > 0)
            except RouteError as e:
                problems.append(str(e))
                if attempt + 1 == config.max_retries or time.monotonic() > deadline:
                    raise RouteError(
                        f"layers {failed.start}:{failed.end} failed on {failed.address} ({error}) and {e}", e.missing
                    ) from None
                continue
            streams: list[_HopStream] = []
            histories: list[list[_Record]] = [[] for _ in hops]
            try:
                for hop in hops:
                    streams.append(_HopStream(self._client, hop, self.model_id, self.max_length))
                inputs = self._history[k]
                for j, stream in enumerate(streams):
                    histories[j] = inputs
                    outputs = stream.replay(inputs)
                    inputs = [_Record(r.position, out, r.last_only) for r, out in zip(inputs, outputs, strict=True)]
            except PeerError as e:
                for stream in streams:
                    stream.close()
                if not _should_fail_over(e):
                    raise
                bad = next((h for h in hops if h.address == e.address), None)
                if bad is not None:
                    self._client.avoid(bad, e)
                problems.append(str(e))
                continue
            self.hops[k : k + 1] = hops
            self._streams[k : k + 1] = list(streams)
            self._history[k : k + 1] = histories
            note = (
                f"layers {failed.start}:{failed.end} moved from {failed.address} ({error})"
                f" to {', '.join(f'{h.address} [{h.start}:{h.end}]' for h in hops)},"
                f" {len(histories[0])} steps replayed"
            )
            log.info("%s", note)
            self.recoveries.append(note)
            self._client.recoveries.append(note)
            return
        raise PeerUnavailable(
            failed.address, f"gave up on layers {failed.start}:{failed.end}: " + "; ".join(problems[-4:])
        )

    def close(self) -> None:
        self._closed = True
        for stream in self._streams:
            if stream is not None:
                stream.close()
        self._streams = [None] * len(self.hops)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """Finds peers covering a model, from a list of addresses or from the swarm's DHT.

    Either `peers` ("host:port" of serving peers) or `bootstrap` (libp2p multiaddrs of any
    daemon of the swarm; the client joins the DHT as a client and reads signed records).
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
        self.peers = list(peers)
        self.bootstrap = list(bootstrap)
        self.model_id = model_id
        self.config = config or ClientConfig()
        self._channels: dict[str, grpc.Channel] = {}
        self._reader: SwarmReader | None = None  # kept open: it carries the tunnels to peers behind NAT
        self._tunnelled: dict[str, str] = {}  # loopback address of a tunnel -> peer id
        self._channel_paths: dict[str, str] = {}  # tunnel address -> the path when its channel was made
        self._old_channels: list[grpc.Channel] = []
        self._lock = threading.Lock()  # sessions of one client may run in several threads
        self._avoid: dict[str, float] = {}  # peer -> until (monotonic)
        self._known: tuple[str, int, list[Candidate]] | None = None  # (model id, layers, candidates)
        self.recoveries: list[str] = []  # every failed hop this client's sessions replaced
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="moemesh-client")
        self._text: TextCodec | None = None
        if model_folder is not None:
            from node.client.text import TextCodec

            self._text = TextCodec(Path(model_folder).expanduser())

    # -- plumbing ---------------------------------------------------------------------------

    def channel(self, address: str) -> grpc.Channel:
        reader, pid = self._reader, self._tunnelled.get(address)
        path = reader.path(pid) if reader is not None and pid is not None else ""
        with self._lock:
            if address in self._tunnelled:
                if address in self._channels and path != self._channel_paths[address]:
                    # The path changed (a hole punch): new connections take it; the old channel lives
                    # on for the sessions still using it.
                    self._old_channels.append(self._channels.pop(address))
                self._channel_paths[address] = path
            if address not in self._channels:
                self._channels[address] = grpc.insecure_channel(
                    address, options=grpc_options(self.config.max_message_bytes)
                )
            return self._channels[address]

    def close(self) -> None:
        with self._lock:
            channels = [*self._channels.values(), *self._old_channels]
            self._channels.clear()
            self._old_channels.clear()
            reader, self._reader = self._reader, None
        for channel in channels:
            channel.close()
        if reader is not None:
            reader.__exit__(None, None, None)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- discovery --------------------------------------------------------------------------

    def info(self, address: str) -> PeerInfo:
        call = self.channel(address).unary_unary(
            _SERVICE + "Info",
            request_serializer=InfoRequest.SerializeToString,
            response_deserializer=InfoResponse.FromString,
        )
        try:
            return PeerInfo.from_response(address, call(InfoRequest(), timeout=self.config.info_timeout_s))
        except grpc.RpcError as e:
            raise peer_error(address, e) from None

    def _measure(self, addresses: Sequence[str]) -> dict[str, tuple[PeerInfo, float]]:
        """Info and round-trip time of each reachable address, asked concurrently."""

        def one(address: str) -> tuple[PeerInfo, float]:
            started = time.perf_counter()
            info = self.info(address)
            return info, time.perf_counter() - started

        futures = {address: self._pool.submit(one, address) for address in dict.fromkeys(addresses)}
        answers: dict[str, tuple[PeerInfo, float]] = {}
        for address, future in futures.items():
            try:
                answers[address] = future.result()
            except PeerError as e:
                log.info("peer unavailable: %s", e)
        return answers

    def paths(self) -> dict[str, str]:
        """How this client reaches each peer behind NAT that it tunnels to: relayed or hole-punched.
        (Other peers are dialed directly over gRPC.)"""
        reader = self._reader
        if reader is None:
            return {}
        return {pid: reader.path(pid) for pid in set(self._tunnelled.values())}

    def _swarm(self) -> SwarmReader:
        with self._lock:
            if self._reader is None:
                from node.mesh.reader import SwarmReader

                # A DHT lookup of a NAT'd peer's record takes ~20 s in py-libp2p 0.8.1 (it cannot be
                # asked directly): allow for it.
                reader = SwarmReader(self.bootstrap, timeout_s=max(self.config.info_timeout_s, 30.0), traversal=True)
                self._reader = reader.__enter__()
            return self._reader

    def _address_of(self, pid: str, record: PeerRecord) -> str | None:
        """The peer's direct gRPC address, or a local tunnel to it when it is behind NAT."""
        from protocol.mesh_pb2 import Reachability

        if record.reachability != Reachability.REACHABILITY_PRIVATE:
            return record.grpc_addresses[0] if record.grpc_addresses else None
        if not record.circuit_addresses:
            log.info("ignoring %s: it is behind NAT and has no relay", pid)
            return None
        try:
            address = self._swarm().tunnel(record)
        except MoemeshError as e:
            log.info("ignoring %s: %s", pid, e)
            return None
        self._tunnelled[address] = pid
        return address

    def _wait_for_hole_punch(self, hops: Sequence[Hop]) -> None:
        from node.mesh.nat import RELAYED

        deadline = time.monotonic() + self.config.hole_punch_wait_s
        tunnelled = {h.peer for h in hops if h.address in self._tunnelled}
        while tunnelled and time.monotonic() < deadline:
            if all(path != RELAYED for pid, path in self.paths().items() if pid in tunnelled):
                return
            time.sleep(0.5)

    def _candidates_from_swarm(self) -> tuple[str, int, list[Candidate]]:
        model_id, snapshot = self._swarm().model(self.model_id)
        offers: list[tuple[str, str, ShardAd]] = []
        for pid, record in snapshot.records.items():
            if not any(ad.model_id == model_id for ad in record.shards):
                continue
            address = self._address_of(pid, record)
            if address is not None:
                offers.extend((pid, address, ad) for ad in record.shards if ad.model_id == model_id)
        answers = self._measure([address for _, address, _ in offers])
        candidates = []
        num_layers = max((ad.num_layers for _, _, ad in offers), default=0)
        for pid, address, ad in offers:
            if address not in answers:
                continue
            info, rtt = answers[address]
            if (info.model_id, info.start, info.end) != (model_id, ad.start, ad.end):
                log.info("ignoring %s: it now serves %s %d:%d", address, info.model_id, info.start, info.end)
                continue
            block_seconds = 1.0 / ad.throughput if ad.throughput > 0 else 1.0
            candidates.append(Candidate(pid, address, ad.start, ad.end, block_seconds, rtt))
        if not num_layers:
            raise RouteError(f"no live peer serves model {model_id}")
        return model_id, num_layers, candidates

    def _candidates_from_peers(self) -> tuple[str, int, list[Candidate]]:
        answers = self._measure(self.peers)
        infos = [info for info, _ in answers.values()]
        models = {i.model_id for i in infos}
        model_id = self.model_id
        if model_id is None:
            if len(models) > 1:
                raise ConfigError(f"the peers serve different models ({', '.join(sorted(models))}): pass model_id")
            model_id = next(iter(models), "")
        failures = [address for address in self.peers if address not in answers]
        if not infos:
            raise RouteError("no peer answered" + (f" (tried {', '.join(failures)})" if failures else ""))
        rtts = {address: rtt for address, (_, rtt) in answers.items()}
        candidates = _peer_candidates([i for i in infos if i.model_id == model_id], rtts)
        return model_id, max(i.num_layers for i in infos), candidates

    def candidates(self, refresh: bool = False) -> tuple[str, int, list[Candidate]]:
        """(model id, number of layers, every peer able to run some of them); asked once, then
        kept until `refresh` (a recovery that found no replacement among them asks again)."""
        with self._lock:
            known = self._known
        if known is None or refresh:
            known = self._candidates_from_swarm() if self.bootstrap else self._candidates_from_peers()
            with self._lock:
                self._known = known
        return known

    def avoid(self, hop: Hop, error: PeerError) -> None:
        """Leave the peer of `hop` out of routes for a while (it failed)."""
        log.info("avoiding %s for %g s: %s", hop.address, self.config.avoid_s, error)
        with self._lock:
            self._avoid[hop.peer or hop.address] = time.monotonic() + self.config.avoid_s

    def _usable(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        now = time.monotonic()
        with self._lock:
            return [c for c in candidates if self._avoid.get(c.peer, 0.0) <= now]

    def replacement(self, start: int, end: int, refresh: bool = False) -> list[Hop]:
        """A chain of peers not avoided for blocks [start, end), or RouteError naming the gap."""
        _, num_layers, candidates = self.candidates(refresh)
        return best_chain(self._usable(candidates), num_layers, start, end)

    def route(self) -> tuple[str, list[Hop]]:
        """Find what the peers serve and plan a chain; returns (model id, hops)."""
        model_id, num_layers, candidates = self.candidates(refresh=True)
        try:
            hops = best_chain(self._usable(candidates), num_layers)
        except RouteError as e:
            usable = {c.address for c in candidates}
            failures = [f"{a} did not answer or serves another model" for a in self.peers if a not in usable]
            if not failures:
                raise
            raise RouteError(f"{e}; unreachable: {'; '.join(failures)}", e.missing) from None
        if self.config.hole_punch_wait_s > 0:
            self._wait_for_hole_punch(hops)
        return model_id, hops

    def session(self, max_length: int, route: tuple[str, list[Hop]] | None = None) -> InferenceSession:
        """Open a session on every hop of `route` (default: a route planned now)."""
        model_id, hops = route or self.route()
        return InferenceSession(self, hops, model_id, max_length)

    # -- generation -------------------------------------------------------------------------

    @property
    def text(self) -> TextCodec:
        if self._text is None:
            raise ConfigError("a text prompt needs the model folder (its tokenizer): pass model_folder=")
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
            ids = self.text.encode(self.text.chat_prompt(prompt) if chat else prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ConfigError("the prompt is empty")
        eos = set(self._text.eos_token_ids) if (stop_at_eos and self._text) else set()
        with self.session(len(ids) + max_new_tokens, route) as session:
            chunk = self.config.prefill_chunk
            for i in range(0, len(ids), chunk):
                logits = session.step(ids[i : i + chunk])
            for step in range(max_new_tokens):
                token = sample(logits, sampling, step)
                yield token
                if token in eos or step == max_new_tokens - 1:
                    return
                logits = session.step([token])

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
