"""The host composes our protocols: nothing is registered when a `MeshNode` is made (on the
caller's thread); `serve` installs each one on the trio thread, extra protocols included."""

from __future__ import annotations

from functools import partial

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from node.mesh.autonat import AUTONAT_PROTOCOL
from node.mesh.dht import KAD_PROTOCOL
from node.mesh.holepunch import DCUTR_PROTOCOL
from node.mesh.host import MeshConfig, MeshNode
from node.mesh.nat import NatConfig
from node.mesh.record import RECORD_PROTOCOL
from node.mesh.relay import HOP_PROTOCOL, STOP_PROTOCOL
from node.mesh.tunnel import TUNNEL_PROTOCOL, TunnelConfig, TunnelServer, install_server
from protocol.mesh_pb2 import Reachability

OURS = {KAD_PROTOCOL, RECORD_PROTOCOL, AUTONAT_PROTOCOL, DCUTR_PROTOCOL, STOP_PROTOCOL, TUNNEL_PROTOCOL}


def test_serve_installs_every_protocol_on_the_trio_thread() -> None:
    async def main() -> None:
        node = MeshNode(
            create_new_key_pair(),
            MeshConfig(),
            NatConfig(),
            protocols=[partial(install_server, config=TunnelConfig(), target=lambda: None)],
        )
        assert not OURS & set(node.host.get_mux().get_protocols())
        assert node.nat is None
        async with trio.open_nursery() as nursery:
            await nursery.start(node.serve)
            registered = set(node.host.get_mux().get_protocols())
            assert registered >= OURS, OURS - registered
            assert HOP_PROTOCOL not in registered  # nobody relays unless asked and found public
            assert [type(p) for p in node.installed] == [TunnelServer]
            state = await node.nat_state()
            assert state.reachability == Reachability.REACHABILITY_UNKNOWN and not state.relay
            nursery.cancel_scope.cancel()

    trio.run(main)
