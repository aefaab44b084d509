"""The client SDK: find a chain of peers, open a session along it, stream tokens (no torch).

client.py    Client: channels, routes, generation
discovery.py PeerFinder: the peers of a model, from addresses or the swarm's records, each asked its Info
known.py     what a client knows of the peers (KnownPeers); plan_route
session.py   InferenceSession: push along the chain, failover
host.py      SessionHost: the narrow interface a session asks the client through; should_fail_over
stream.py    the Info call and one InferenceSession stream per hop
spare.py     WarmSpare: a second session of a hop kept in step, to take over with no replay
pace.py      HopPace: each hop's pace from real steps, and which hop became slow
sampling.py  Sampling and sample
config.py    ClientConfig
text.py      the tokenizer and chat template (imported only for text prompts)
tokenizer.py the tokenizer from the swarm when there is no model folder: fetched, checked, cached
"""

from node.client.client import Client
from node.client.config import ClientConfig
from node.client.host import SessionHost
from node.client.known import plan_route
from node.client.sampling import Sampling, sample
from node.client.session import InferenceSession
from node.plan.peers import PeerInfo, PeerView
from node.plan.routing import Hop

__all__ = [
    "Client",
    "ClientConfig",
    "Hop",
    "InferenceSession",
    "PeerInfo",
    "PeerView",
    "Sampling",
    "SessionHost",
    "plan_route",
    "sample",
]
