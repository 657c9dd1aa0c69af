"""The read side of an ADS stream that meshpatch itself serves (the pod relay,
the local xDS server for grpc-core's credentials).

grpcio hands a streaming servicer a blocking request iterator; both servers
wait on one queue that also carries their own events (pushes, changes), so
the requests are pumped into that queue from a daemon thread.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from meshpatch.internal import suppress_current_context


def pump_requests(request_iterator: Iterator[Any], context: Any, events: Any, end: Any, name: str) -> None:
    """Put each request of the stream on ``events``, then ``end`` once the
    client half-closes, fails or the RPC is cancelled (``end`` may arrive twice)."""
    context.add_callback(lambda: events.put(end))

    def read() -> None:
        suppress_current_context()
        try:
            for request in request_iterator:
                events.put(request)
        except Exception:  # cancelled / client gone: the stream is over
            pass
        finally:
            events.put(end)

    threading.Thread(target=read, name=name, daemon=True).start()
