"""Placement as pure functions of the swarm view: uncovered blocks first, then the weakest window;
moves only for a large gain, and every peer ranks the would-be movers alike."""

from __future__ import annotations

import math

import pytest

from node.plan.peers import PeerView
from node.plan.placement import block_capacity, bottleneck, choose_span, mover_rank, propose_move


def test_a_peer_shares_its_throughput_among_its_blocks() -> None:
    assert block_capacity([PeerView("a", 0, 2, 10.0), PeerView("b", 1, 4, 30.0)], 4) == [5.0, 15.0, 10.0, 10.0]
    assert bottleneck(block_capacity([PeerView("a", 0, 2, 10.0)], 4)) == 0.0


def test_an_empty_swarm_is_covered_from_the_first_block_then_the_uncovered_ones() -> None:
    servers: list[PeerView] = []
    spans = []
    for name in "abc":
        span = choose_span(block_capacity(servers, 6), 2)
        servers.append(PeerView(name, *span, 10.0))
        spans.append(span)
    assert spans == [(0, 2), (2, 4), (4, 6)]


def test_blocks_nobody_serves_win_over_weak_ones() -> None:
    capacity = [1.0, 0.5, 0.5, 0.0, 9.0]
    assert choose_span(capacity, 2) == (2, 4)  # (0.0, 0.5) beats (0.5, 0.5)
    assert choose_span(capacity, 1) == (3, 4)
    assert choose_span(capacity, 10) == (0, 5)  # a peer that holds more than the model takes all of it


def test_the_weakest_window_gets_the_new_capacity() -> None:
    capacity = [9.0, 2.0, 1.0, 3.0, 1.5, 8.0]
    assert choose_span(capacity, 3) == (2, 5)  # sorted (1.0, 1.5, 3.0) is the weakest triple


def test_no_move_when_the_gain_is_small_and_a_move_when_a_block_is_left_uncovered() -> None:
    balanced = [PeerView("a", 0, 2, 10.0), PeerView("b", 2, 4, 10.0), PeerView("c", 0, 2, 11.0)]
    assert all(propose_move(balanced, s.peer_id, 4) is None for s in balanced)
    hole = [PeerView("a", 0, 2, 10.0), PeerView("c", 0, 2, 10.0)]  # b died: blocks 2-3 uncovered
    move = propose_move(hole, "c", 4)
    assert move is not None and (move.start, move.end) == (2, 4) and move.gain == math.inf
    assert propose_move(hole, "nobody", 4) is None


def test_hysteresis_needs_more_than_the_factor() -> None:
    servers = [PeerView("a", 0, 2, 10.0), PeerView("b", 0, 2, 10.0), PeerView("c", 2, 4, 8.0)]
    assert block_capacity(servers, 4) == [10.0, 10.0, 4.0, 4.0]
    # b moving to 2:4 makes it [5, 5, 9, 9]: the bottleneck goes from 4 to 5, x1.25.
    move = propose_move(servers, "b", 4, factor=1.2)
    assert move is not None and (move.start, move.end) == (2, 4) and move.gain == pytest.approx(1.25)
    assert propose_move(servers, "b", 4, factor=1.25) is None


@pytest.mark.parametrize("order", [0, 1, 2])
def test_every_peer_ranks_the_would_be_movers_alike(order: int) -> None:
    servers = [
        PeerView("a", 0, 2, 10.0),
        PeerView("b", 0, 2, 10.0),
        PeerView("c", 0, 2, 10.0),
        PeerView("d", 0, 1, 10.0),
    ]
    servers = servers[order:] + servers[:order]  # the view's order must not matter
    ranks = {s.peer_id: mover_rank(servers, s.peer_id, 4) for s in servers}
    movers = sorted(r for r in ranks.values() if r is not None)
    assert movers == list(range(len(movers))) and len(movers) >= 2  # one first mover, the others wait their turn
