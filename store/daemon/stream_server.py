"""The bulk-data port: get and put over a plain socket stream, or through shared memory.

One thread per connection (a client keeps one connection per concurrent caller), each a
``Session`` (session.py: hello, auth, attach, cma, ucx), whose gets take the one get
path (stream_get.py over get_path.py) and whose puts the one put path (put_path.py).
Until ``hello`` a connection has a deadline and small frames, and connections are capped
(stream_gate.py). Bytes that are not a frame get one INVALID_ARGUMENT frame, then the
daemon hangs up: it cannot tell where the next frame would start.
"""

from __future__ import annotations

import logging
import socket

from store.daemon.activity import Activity
from store.daemon.auth import Authenticator
from store.daemon.service import StoreService
from store.daemon.session import Session
from store.daemon.stream_gate import StreamGate, request_limits, shutdown
from store.wire.constants import HELLO_TIMEOUT, MAX_CONNECTIONS, MAX_REGION_BYTES, RELEASE_TIMEOUT
from store.wire.same_host import SameHost
from store.wire.stream import BadFrame, StreamClosed, recv_frame

log = logging.getLogger(__name__)


class StreamServer:
    """Accepts connections on ``host:port`` and serves each on its own thread."""

    def __init__(
        self,
        service: StoreService,
        activity: Activity,
        auth: Authenticator | None,
        max_region_bytes: int = MAX_REGION_BYTES,
        ucx: bool = False,
        same_host: SameHost | None = None,
        max_connections: int = MAX_CONNECTIONS,
        handshake_timeout: float = HELLO_TIMEOUT,
    ) -> None:
        self.service = service
        self.same_host = same_host  # pids of same-host clients, the shared pool (same_host.py)
        self.activity = activity
        self.auth = auth or Authenticator()  # no tokens: every connection is OPEN
        self.max_region_bytes = max_region_bytes
        self.ucx = ucx  # serve {"op": "ucx"}: connections move onto UCX (ucx_transport.py)
        self.ucx_timeout: float | None = None  # idle UCX connections wait without a deadline
        self.release_timeout = RELEASE_TIMEOUT
        self._listener: socket.socket | None = None
        # the connection cap, hello deadlines and the accept loop (stream_gate.py)
        self.gate = StreamGate(
            max_connections,
            handshake_timeout,
            lambda reason: activity.turned_away.labels(reason).inc(),
        )
        self.request_limits = request_limits(service.limits.max_batch)  # frames after hello

    def start(self, host: str, port: int) -> int:
        """Listen and accept in a background thread; returns the bound port."""
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.gate.start(self._listener, self._serve)
        return self._listener.getsockname()[1]

    def serving(self) -> bool:
        """Whether the port accepts connections (False once its accept loop ended)."""
        return self._listener is not None and self.gate.serving

    def listening(self) -> bool:
        """Whether the port is open (False once ``stop`` began)."""
        return self._listener is not None

    def stop(self) -> None:
        """Stop accepting and close every connection (call after draining)."""
        listener, self._listener = self._listener, None
        self.gate.close()
        if listener is not None:
            shutdown(listener)  # wakes the accept loop
            listener.close()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        session = Session(self, conn, peer)
        try:
            while self._listener is not None:
                if not session.handle(recv_frame(session.conn, session.limits)):  # or UCX
                    break
        except BadFrame as exc:  # out of step: say why, then hang up
            try:
                session.refuse(str(exc) if session.greeted else f"{exc} (before hello)")
            except (StreamClosed, OSError):
                pass
        except (StreamClosed, OSError):
            pass
        finally:
            session.close()
            self.gate.leave(conn)
            shutdown(conn)
            conn.close()
