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
    PeerTimeout,
    PeerUnavailable,
    RouteError,
    peer_error,
)
from node.routing import Candidate, Hop, best_chain
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
    from node.discovery import SwarmReader
    from node.text import TextCodec
    from protocol.mesh_pb2 import PeerRecord, ShardAd

__all__ = ["Client", "ClientConfig", "Hop", "InferenceSession", "PeerInfo", "Sampling", "plan_route", "sample"]

log = logging.getLogger(__name__)
_SERVICE = "/moemesh.v1.Shard/"


@dataclass(frozen=True)
class ClientConfig:
    step_timeout_s: float = 120.0  # one step through one hop (a long prefill chunk included)
    info_timeout_s: float = 10.0
    prefill_chunk: int = 512  # prompt tokens per step
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
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
        )


def plan_route(peers: Sequence[PeerInfo], rtts: dict[str, float] | None = None) -> list[Hop]:
    """The chain of the given peers with the fewest round trips (measured RTTs when known).

    Peers may overlap; a hop runs a sub-span of its peer's span. Raises RouteError naming
    the layers that no peer serves.
    """
    if not peers:
        raise RouteError("no peer answered")
    rtts = rtts or {}
    candidates = [
        Candidate(p.address, p.address, p.start, p.end, block_seconds=0.0, rtt_seconds=rtts.get(p.address, 1e-3))
        for p in peers
    ]
    return best_chain(candidates, peers[0].num_layers)


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


class _HopStream:
    """One InferenceSession stream to one hop (sync gRPC, one step in flight)."""

    def __init__(self, client: Client, hop: Hop, model_id: str, max_length: int) -> None:
        self.hop = hop
        self._client = client
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        call = client.channel(hop.address).stream_stream(
            _SERVICE + "InferenceSession",
            request_serializer=SessionRequest.SerializeToString,
            response_deserializer=SessionResponse.FromString,
        )
        self._call = call(iter(self._requests.get, _END), wait_for_ready=False)
        self._step_ids = itertools.count()
        opened = self._exchange(
            SessionRequest(open=OpenSession(model_id=model_id, start=hop.start, end=hop.end, max_length=max_length)),
            "opened",
        )
        self.max_length = opened.opened.max_length

    def _exchange(self, request: SessionRequest, expect: str) -> SessionResponse:
        self._requests.put(request)
        future = self._client._pool.submit(next, self._call)
        try:
            response: SessionResponse = future.result(timeout=self._client.config.step_timeout_s)
        except concurrent.futures.TimeoutError:
            self._call.cancel()
            raise PeerTimeout(self.hop.address, f"no answer within {self._client.config.step_timeout_s} s") from None
        except StopIteration:
            raise PeerUnavailable(self.hop.address, "the stream ended without an answer") from None
        except grpc.RpcError as e:
            raise peer_error(self.hop.address, e) from None
        if response.WhichOneof("kind") != expect:
            raise PeerError(self.hop.address, f"expected {expect}, got {response.WhichOneof('kind')}")
        return response

    def step(self, tensor: Tensor, position: int, last_only: bool) -> Tensor:
        step = Step(step_id=next(self._step_ids), position=position, input=tensor, last_only=last_only)
        return self._exchange(SessionRequest(step=step), "result").result.output

    def close(self) -> None:
        try:
            self._exchange(SessionRequest(close=CloseSession()), "closed")
        except PeerError as e:
            log.debug("closing session on %s: %s", self.hop.address, e)
        finally:
            self._requests.put(_END)
            self._call.cancel()


