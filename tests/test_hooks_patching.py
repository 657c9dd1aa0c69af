"""hooks._common.patch_request_method: the plain-function patch used for the
per-request methods (requests' HTTPAdapter.send, httpx's transports)."""

from __future__ import annotations

from typing import Any, List

import wrapt

from meshpatch.hooks._common import patch_request_method


def _recording(log: List[Any]) -> Any:
    def make(original: Any) -> Any:
        def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            log.append(("patched", self, request))
            return original(self, request, *args, **kwargs)
        return send
    return make


def test_replaces_a_plain_method_and_keeps_the_original_reachable() -> None:
    class Adapter:
        def send(self, request: Any, timeout: Any = None) -> Any:
            """Send it."""
            return ("sent", request, timeout)

    original = Adapter.__dict__["send"]
    log: List[Any] = []
    patch_request_method(Adapter, "send", _recording(log))
    adapter = Adapter()
    assert adapter.send("r", timeout=3) == ("sent", "r", 3)
    assert log == [("patched", adapter, "r")]
    patched = Adapter.__dict__["send"]
    assert patched.__wrapped__ is original and patched.__name__ == "send" and patched.__doc__ == "Send it."


def test_a_method_someone_else_wrapped_with_wrapt_still_sees_its_instance() -> None:
    class Adapter:
        def send(self, request: Any) -> Any:
            return ("sent", request)

    seen: List[Any] = []

    def other_instrumentation(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        seen.append(instance)
        return wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(Adapter, "send", other_instrumentation)
    log: List[Any] = []
    patch_request_method(Adapter, "send", _recording(log))
    adapter = Adapter()
    assert adapter.send("r") == ("sent", "r")
    assert log == [("patched", adapter, "r")] and seen == [adapter]  # bound as attribute access would


def test_an_inherited_method_is_patched_on_the_given_class_only() -> None:
    class Base:
        def send(self, request: Any) -> Any:
            return ("base", request)

    class Child(Base):
        pass

    log: List[Any] = []
    patch_request_method(Child, "send", _recording(log))
    assert Child().send("r") == ("base", "r") and Base().send("s") == ("base", "s")
    assert [entry[2] for entry in log] == ["r"]
    assert "send" not in Base.__dict__ or not hasattr(Base.__dict__["send"], "__wrapped__")


def test_requests_send_is_routed_only_under_the_signature_the_patch_mirrors() -> None:
    """The requests patch binds send's arguments by name and passes them on
    positionally, so it must refuse a send whose parameters it does not know."""
    import functools

    from requests import adapters

    from meshpatch.hooks import requests_hook

    class Adapter:
        def send(self, request: Any, stream: Any = False, timeout: Any = None, verify: Any = True, cert: Any = None,
                 proxies: Any = None) -> Any:
            return request

    original = Adapter.send

    @functools.wraps(original)
    def instrumented(*args: Any, **kwargs: Any) -> Any:  # another agent's generic wrapper
        return original(*args, **kwargs)

    class Wrapped:
        send = instrumented

    class Changed:
        def send(self, request: Any, stream: Any = False, timeout: Any = 5, verify: Any = True, cert: Any = None,
                 proxies: Any = None) -> Any:
            return request

    class Extra:
        def send(self, request: Any, stream: Any = False, timeout: Any = None, verify: Any = True, cert: Any = None,
                 proxies: Any = None, retries: Any = None) -> Any:
            return request

    assert requests_hook._signature(adapters.HTTPAdapter, "send") == requests_hook._SEND_SIGNATURE
    assert (requests_hook._signature(adapters.HTTPAdapter, "build_connection_pool_key_attributes")
            == requests_hook._POOL_KEY_SIGNATURE)
    assert requests_hook._signature(Adapter, "send") == requests_hook._SEND_SIGNATURE
    assert requests_hook._signature(Wrapped, "send") == requests_hook._SEND_SIGNATURE
    assert requests_hook._signature(Changed, "send") != requests_hook._SEND_SIGNATURE  # another default
    assert requests_hook._signature(Extra, "send") != requests_hook._SEND_SIGNATURE
    assert requests_hook._signature(Adapter, "missing") is None
