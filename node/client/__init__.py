"""The client SDK: find a chain of peers, open a session along it, stream tokens (no torch)."""

from node.client.client import Client, ClientConfig, InferenceSession, PeerInfo, Sampling, plan_route, sample
from node.plan.routing import Hop

__all__ = ["Client", "ClientConfig", "Hop", "InferenceSession", "PeerInfo", "Sampling", "plan_route", "sample"]
