"""The libp2p side of a node (trio thread): the host (`host.MeshNode`) composes one module per
protocol (`dht`, `record`, `autonat`, `relay`, `holepunch`, `tunnel`, `sync`), each with its
protocol id, a frozen config and `install`; `nat` views the three NAT protocols as one;
`bridge` is the one crossing to asyncio; `internals` holds every private py-libp2p call;
`identity`, `records` (signed peer records), `reader` (the DHT client) and `outbound` (a
daemon's own tunnels, for pushes to next hops behind NAT) complete it."""
