"""Shared by the Python interop peers: an independent gRPC stack (grpcio)
with stubs generated from our .proto files by grpc_tools at test time."""
import queue
import socket
import threading

import client_pb2 as pb


def packet_stream(q):
    while True:
        p = q.get()
        if p is None:
            return
        yield p


def pattern(n):
    return bytes(((i * 31) ^ (i >> 8)) & 0xFF for i in range(n))


def split_addr(address):
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def dial_rsp(random, connect_id=0, error=""):
    return pb.Packet(type=pb.DIAL_RSP, dialResponse=pb.DialResponse(random=random, connectID=connect_id, error=error))


def data(cid, payload):
    return pb.Packet(type=pb.DATA, data=pb.Data(connectID=cid, data=payload))


def close_rsp(cid, error=""):
    return pb.Packet(type=pb.CLOSE_RSP, closeResponse=pb.CloseResponse(connectID=cid, error=error))


class Relay:
    """Endpoint side of the protocol (what an agent does): DIAL_REQ opens a
    socket, DATA is written to it, what it sends back becomes DATA, EOF
    becomes an unsolicited CLOSE_RSP, CLOSE_REQ closes it."""

    def __init__(self, out):
        self.out = out
        self.conns = {}
        self.next_id = 0
        self.lock = threading.Lock()

    def handle(self, p):
        if p.type == pb.DIAL_REQ:
            req = p.dialRequest
            try:
                s = socket.create_connection(split_addr(req.address), timeout=5)
                s.settimeout(None)
            except OSError as e:
                self.out.put(dial_rsp(req.random, 0, "dial tcp %s: %s" % (req.address, e)))
                return
            with self.lock:
                self.next_id += 1
                cid = self.next_id
                self.conns[cid] = s
            self.out.put(dial_rsp(req.random, cid))
            threading.Thread(target=self.reader, args=(cid, s), daemon=True).start()
        elif p.type == pb.DATA:
            with self.lock:
                s = self.conns.get(p.data.connectID)
            if s is None:
                self.out.put(close_rsp(p.data.connectID, "unrecognized connectID"))
            else:
                s.sendall(p.data.data)
        elif p.type == pb.CLOSE_REQ:
            with self.lock:
                s = self.conns.pop(p.closeRequest.connectID, None)
            if s is None:
                self.out.put(close_rsp(p.closeRequest.connectID, "Unknown connectID"))
            else:
                s.close()
                self.out.put(close_rsp(p.closeRequest.connectID))

    def reader(self, cid, s):
        while True:
            try:
                d = s.recv(65536)
            except OSError:
                d = b""
            if not d:
                break
            self.out.put(data(cid, d))
        with self.lock:
            mine = self.conns.pop(cid, None)
        if mine is not None:
            s.close()
            self.out.put(close_rsp(cid))
