"""Path and header matchers with Envoy / gRPC (A28, A63) semantics.

Each matcher is built once (regexes compiled at decode time) and exposes a
single ``matches`` method so the per-request loop is a few attribute reads.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Pattern, Tuple


class StringMatcher:
    """Envoy ``StringMatcher``: exact / prefix / suffix / contains / safe_regex."""

    __slots__ = ("kind", "value", "ignore_case", "_regex", "_lowered")

    KINDS = ("exact", "prefix", "suffix", "contains", "regex")

    def __init__(self, kind: str, value: str, ignore_case: bool = False) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown string matcher {kind!r}")
        self.kind = kind
        self.value = value
        self.ignore_case = ignore_case and kind != "regex"
        self._lowered = value.lower() if self.ignore_case else value
        self._regex: Optional[Pattern[str]] = compile_regex(value) if kind == "regex" else None

    def matches(self, text: str) -> bool:
        kind = self.kind
        if kind == "regex":
            return self._regex.fullmatch(text) is not None  # type: ignore[union-attr]
        if self.ignore_case:
            text = text.lower()
        value = self._lowered
        if kind == "exact":
            return text == value
        if kind == "prefix":
            return text.startswith(value)
        if kind == "suffix":
            return text.endswith(value)
        return value in text

    def __repr__(self) -> str:
        return f"StringMatcher({self.kind}={self.value!r}{', ignore_case' if self.ignore_case else ''})"


def compile_regex(pattern: str) -> Any:
    """Compile an RE2 pattern for full matching (callers use ``.fullmatch``).

    Linear-time whatever the pattern (see :mod:`meshpatch.routing.safe_regex`);
    RE2 syntax Python lacks, Python-only constructs and oversized patterns fail
    here and make the resource invalid, which the decoder turns into a NACK.
    """
    from meshpatch.routing.safe_regex import compile_pattern

    return compile_pattern(pattern)


class PathMatcher:
    """``RouteMatch`` path specifier: prefix, full path or safe_regex, with case_sensitive."""

    __slots__ = ("kind", "value", "case_sensitive", "_regex", "_cmp")

    def __init__(self, kind: str, value: str, case_sensitive: bool = True) -> None:
        if kind not in ("prefix", "path", "regex"):
            raise ValueError(f"unknown path matcher {kind!r}")
        self.kind = kind
        self.value = value
        self.case_sensitive = case_sensitive
        self._cmp = value if case_sensitive else value.lower()
        self._regex: Optional[Pattern[str]] = None
        if kind == "regex":
            self._regex = compile_regex(value if case_sensitive else "(?i:" + value + ")")

    def matches(self, path: str) -> bool:
        kind = self.kind
        if kind == "prefix":
            if not self._cmp:
                return True
            return (path if self.case_sensitive else path.lower()).startswith(self._cmp)
        if kind == "path":
            return (path if self.case_sensitive else path.lower()) == self._cmp
        return self._regex.fullmatch(path) is not None  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"PathMatcher({self.kind}={self.value!r})"


class HeaderMatcher:
    """Envoy ``HeaderMatcher`` as gRPC evaluates it.

    A missing header fails every matcher except ``present`` (then ``invert``
    is not applied), unless ``treat_missing_as_empty`` substitutes "".
    """

    __slots__ = ("name", "kind", "string", "present", "range", "invert", "treat_missing_as_empty")

    def __init__(
        self,
        name: str,
        kind: str,
        string: Optional[StringMatcher] = None,
        present: bool = True,
        range_: Optional[Tuple[int, int]] = None,
        invert: bool = False,
        treat_missing_as_empty: bool = False,
    ) -> None:
        if kind not in ("string", "present", "range"):
            raise ValueError(f"unknown header matcher {kind!r}")
        self.name = name.lower()
        self.kind = kind
        self.string = string
        self.present = present
        self.range = range_
        self.invert = invert
        self.treat_missing_as_empty = treat_missing_as_empty

    def matches_grpc(self, value: Any) -> bool:
        """gRPC's evaluation (A28/A63): a missing header fails every matcher but
        ``present``, even inverted; treat_missing_header_as_empty is not honoured."""
        if value is None and self.kind != "present":
            return False
        return self.matches(value)

    def matches(self, value: Any) -> bool:
        """``value`` is the header's value (str) or None when absent."""
        if self.kind == "present":
            return ((value is not None) == self.present) != self.invert
        if value is None:
            if not self.treat_missing_as_empty:
                return False
            value = ""
        if self.kind == "string":
            result = self.string.matches(value)  # type: ignore[union-attr]
        else:
            try:
                number = int(value)
            except ValueError:
                result = False
            else:
                start, end = self.range  # type: ignore[misc]
                result = start <= number < end
        return result != self.invert

    def __repr__(self) -> str:
        return f"HeaderMatcher({self.name} {self.kind}{' invert' if self.invert else ''})"