class InferenceSession:
    """A generation session across a chain of hops; each hop keeps its own KV cache."""

    def __init__(self, client: Client, hops: Sequence[Hop], model_id: str, max_length: int) -> None:
        self.hops = list(hops)
        self.max_length = max_length
        self.position = 0
        self._streams: list[_HopStream] = []
        try:
            for hop in self.hops:
                self._streams.append(_HopStream(client, hop, model_id, max_length))
        except BaseException:
            self.close()
            raise

    def step(self, ids: Sequence[int], position: int | None = None, last_only: bool = True) -> np.ndarray:
        """Feed token ids at `position` (default: after the last step); return fp32 logits.

        The result is ``[V]`` when `last_only`, else ``[T, V]``.
        """
        position = self.position if position is None else position
        tensor = make_tensor("int64", (1, len(ids)), np.asarray(ids, dtype="<i8").tobytes())
        for stream in self._streams:
            tensor = stream.step(tensor, position, last_only)
        self.position = position + len(ids)
        meta = check_tensor(tensor, what="logits")
        if meta.dtype != "float32" or len(meta.shape) != 3:
            raise PeerError(self.hops[-1].address, f"expected fp32 logits [1, T, V], got {meta.dtype} {meta.shape}")
        logits = np.frombuffer(tensor.data, dtype="<f4").reshape(meta.shape)[0]
        return logits[-1] if last_only else logits

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams.clear()

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
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="moemesh-client")
        self._text: TextCodec | None = None
        if model_folder is not None:
            from node.text import TextCodec

            self._text = TextCodec(Path(model_folder).expanduser())

    # -- plumbing ---------------------------------------------------------------------------

    def channel(self, address: str) -> grpc.Channel:
        if address in self._tunnelled:
            path = self.paths()[self._tunnelled[address]]
            if address in self._channels and path != self._channel_paths[address]:
                # The path changed (a hole punch): new connections take it; the old channel lives on
                # for the sessions still using it.
                self._old_channels.append(self._channels.pop(address))
            self._channel_paths[address] = path
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(
                address, options=grpc_options(self.config.max_message_bytes)
            )
        return self._channels[address]

    def close(self) -> None:
        for channel in [*self._channels.values(), *self._old_channels]:
            channel.close()
        self._channels.clear()
        self._old_channels.clear()
        if self._reader is not None:
            self._reader.__exit__(None, None, None)
            self._reader = None
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
        if self._reader is None:
            return {}
        return {pid: self._reader.path(pid) for pid in set(self._tunnelled.values())}

    def _swarm(self) -> SwarmReader:
        if self._reader is None:
            from node.discovery import SwarmReader

            # A DHT lookup of a NAT'd peer's record takes ~20 s in py-libp2p 0.8.1 (it cannot be asked
            # directly): allow for it.
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
        from node.nat import RELAYED

        deadline = time.monotonic() + self.config.hole_punch_wait_s
        tunnelled = {h.peer for h in hops if h.address in self._tunnelled}
        while tunnelled and time.monotonic() < deadline:
            if all(path != RELAYED for pid, path in self.paths().items() if pid in tunnelled):
                return
            time.sleep(0.5)

    def _route_from_swarm(self) -> tuple[str, list[Hop]]:
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
        hops = best_chain(candidates, num_layers)
        if self.config.hole_punch_wait_s > 0:
            self._wait_for_hole_punch(hops)
        return model_id, hops

    def route(self) -> tuple[str, list[Hop]]:
        """Find what the peers serve and plan a chain; returns (model id, hops)."""
        if self.bootstrap:
            return self._route_from_swarm()
        answers = self._measure(self.peers)
        infos = [info for info, _ in answers.values()]
        rtts = {address: rtt for address, (_, rtt) in answers.items()}
        failures = [f"{address} did not answer" for address in self.peers if address not in answers]
        models = {i.model_id for i in infos}
        model_id = self.model_id
        if model_id is None:
            if len(models) > 1:
                raise ConfigError(f"the peers serve different models ({', '.join(sorted(models))}): pass model_id")
            model_id = next(iter(models), "")
        infos = [i for i in infos if i.model_id == model_id]
        try:
            return model_id, plan_route(infos, rtts)
        except RouteError as e:
            detail = f"; unreachable: {'; '.join(failures)}" if failures else ""
            raise RouteError(f"{e}{detail}", e.missing) from None

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
