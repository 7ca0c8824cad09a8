"""The workers' reactor still does everything the epoll reactor does."""

import subprocess
import sys

SCRIPT = r"""
from tproxy_twist.reactor import WorkerReactor, install
reactor = install()
assert isinstance(reactor, WorkerReactor)
from twisted.internet import protocol
from twisted.logger import globalLogPublisher

failures = []
def observe(event):
    if event.get("log_failure") or event.get("failure") or event.get("isError"):
        failures.append(event)
globalLogPublisher.addObserver(observe)
result = {}

class Echo(protocol.Protocol):
    def dataReceived(self, data):
        if data == b"boom":
            raise RuntimeError("a bug in a protocol")
        self.transport.write(data)

class Client(protocol.Protocol):
    def __init__(self, payload, key):
        self.payload, self.key, self.got = payload, key, b""
    def connectionMade(self):
        self.transport.write(self.payload)
    def dataReceived(self, data):
        self.got += data
        if self.got == self.payload:
            result[self.key] = "echoed"
            self.transport.loseConnection()
    def connectionLost(self, reason):
        result.setdefault(self.key, "closed")
        if len(result) == 2:
            reactor.stop()

port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
for payload, key in ((b"hello", "echo"), (b"boom", "bug")):
    f = protocol.ClientFactory()
    f.buildProtocol = lambda addr, p=payload, k=key: Client(p, k)
    reactor.connectTCP("127.0.0.1", port.getHost().port, f)
reactor.callLater(10, reactor.stop)
reactor.run()
print(result["echo"], result["bug"], len(failures))
"""


def test_the_worker_reactor_relays_bytes_and_survives_a_protocol_bug():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    # Echo works; the connection whose protocol raised is closed and the error logged.
    assert proc.stdout.split() == ["echoed", "closed", "1"]
