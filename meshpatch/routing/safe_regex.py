"""RE2 patterns from xDS, matched without catastrophic backtracking.

Envoy and gRPC match ``safe_regex`` with RE2, which runs in time linear in the
input whatever the pattern.  Python's ``re`` backtracks: ``(a+)+$`` against
30 ``a`` and a ``!`` takes minutes, and ``re`` holds the GIL while it runs, so
one such route from the control plane would freeze every thread of the app.
Route and header matching only asks "is the whole string in the language"
(full match, no captures), so meshpatch can choose per pattern:

* **re** when the pattern is backtracking-safe by construction: no repetition
  inside a repetition, no alternation under a repetition, and at most one
  unbounded repetition (``.*``, ``[0-9]+``...).  Then a full match costs at most
  about ``len(text) * len(pattern)`` steps.  This covers the usual routes
  (``/api/v[0-9]+``, ``.*\\.png``, ``(foo|bar)/.*``) at ``re``'s C speed.
* a **lazy DFA** built here for every other pattern: Thompson NFA from ``re``'s
  own parser, subset construction on demand, one cached dict lookup per input
  character.  Linear time like RE2, a few microseconds for a typical path.

Constructs RE2 does not have (backreferences, look-around, atomic groups,
possessive quantifiers, conditionals, ``(?x)``), POSIX classes Python parses
differently, and programs over ``MAX_NFA_STATES`` (Envoy's
``max_program_size`` idea) are rejected with a reason, which the xDS decoder
turns into a NACK.  Classes are ASCII, as in RE2 (``\\d`` is ``[0-9]``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

try:  # Python 3.11+
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.9/3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

MAX_PATTERN = 4096
MAX_NFA_STATES = 4000
MAX_DFA_STATES = 2000  # cache reset beyond this (RE2 does the same with its DFA memory budget)
UNBOUNDED_FROM = 32  # a repetition allowing more than this many copies counts as unbounded

_REJECTED_OPS = {
    "GROUPREF": "backreferences", "GROUPREF_EXISTS": "conditionals", "ASSERT": "look-ahead/look-behind",
    "ASSERT_NOT": "look-ahead/look-behind", "ATOMIC_GROUP": "atomic groups", "POSSESSIVE_REPEAT": "possessive quantifiers",
}
_ALLOWED_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL | re.UNICODE
_POSIX_CLASS = re.compile(r"\[:\^?[a-z]+:\]")


def compile_pattern(pattern: str) -> Any:
    """An object whose ``fullmatch(text)`` is truthy when all of ``text`` matches.
    Raises ValueError (with the reason) for patterns meshpatch must NACK."""
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"regex longer than {MAX_PATTERN} characters")
    if _POSIX_CLASS.search(pattern):
        raise ValueError(f"invalid regex {pattern!r}: POSIX character classes ([[:alpha:]]) are not supported")
    import warnings

    try:
        with warnings.catch_warnings():
            # "Possible nested set" for "[[": RE2 and Python both read it as a literal "[" today.
            warnings.simplefilter("ignore", FutureWarning)
            tree = _p.parse(pattern, 0)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
    flags = tree.state.flags
    if flags & ~_ALLOWED_FLAGS:
        raise ValueError(f"invalid regex {pattern!r}: only the i, m and s flags exist in RE2")
    _check(tree, pattern)
    if _backtracking_safe(tree):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return re.compile(pattern, re.ASCII)
        except (re.error, RecursionError, OverflowError) as exc:  # pragma: no cover - parse() accepted it
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
    return LazyDfa(pattern, tree, flags)


# -- analysis ------------------------------------------------------------------


def _items(value: Any) -> List[Any]:
    return list(value) if value is not None else []


def _walk(tree: Any):
    for op, av in tree:
        yield op, av
        name = str(op)
        if name == "SUBPATTERN":
            yield from _walk(av[3])
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            yield from _walk(av[2])
        elif name == "BRANCH":
            for branch in av[1]:
                yield from _walk(branch)
        elif name in ("ASSERT", "ASSERT_NOT"):
            yield from _walk(av[1])
        elif name == "ATOMIC_GROUP":
            yield from _walk(av)
        elif name == "GROUPREF_EXISTS":
            for part in av[1:]:
                if part is not None:
                    yield from _walk(part)


def _check(tree: Any, pattern: str) -> None:
    for op, av in _walk(tree):
        name = str(op)
        if name in _REJECTED_OPS:
            raise ValueError(f"invalid regex {pattern!r}: {_REJECTED_OPS[name]} are not RE2 syntax")
        if name == "SUBPATTERN" and ((av[1] | av[2]) & ~_ALLOWED_FLAGS):
            raise ValueError(f"invalid regex {pattern!r}: only the i, m and s flags exist in RE2")


def _is_repeat(op: Any) -> bool:
    return str(op) in ("MAX_REPEAT", "MIN_REPEAT")


def _variable(av: Any) -> bool:
    low, high = av[0], av[1]
    return high != low


def _backtracking_safe(tree: Any) -> bool:
    """Can ``re`` only do polynomial-and-small work on this pattern?  Backtracking
    explodes when a repeated piece can match the same text in several ways
    (a quantifier or an alternation inside a repetition), when several
    unbounded repetitions can trade characters, or when many optional pieces
    multiply their choices (``a?a?a?...aaa``)."""
    unbounded = 0
    choices = 1
    for op, av in _walk(tree):
        if not _is_repeat(op):
            continue
        low, high = av[0], av[1]
        if high != low:
            if high is _c.MAXREPEAT or high > UNBOUNDED_FROM:
                unbounded += 1
            else:
                choices *= high - low + 1
        if high is _c.MAXREPEAT or high > 1:
            for inner_op, inner_av in _walk(av[2]):
                if (_is_repeat(inner_op) and _variable(inner_av)) or str(inner_op) == "BRANCH":
                    return False
    return unbounded <= 1 and choices <= 256


# -- the NFA ---------------------------------------------------------------------

# node kinds
_CHAR, _SPLIT, _BEGIN, _END, _MATCH, _EPS = range(6)

_DIGIT = frozenset("0123456789")
_SPACE = frozenset("\t\n\f\r ")  # RE2's \s (no \v)
_WORD = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")


def _category(code: Any) -> Callable[[str], bool]:
    name = str(code)
    if "DIGIT" in name:
        base = _DIGIT
    elif "SPACE" in name:
        base = _SPACE
    elif "WORD" in name:
        base = _WORD
    else:
        raise ValueError(f"unsupported class {name}")
    if "NOT" in name:
        return lambda ch: ch not in base
    return lambda ch: ch in base


def _fold(predicate: Callable[[str], bool], ignore_case: bool) -> Callable[[str], bool]:
    if not ignore_case:
        return predicate
    return lambda ch: predicate(ch) or predicate(ch.lower()) or predicate(ch.upper())


class _Builder:
    """Thompson construction over ``re``'s parse tree.  States are parallel lists:
    kind, a predicate for character states, and up to two successors."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.kind: List[int] = []
        self.test: List[Optional[Callable[[str], bool]]] = []
        self.out1: List[int] = []
        self.out2: List[int] = []
        self.multiline = False

    def _new(self, kind: int, test: Optional[Callable[[str], bool]] = None) -> int:
        if len(self.kind) >= MAX_NFA_STATES:
            raise ValueError(f"regex {self.pattern[:80]!r} is too large (more than {MAX_NFA_STATES} states)")
        self.kind.append(kind)
        self.test.append(test)
        self.out1.append(-1)
        self.out2.append(-1)
        return len(self.kind) - 1

    # A fragment is (start, [dangling (state, slot)]) to patch later.
    def seq(self, tree: Any, flags: int) -> Tuple[int, List[Tuple[int, int]]]:
        start = self._new(_EPS)
        dangling = [(start, 1)]
        for op, av in tree:
            frag = self.node(op, av, flags)
            self.patch(dangling, frag[0])
            dangling = frag[1]
        return start, dangling

    def patch(self, dangling: List[Tuple[int, int]], target: int) -> None:
        for state, slot in dangling:
            if slot == 1:
                self.out1[state] = target
            else:
                self.out2[state] = target

    def char(self, predicate: Callable[[str], bool], flags: int) -> Tuple[int, List[Tuple[int, int]]]:
        state = self._new(_CHAR, _fold(predicate, bool(flags & re.IGNORECASE)))
        return state, [(state, 1)]

    def node(self, op: Any, av: Any, flags: int) -> Tuple[int, List[Tuple[int, int]]]:
        name = str(op)
        if name == "LITERAL":
            ch = chr(av)
            return self.char(lambda c, ch=ch: c == ch, flags)
        if name == "NOT_LITERAL":
            ch = chr(av)
            if flags & re.IGNORECASE:
                low, up = ch.lower(), ch.upper()
                state = self._new(_CHAR, lambda c: c != ch and c.lower() != low and c.upper() != up)
                return state, [(state, 1)]
            return self.char(lambda c, ch=ch: c != ch, flags)
        if name == "ANY":
            if flags & re.DOTALL:
                return self.char(lambda c: True, 0)
            return self.char(lambda c: c != "\n", 0)
        if name == "IN":
            return self.char(self._charset(av), flags) if not _negated(av) else self._negated_set(av, flags)
        if name == "SUBPATTERN":
            inner = (flags | av[1]) & ~av[2]
            return self.seq(av[3], inner)
        if name == "BRANCH":
            frags = [self.seq(branch, flags) for branch in av[1]]
            start = self._new(_EPS)
            target = frags[-1][0]
            for frag in reversed(frags[:-1]):  # a chain of splits: branch i, or try the rest
                split = self._new(_SPLIT)
                self.out1[split] = frag[0]
                self.out2[split] = target
                target = split
            self.out1[start] = target
            dangling: List[Tuple[int, int]] = []
            for frag in frags:
                dangling.extend(frag[1])
            return start, dangling
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            return self.repeat(av[0], av[1], av[2], flags)
        if name == "AT":
            code = str(av)
            if code in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
                if code == "AT_BEGINNING" and flags & re.MULTILINE:
                    raise ValueError(f"regex {self.pattern[:80]!r}: ^ in multi-line mode is not supported here")
                state = self._new(_BEGIN)
            elif code in ("AT_END", "AT_END_STRING"):
                if code == "AT_END" and flags & re.MULTILINE:
                    raise ValueError(f"regex {self.pattern[:80]!r}: $ in multi-line mode is not supported here")
                state = self._new(_END)
            else:
                raise ValueError(f"regex {self.pattern[:80]!r}: word boundaries (\\b, \\B) in a pattern that needs "
                                 "the linear-time matcher are not supported")
            return state, [(state, 1)]
        raise ValueError(f"regex {self.pattern[:80]!r}: {name} is not supported")

    def _charset(self, items: Any) -> Callable[[str], bool]:
        singles = set()
        ranges: List[Tuple[int, int]] = []
        tests: List[Callable[[str], bool]] = []
        for op, av in items:
            name = str(op)
            if name == "LITERAL":
                singles.add(chr(av))
            elif name == "RANGE":
                ranges.append((av[0], av[1]))
            elif name == "CATEGORY":
                tests.append(_category(av))
            elif name == "NEGATE":
                continue
            else:
                raise ValueError(f"regex {self.pattern[:80]!r}: {name} in a character class is not supported")

        def member(ch: str) -> bool:
            if ch in singles:
                return True
            code = ord(ch)
            for low, high in ranges:
                if low <= code <= high:
                    return True
            for test in tests:
                if test(ch):
                    return True
            return False

        return member

    def _negated_set(self, items: Any, flags: int) -> Tuple[int, List[Tuple[int, int]]]:
        member = _fold(self._charset(items), bool(flags & re.IGNORECASE))
        state = self._new(_CHAR, lambda ch: not member(ch))
        return state, [(state, 1)]

    def repeat(self, low: int, high: Any, body: Any, flags: int) -> Tuple[int, List[Tuple[int, int]]]:
        start = self._new(_EPS)
        dangling = [(start, 1)]
        for _ in range(low):
            frag = self.seq(body, flags)
            self.patch(dangling, frag[0])
            dangling = frag[1]
        if high is _c.MAXREPEAT:
            split = self._new(_SPLIT)  # out1: another copy, out2: done
            self.patch(dangling, split)
            frag = self.seq(body, flags)
            self.out1[split] = frag[0]
            self.patch(frag[1], split)
            return start, [(split, 2)]
        done: List[Tuple[int, int]] = []
        for _ in range(high - low):
            split = self._new(_SPLIT)
            self.patch(dangling, split)
            frag = self.seq(body, flags)
            self.out1[split] = frag[0]
            done.append((split, 2))
            dangling = frag[1]
        return start, dangling + done


