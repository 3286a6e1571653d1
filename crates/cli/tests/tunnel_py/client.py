"""A Konnectivity client written against grpcio: one Proxy stream per dial
against our proxy-server (mTLS), checking data with hashes."""
import hashlib
import os
import queue
import random
import sys

import grpc

import client_pb2 as pb
import client_pb2_grpc
from common import packet_stream, pattern

host, port, ca, cert, key, backend = sys.argv[1:7]
creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(), open(cert, "rb").read())
channel = grpc.secure_channel("%s:%s" % (host, port), creds)
stub = client_pb2_grpc.ProxyServiceStub(channel)


def dial(address):
    out = queue.Queue()
    call = stub.Proxy(packet_stream(out))
    rnd = random.getrandbits(62) + 1
    out.put(pb.Packet(type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol="tcp", address=address, random=rnd)))
    rsp = next(call)
    assert rsp.type == pb.DIAL_RSP, rsp
    assert rsp.dialResponse.random == rnd, rsp
    return out, call, rsp.dialResponse


def send(out, cid, payload):
    out.put(pb.Packet(type=pb.DATA, data=pb.Data(connectID=cid, data=payload)))


# 1. GET a known body; the backend closes; we must see CLOSE_RSP after the data.
out, call, rsp = dial(backend)
assert not rsp.error and rsp.connectID > 0, rsp
cid = rsp.connectID
send(out, cid, b"GET /bytes/300000 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
buf = b""
for p in call:
    if p.type == pb.DATA:
        assert p.data.connectID == cid
        buf += p.data.data
    elif p.type == pb.CLOSE_RSP:
        assert p.closeResponse.connectID == cid
        break
out.put(None)
body = buf.split(b"\r\n\r\n", 1)[1]
assert hashlib.sha256(body).hexdigest() == hashlib.sha256(pattern(300000)).hexdigest(), "body hash differs"
print("GET OK", len(body), flush=True)

# 2. Echo 1 MiB in 16 KiB packets, then CLOSE_REQ -> CLOSE_RSP.
out, call, rsp = dial(backend)
cid = rsp.connectID
payload = os.urandom(1 << 20)
send(out, cid, b"GET /echo HTTP/1.1\r\nHost: b\r\n\r\n")
for i in range(0, len(payload), 16384):
    send(out, cid, payload[i : i + 16384])
head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
got = b""
it = iter(call)
while len(got) < len(head) + len(payload):
    p = next(it)
    assert p.type == pb.DATA, p
    got += p.data.data
assert hashlib.sha256(got[len(head):]).digest() == hashlib.sha256(payload).digest(), "echo hash differs"
out.put(pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=cid)))
p = next(it)
assert p.type == pb.CLOSE_RSP and p.closeResponse.connectID == cid, p
out.put(None)
print("ECHO OK", flush=True)

# 3. A dial to a closed port fails with the agent's error.
out, call, rsp = dial("127.0.0.1:1")
assert rsp.error and "refused" in rsp.error, rsp
out.put(None)
print("DIAL ERROR OK", rsp.error, flush=True)
print("ALL OK", flush=True)
channel.close()
# grpcio's interpreter shutdown can wait on its own threads; the checks are done.
os._exit(0)
