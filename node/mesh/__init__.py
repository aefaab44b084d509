"""The libp2p side of a node: host, bridge, identity, records, NAT, tunnel, sync, DHT reader (trio thread)."""
