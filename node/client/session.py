"""A generation session across a chain of hops, and its failover.

The session keeps every step's input to every hop. When a hop fails (killed, reset, hung, an
error status, told to move by a peer shutting down), the layers it ran are routed to other
peers, its past inputs are replayed to them, step by step as it got them, to rebuild the
same KV cache, and the step goes on. So a failure changes no token.

With push (the default, `ClientConfig.push`), a step goes to the first hop with the rest of
the chain as its route: each hop pushes its output straight to the next (`node.serve.push`)
and also answers the client with it, off the critical path: that copy is the next hop's
recorded input. The last hop's logits come to the client directly, so a token costs hops + 1
network legs instead of 2 per hop. A failed hop is replaced as above, and the step goes on
from it, the client injecting the failed hop's recorded input into the replacement with the
rest of the route. A link a hop could not push over (it said so) is relayed by the client
from then on; hops that take no push (older servers, plaintext peers without insecure_lan)
split the chain into segments the client relays between. A hop behind NAT is pushed to by its
peer id: the hop before it tunnels to it over its own libp2p host (`node.mesh.outbound`), or,
a plain `moemesh serve` having none, says it cannot push and the client relays that link.

What the session needs from outside is the narrow `SessionHost` (node.client.host: routes
for a span, an avoid list, channels, the config, where recoveries are told); `Client` is one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from node.client.host import SessionHost, StepCheck, should_fail_over
from node.client.pace import HopPace, slow_hop
from node.client.sampling import Sampling, logits_of, sample, sample_request, token_of
from node.client.spare import WarmSpare
from node.client.stream import HopStream, StepRecord
from node.errors import (
    PeerError,
    PeerSlow,
    PeerUnavailable,
    PushNotDelivered,
    RouteError,
    SessionClosed,
)
from node.plan.routing import Hop
from protocol import make_tensor
from protocol.shard_pb2 import PushTarget, Sample, Tensor

__all__ = ["InferenceSession"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Ran:
    """What one step through a segment of hops gave: each hop's output in order, up to the one
    that failed (with `error`), if one did."""

    outputs: list[Tensor]
    error: PeerError | None = None


class InferenceSession:
    """A generation session across a chain of hops; each hop keeps its own KV cache."""

    def __init__(
        self, host: SessionHost, hops: Sequence[Hop], model_id: str, max_length: int, push: bool | None = None
    ) -> None:
        self.push = host.config.push if push is None else push  # hops push to the next (else the client relays)
        self._step_ids = itertools.count()  # one counter for every hop: a pushed step keeps its id along the chain
        self._relayed: set[tuple[str, str]] = set()  # links (from, to) a hop could not push over
        self.hops = list(hops)
        self.max_length = max_length
        self.model_id = model_id
        self.position = 0
        self._vocab_size = 0  # of the model, once a last hop's logits have shown it (a sampled token must be in it)
        self.recoveries: list[str] = []  # what failed and where its layers went, in order
        self.check: StepCheck | None = None
        self._host = host
        self._closed = False
        self._streams: list[HopStream | None] = [None] * len(self.hops)
        self._history: list[list[StepRecord]] = [[] for _ in self.hops]
        self._spares: list[WarmSpare | None] = [None] * len(self.hops)
        self._paces = [HopPace(host.config.slow_steps) for _ in self.hops]
        try:
            for k in range(len(self.hops)):
                self._open(k)
            if host.config.warm_spares:
                self._spares = [self._open_spare(hop) for hop in self.hops]
        except BaseException:
            self.close()
            raise

    def _connect(self, hop: Hop) -> HopStream:
        channel = self._host.channel(hop.address)
        config = self._host.config
        push = self.push and self._host.push_address(hop) is not None
        return HopStream(
            channel,
            hop,
            self.model_id,
            self.max_length,
            config,
            step_ids=self._step_ids,
            push=push,
            compact_logits=True,
        )

    def _open_spare(self, hop: Hop) -> WarmSpare | None:
        spare = self._host.spare(hop)
        if spare is None:
            log.info("no warm spare for layers %d:%d: no other peer serves them", hop.start, hop.end)
            return None
        try:
            return WarmSpare(self._connect(spare))
        except PeerError as e:
            log.info("no warm spare for layers %d:%d: %s", hop.start, hop.end, e)
            return None

    def _open(self, k: int) -> HopStream:
        stream = self._streams[k]
        while stream is None:
            try:
                stream = self._streams[k] = self._connect(self.hops[k])
            except PeerError as e:
                if not should_fail_over(e):
                    raise
                self._recover(k, e)
                stream = self._streams[k]
        return stream

    def step(self, ids: Sequence[int], position: int | None = None, last_only: bool = True) -> np.ndarray:
        """Feed token ids at `position` (default: after the last step); return fp32 logits.

        The result is ``[V]`` when `last_only`, else ``[T, V]``.
        """
        logits = logits_of(self._advance(ids, position, last_only), self.hops[-1].address)
        self._vocab_size = logits.shape[-1]
        return logits[-1] if last_only else logits

    def next_token(self, ids: Sequence[int], sampling: Sampling, step: int) -> int:
        """Feed token ids after the last step and return draw `step` of `sampling` from the
        logits of the last one: `sample(self.step(ids), sampling, step)`, the same token. A decode
        step is sampled by the last hop, which then sends the token id instead of the logits
        (`ClientConfig.sample_at_last_hop`; not while spot-checks need the logits, nor before
        this session has seen the vocabulary's size); a hop that answers logits anyway is sampled here."""
        config = self._host.config
        ask = config.sample_at_last_hop and self.check is None and self._vocab_size > 0 and len(ids) == 1
        out = self._advance(ids, None, True, sample_request(sampling, step) if ask else None)
        if ask and (token := token_of(out, self.hops[-1].address, self._vocab_size)) is not None:
            return token
        logits = logits_of(out, self.hops[-1].address)
        self._vocab_size = logits.shape[-1]
        return sample(logits[-1], sampling, step)

    def _advance(self, ids: Sequence[int], position: int | None, last_only: bool, draw: Sample | None = None) -> Tensor:
        """Run one step through the whole chain, failing over where a hop fails; the last hop's
        output (logits, or with `draw` the token id it sampled, checked here)."""
        if self._closed:
            raise SessionClosed("the session is closed")
        position = self.position if position is None else position
        for history in self._history:  # a step at an earlier position rolls every cache back
            while history and history[-1].position >= position:
                history.pop()
        tensor = make_tensor("int64", (1, len(ids)), np.asarray(ids, dtype="<i8").tobytes())
        k = 0
        while k < len(self.hops):
            self._open(k)
            last = self._segment_end(k)
            ran = self._run_segment(k, last, tensor, position, last_only, draw)
            error = ran.error
            for out in ran.outputs:  # every hop that ran it: its input is its history
                record = StepRecord(position, tensor, last_only)
                try:
                    if draw is not None and k == len(self.hops) - 1:  # a lie about the token fails over too
                        token_of(out, self.hops[k].address, self._vocab_size)
                    if self.check is not None:  # a spot-check; a liar fails over like a dead hop
                        self.check(self.hops[k], self._history[k], record, out)
                except PeerError as e:  # hops after it computed on its output: the replay rolls them back
                    error = e
                    break
                self._history[k].append(record)
                tensor, k = out, k + 1
            if error is not None:  # hop k failed: the same input to its replacement, then on
                if not should_fail_over(error):
                    raise error
                self._recover(k, error)
        self.position = position + len(ids)
        for spare, history in zip(self._spares, self._history, strict=True):
            if spare is not None:  # off the critical path: the chain's answer is in already
                spare.feed(history[-1])
        if len(ids) == 1:
            self._move_off_slow_hops()
        return tensor

    def _pushes(self, k: int) -> bool:
        """Whether hop k pushes its output straight to hop k + 1 (both opened, both take push)."""
        a, b = self._streams[k], self._streams[k + 1]
        return (
            a is not None
            and b is not None
            and bool(a.push_token and b.push_token)
            and (self.hops[k].address, self.hops[k + 1].address) not in self._relayed
        )

    def _segment_end(self, k: int) -> int:
        """The last hop of the chain of pushes that starts at hop k (k itself when it pushes to none)."""
        last = k
        while self.push and last + 1 < len(self.hops):
            self._open(last + 1)
            if not self._pushes(last):
                break
            last += 1
        return last

    def _target(self, j: int) -> PushTarget:
        stream = self._streams[j]
        address = self._host.push_address(self.hops[j])
        assert stream is not None and address is not None  # _pushes checked both
        return PushTarget(address=address, session_id=stream.session_id, token=stream.push_token)

    def _run_segment(
        self, k: int, last: int, tensor: Tensor, position: int, last_only: bool, draw: Sample | None = None
    ) -> _Ran:
        """Run one step through hops k..last, pushed from hop to hop: their outputs in order (each
        the next one's input), up to the first that failed. `draw` goes with it when the segment
        ends at the chain's last hop."""
        route = [self._target(j) for j in range(k + 1, last + 1)]
        draw = draw if last == len(self.hops) - 1 else None
        outputs: list[Tensor] = []
        stream = self._streams[k]
        assert stream is not None
        step_id, timeout = stream.send(tensor, position, last_only, route, draw)
        since = time.perf_counter()
        for j in range(k, last + 1):
            stream, upstream = self._streams[j], self._streams[j - 1] if j > k else None
            assert stream is not None
            try:
                try:
                    out = stream.result(step_id, timeout, upstream)
                except PushNotDelivered as e:  # relay it ourselves, over this link from now on
                    log.info("relaying the link to %s from now on: %s", stream.hop.address, e)
                    self._relayed.add((self.hops[j - 1].address, self.hops[j].address))
                    step_id, timeout = stream.send(outputs[-1], position, last_only, route[j - k :], draw)
                    out = stream.result(step_id, timeout)
            except PeerError as e:
                return _Ran(outputs, e)
            outputs.append(out)
            if len(tensor.shape) > 1 and tensor.shape[1] == 1:  # a decode step: the hop's pace
                now = time.perf_counter()
                self._paces[j].add(now - since)
                self._host.observed(self.hops[j], now - since)
                since = now
        return _Ran(outputs)

    def _move_off_slow_hops(self) -> None:
        """Move a hop that stayed several times slower than it was to another peer, when one serves its layers."""
        config = self._host.config
        slow = slow_hop(self._paces, config.slow_factor, config.slow_margin_s)
        if slow is not None and self._host.spare(self.hops[slow[0]]) is not None:
            k, ratio = slow
            self._recover(k, PeerSlow(self.hops[k].address, f"{ratio:.1f}x slower than at the session's start"))

    # -- failover ----------------------------------------------------------------------------

    def _recover(self, k: int, error: PeerError) -> None:
        """Replace hop k by a chain of other peers holding the same KV cache, or raise.

        Each attempt asks for a route around the avoided peers (the swarm is asked again
        after the first), opens a stream on every new hop and replays hop k's past inputs
        through them. A route that cannot be found raises RouteError when it was the last
        try; a peer that fails the replay is avoided too and the next attempt goes around it.
        """
        failed = self.hops[k]
        self._host.avoid(failed, error)
        self._drop(k, goodbye=not isinstance(error, PeerSlow))  # a slow peer would make us wait for its goodbye
        if self._promote(k, error):
            return
        problems = [f"{failed.address}: {error}"]
        no_route: RouteError | None = None
        for attempt in self._attempts():
            try:
                hops = self._host.replacement(failed.start, failed.end, refresh=attempt > 0)
            except RouteError as e:
                no_route = e
                problems.append(str(e))
                continue
            no_route = None
            try:
                streams, histories = self._rebuild(hops, self._history[k])
            except PeerError as e:
                if not should_fail_over(e):
                    raise
                self._avoid_the_one_of(hops, e)
                problems.append(str(e))
                continue
            self._splice(k, hops, streams, histories)
            self._tell(
                f"layers {failed.start}:{failed.end} moved from {failed.address} ({error})"
                f" to {', '.join(f'{h.address} [{h.start}:{h.end}]' for h in hops)},"
                f" {len(histories[0])} steps replayed"
            )
            return
        if no_route is not None:
            raise RouteError(
                f"layers {failed.start}:{failed.end} failed on {failed.address} ({error}) and {no_route}",
                no_route.missing,
            )
        raise PeerUnavailable(
            failed.address, f"gave up on layers {failed.start}:{failed.end}: " + "; ".join(problems[-4:])
        )

    def _attempts(self) -> Iterator[int]:
        """Attempt numbers, with exponential backoff between them, while the retries and the deadline last."""
        config = self._host.config
        deadline = time.monotonic() + config.recovery_deadline_s
        for attempt in range(config.max_retries):
            if attempt and time.monotonic() <= deadline:
                time.sleep(min(config.retry_backoff_s * 2 ** (attempt - 1), 5.0))
            if time.monotonic() > deadline:
                return
            yield attempt

    def _rebuild(self, hops: Sequence[Hop], inputs: list[StepRecord]) -> tuple[list[HopStream], list[list[StepRecord]]]:
        """Open `hops` and replay `inputs` through them in turn; each hop's inputs are its history.

        Closes what it opened when a hop fails (PeerError)."""
        streams: list[HopStream] = []
        histories: list[list[StepRecord]] = []
        try:
            for hop in hops:
                streams.append(self._connect(hop))
            for stream in streams:
                histories.append(inputs)
                outputs = stream.replay(inputs)
                inputs = [StepRecord(r.position, out, r.last_only) for r, out in zip(inputs, outputs, strict=True)]
        except PeerError:
            for stream in streams:
                stream.close()
            raise
        return streams, histories

    def _promote(self, k: int, error: PeerError) -> bool:
        """Hand hop k to its warm spare once it has answered every step it owes; False without one."""
        spare, self._spares[k] = self._spares[k], None
        if spare is None:
            return False
        try:
            stream = spare.catch_up()
        except PeerError as e:
            log.info("the warm spare of layers %d:%d failed too: %s", self.hops[k].start, self.hops[k].end, e)
            spare.close()
            return False
        failed = self.hops[k]
        self.hops[k], self._streams[k] = stream.hop, stream
        self._paces[k] = HopPace(self._host.config.slow_steps)
        self._tell(
            f"layers {failed.start}:{failed.end} moved from {failed.address} ({error})"
            f" to {stream.hop.address} [{stream.hop.start}:{stream.hop.end}], its warm spare, 0 steps replayed"
        )
        return True

    def _avoid_the_one_of(self, hops: Sequence[Hop], error: PeerError) -> None:
        bad = next((h for h in hops if h.address == error.address), None)
        if bad is not None:
            self._host.avoid(bad, error)

    def _drop(self, k: int, goodbye: bool = True) -> None:
        stream, self._streams[k] = self._streams[k], None
        if stream is not None:
            stream.close(goodbye)

    def _splice(
        self, k: int, hops: Sequence[Hop], streams: Sequence[HopStream], histories: Sequence[list[StepRecord]]
    ) -> None:
        """Hop k becomes the chain `hops`, with their open streams and the histories they replayed."""
        self.hops[k : k + 1] = hops
        self._streams[k : k + 1] = list(streams)
        self._history[k : k + 1] = histories
        old = self._spares[k]
        if old is not None:
            old.close()
        self._spares[k : k + 1] = [None] * len(hops)
        self._paces[k : k + 1] = [HopPace(self._host.config.slow_steps) for _ in hops]

    def _tell(self, note: str) -> None:
        log.info("%s", note)
        self.recoveries.append(note)
        self._host.recovered(note)

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        for stream in [*self._streams, *(s.stream for s in self._spares if s is not None)]:
            if stream is not None:
                stream.close()
        self._streams = [None] * len(self.hops)
        self._spares = [None] * len(self.hops)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
