"""The swarm: the daemon's replica agent of the shared state, and `moemesh status`."""
