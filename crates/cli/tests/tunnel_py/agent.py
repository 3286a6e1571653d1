"""A Konnectivity agent written against grpcio: dials our proxy-server's
agent port with mTLS, sends agentID/agentIdentifiers, reads serverID and
serverCount from the response headers, then serves dials."""
import queue
import sys

import grpc

import agent_pb2_grpc
from common import Relay, packet_stream

host, port, ca, cert, key, agent_id = sys.argv[1:7]
creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(), open(cert, "rb").read())
channel = grpc.secure_channel("%s:%s" % (host, port), creds)
out = queue.Queue()
call = agent_pb2_grpc.AgentServiceStub(channel).Connect(
    packet_stream(out), metadata=(("agentid", agent_id), ("agentidentifiers", "host=py-agent"))
)
# Blocks until the server's headers arrive: they must come before any packet.
md = dict(call.initial_metadata())
print("HEADERS serverid=%s servercount=%s" % (md.get("serverid"), md.get("servercount")), flush=True)
relay = Relay(out)
for p in call:
    relay.handle(p)
print("STREAM ENDED", flush=True)