def _negated(items: Any) -> bool:
    return any(str(op) == "NEGATE" for op, _ in items)


class _DState:
    __slots__ = ("nfa", "trans", "accept")

    def __init__(self, nfa: FrozenSet[int]) -> None:
        self.nfa = nfa
        self.trans: Dict[str, "_DState"] = {}
        self.accept: Optional[bool] = None


class LazyDfa:
    """Full-match membership in time linear in the text (see the module doc)."""

    def __init__(self, pattern: str, tree: Any, flags: int) -> None:
        self.pattern = pattern
        builder = _Builder(pattern)
        start, dangling = builder.seq(tree, flags)
        match = builder._new(_MATCH)
        builder.patch(dangling, match)
        self._kind = builder.kind
        self._test = builder.test
        self._out1 = builder.out1
        self._out2 = builder.out2
        self._start_nfa = start
        self._reset()

    def _reset(self) -> None:
        self._states: Dict[FrozenSet[int], _DState] = {}
        self._start = self._state(self._closure([self._start_nfa], begin=True))
        self._dead = self._state(frozenset())

    def _closure(self, seeds: List[int], begin: bool = False, end: bool = False) -> FrozenSet[int]:
        """States reachable without consuming a character.  ^ is passable only at
        the start and $ only at the end; otherwise they stay in the set (as
        blocked states) so the end-of-text check can pass them later."""
        kind, out1, out2 = self._kind, self._out1, self._out2
        seen = set()
        stack = list(seeds)
        while stack:
            s = stack.pop()
            if s < 0 or s in seen:
                continue
            seen.add(s)
            k = kind[s]
            if k == _EPS:
                stack.append(out1[s])
            elif k == _SPLIT:
                stack.append(out1[s])
                stack.append(out2[s])
            elif k == _BEGIN and begin:
                stack.append(out1[s])
            elif k == _END and end:
                stack.append(out1[s])
        return frozenset(seen)

    def _state(self, nfa: FrozenSet[int]) -> _DState:
        state = self._states.get(nfa)
        if state is None:
            if len(self._states) >= MAX_DFA_STATES:
                self._states = {}
            state = self._states[nfa] = _DState(nfa)
        return state

    def _step(self, state: _DState, ch: str) -> _DState:
        kind, test, out1 = self._kind, self._test, self._out1
        seeds = [out1[s] for s in state.nfa if kind[s] == _CHAR and test[s](ch)]  # type: ignore[misc]
        nxt = self._state(self._closure(seeds)) if seeds else self._dead
        if len(state.trans) < 256:
            state.trans[ch] = nxt
        return nxt

    def _accepts(self, state: _DState, at_start: bool) -> bool:
        if at_start:  # the empty text: ^ and $ both passable
            return any(self._kind[s] == _MATCH for s in self._closure(list(state.nfa), begin=True, end=True))
        if state.accept is None:
            state.accept = any(self._kind[s] == _MATCH for s in self._closure(list(state.nfa), end=True))
        return state.accept

    def fullmatch(self, text: str) -> Optional[bool]:
        state = start = self._start
        dead = self._dead
        for ch in text:
            nxt = state.trans.get(ch)
            if nxt is None:
                nxt = self._step(state, ch)
            if nxt is dead or not nxt.nfa:
                return None
            state = nxt
        return True if self._accepts(state, state is start and not text) else None

    def __repr__(self) -> str:
        return f"LazyDfa({self.pattern!r})"
