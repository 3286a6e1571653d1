"""A Konnectivity ProxyService (server frontend) written against grpcio,
mTLS, relaying each dial itself: our client library must work against it."""
import queue
import sys
import threading
import time
from concurrent import futures

import grpc

import client_pb2_grpc
from common import Relay, packet_stream

port, ca, cert, key = sys.argv[1:5]


class Proxy(client_pb2_grpc.ProxyServiceServicer):
    def Proxy(self, request_iterator, context):
        out = queue.Queue()
        relay = Relay(out)

        def pump():
            try:
                for p in request_iterator:
                    relay.handle(p)
            finally:
                out.put(None)

        threading.Thread(target=pump, daemon=True).start()
        yield from packet_stream(out)


server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
client_pb2_grpc.add_ProxyServiceServicer_to_server(Proxy(), server)
creds = grpc.ssl_server_credentials(
    [(open(key, "rb").read(), open(cert, "rb").read())], root_certificates=open(ca, "rb").read(), require_client_auth=True
)
server.add_secure_port("127.0.0.1:%s" % port, creds)
server.start()
print("LISTENING", flush=True)
while True:
    time.sleep(3600)
