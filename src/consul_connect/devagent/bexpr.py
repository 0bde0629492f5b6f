"""A subset of go-bexpr, the boolean filter language behind Consul's ``?filter=``.

Supported grammar (keywords are lower case, as in go-bexpr)::

    expr      := or
    or        := and ("or" and)*
    and       := unary ("and" unary)*
    unary     := "not" unary | "(" expr ")" | match
    match     := selector ("==" | "!=") value
               | selector "is" ["not"] "empty"
               | value ["not"] "in" selector
               | selector ["not"] "contains" value
               | selector ["not"] "matches" value
    selector  := ident ("." ident | "[" string "]")*
    value     := "double quoted" | `raw` | number | ident

Filters run over JSON-shaped records (dicts, lists, scalars). A selector that
walks through a list projects over its elements and a match is true when any
element matches (``!=`` and the ``not`` forms are the negation of that).
Selectors are checked against an optional schema when the filter is compiled,
so a misspelled field fails the request as Consul does instead of silently
matching nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FILTER_ERROR_PREFIX",
    "MAP",
    "BexprError",
    "Filter",
    "Schema",
    "compile_filter",
]

FILTER_ERROR_PREFIX = "Failed to create boolean expression evaluator"

#: Schema marker for a free-form ``map[string]string``-like field (``Meta``, ``Config`` ...).
MAP = "map"

#: A schema: ``None`` for a scalar leaf, :data:`MAP` for a free-form map, a dict of
#: field name to schema for a struct, and a one-element list ``[schema]`` for a list.
Schema = None | str | dict[str, Any] | list[Any]


class BexprError(ValueError):
    """The expression does not parse, or names a field the data does not have.

    ``str(err)`` is the complete text Consul answers with (it starts with
    :data:`FILTER_ERROR_PREFIX`).
    """


# -- lexer -------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<op>==|!=)
  | (?P<lp>\()
  | (?P<rp>\))
  | (?P<lb>\[)
  | (?P<rb>\])
  | (?P<dot>\.)
  | (?P<dq>"(?:[^"\\]|\\.)*")
  | (?P<bq>`[^`]*`)
  | (?P<num>-?[0-9]+(?:\.[0-9]+)?(?![A-Za-z_]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)

_KEYWORDS = {"and", "or", "not", "in", "contains", "matches", "is", "empty"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _error_at(src: str, pos: int, msg: str) -> BexprError:
    line = src.count("\n", 0, pos) + 1
    col = pos - (src.rfind("\n", 0, pos) + 1) + 1
    return BexprError(f"{FILTER_ERROR_PREFIX}: {line}:{col} ({pos}): {msg}")


def _lex(src: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None:
            raise _error_at(src, pos, f"no match found, unexpected character {src[pos]!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            text = m.group()
            if kind == "ident" and text in _KEYWORDS:
                kind = text
            out.append(_Tok(kind, text, pos))
        pos = m.end()
    out.append(_Tok("eof", "", len(src)))
    return out


def _unquote(tok: _Tok, src: str) -> str:
    if tok.kind == "bq":
        return tok.text[1:-1]
    if tok.kind == "dq":
        body = tok.text[1:-1]
        out = []
        i = 0
        escapes = {
            "n": "\n",
            "t": "\t",
            "r": "\r",
            '"': '"',
            "\\": "\\",
            "/": "/",
            "b": "\b",
            "f": "\f",
        }
        while i < len(body):
            ch = body[i]
            if ch == "\\" and i + 1 < len(body):
                nxt = body[i + 1]
                if nxt in escapes:
                    out.append(escapes[nxt])
                    i += 2
                    continue
                if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", body[i + 2 : i + 6]):
                    out.append(chr(int(body[i + 2 : i + 6], 16)))
                    i += 6
                    continue
                raise _error_at(src, tok.pos + 1 + i, "invalid escape sequence in quoted string")
            out.append(ch)
            i += 1
        return "".join(out)
    return tok.text


# -- AST -----------------------------------------------------------------------------

Selector = tuple[str, ...]


@dataclass(frozen=True)
class _Match:
    op: str  # "==", "!=", "empty", "in", "contains", "matches"
    negate: bool
    selector: Selector
    value: str
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True)
class _Not:
    inner: _Node


@dataclass(frozen=True)
class _BinOp:
    op: str  # "and" / "or"
    left: _Node
    right: _Node


_Node = _Match | _Not | _BinOp


class _Parser:
    def __init__(self, src: str) -> None:
        self.src = src
        self.toks = _lex(src)
        self.i = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def fail(self, expected: str) -> BexprError:
        t = self.tok
        found = "end of input" if t.kind == "eof" else repr(t.text)
        return _error_at(self.src, t.pos, f"no match found, expected: {expected}, found {found}")

    def parse(self) -> _Node:
        node = self.parse_or()
        if self.tok.kind != "eof":
            raise self.fail('"and", "or" or end of input')
        return node

    def parse_or(self) -> _Node:
        left = self.parse_and()
        while self.tok.kind == "or":
            self.take()
            left = _BinOp("or", left, self.parse_and())
        return left

    def parse_and(self) -> _Node:
        left = self.parse_unary()
        while self.tok.kind == "and":
            self.take()
            left = _BinOp("and", left, self.parse_unary())
        return left

    def parse_unary(self) -> _Node:
        t = self.tok
        if t.kind == "not":
            self.take()
            return _Not(self.parse_unary())
        if t.kind == "lp":
            self.take()
            inner = self.parse_or()
            if self.tok.kind != "rp":
                raise self.fail('")"')
            self.take()
            return inner
        return self.parse_match()

    def parse_value(self) -> str:
        t = self.tok
        if t.kind in ("dq", "bq", "num", "ident"):
            self.take()
            return _unquote(t, self.src)
        raise self.fail("a value (quoted string, number or identifier)")

    def parse_selector(self) -> Selector:
        t = self.tok
        if t.kind != "ident":
            raise self.fail("a selector")
        parts = [self.take().text]
        while True:
            if self.tok.kind == "dot":
                self.take()
                if self.tok.kind not in ("ident", *_KEYWORDS):
                    raise self.fail("a field name")
                parts.append(self.take().text)
            elif self.tok.kind == "lb":
                self.take()
                if self.tok.kind not in ("dq", "bq"):
                    raise self.fail("a quoted map key")
                parts.append(_unquote(self.take(), self.src))
                if self.tok.kind != "rb":
                    raise self.fail('"]"')
                self.take()
            else:
                return tuple(parts)

    def parse_match(self) -> _Node:
        t = self.tok
        # "value [not] in selector": the value may be quoted, a number, or an identifier.
        nxt = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else t
        nxt2 = self.toks[self.i + 2] if self.i + 2 < len(self.toks) else t
        if t.kind in ("dq", "bq", "num") or (
            t.kind == "ident" and (nxt.kind == "in" or (nxt.kind == "not" and nxt2.kind == "in"))
        ):
            value = self.parse_value()
            negate = False
            if self.tok.kind == "not":
                self.take()
                negate = True
            if self.tok.kind != "in":
                raise self.fail('"in" or "not in"')
            self.take()
            return _Match("in", negate, self.parse_selector(), value)
        selector = self.parse_selector()
        op = self.tok
        if op.kind == "op":
            self.take()
            return _Match("==", op.text == "!=", selector, self.parse_value())
        if op.kind == "is":
            self.take()
            negate = False
            if self.tok.kind == "not":
                self.take()
                negate = True
            if self.tok.kind != "empty":
                raise self.fail('"empty" or "not empty"')
            self.take()
            return _Match("empty", negate, selector, "")
        negate = False
        if op.kind == "not":
            self.take()
            negate = True
        kw = self.tok
        if kw.kind == "contains":
            self.take()
            return _Match("contains", negate, selector, self.parse_value())
        if kw.kind == "matches":
            self.take()
            vtok = self.tok
            value = self.parse_value()
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise _error_at(self.src, vtok.pos, f"invalid regular expression: {exc}") from None
            return _Match("matches", negate, selector, value, pattern)
        expected = '"==", "!=", "is", "contains", "matches", "not", "." or "["'
        if negate:
            expected = '"contains" or "matches"'
        raise self.fail(expected)


# -- schema validation -------------------------------------------------------------------


def _check_selector(sel: Selector, schema: Schema) -> None:
    node: Schema = schema
    for i, part in enumerate(sel):
        while isinstance(node, list):
            node = node[0] if node else None
        if node == MAP:
            if i != len(sel) - 1:
                break  # values of free-form maps may be nested objects (Proxy.Config)
            return
        if not isinstance(node, dict):
            raise BexprError(f'{FILTER_ERROR_PREFIX}: Selector "{".".join(sel)}" is not valid')
        if part not in node:
            raise BexprError(f'{FILTER_ERROR_PREFIX}: Selector "{".".join(sel)}" is not valid')
        node = node[part]


def _walk(nodes: list[Any], sel: Selector) -> tuple[list[Any], bool]:
    """Resolve ``sel`` on each node; returns the values and whether a list was crossed."""
    projected = False
    for part in sel:
        nxt: list[Any] = []
        for n in nodes:
            if isinstance(n, list):
                projected = True
                for el in n:
                    if isinstance(el, Mapping) and part in el:
                        nxt.append(el[part])
            elif isinstance(n, Mapping) and part in n:
                nxt.append(n[part])
        nodes = nxt
    return nodes, projected


def _as_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""
    return str(v)


def _equal(field: Any, value: str) -> bool:
    if isinstance(field, bool):
        low = value.strip()
        if low in ("1", "t", "T", "TRUE", "true", "True"):
            return field is True
        if low in ("0", "f", "F", "FALSE", "false", "False"):
            return field is False
        return False
    if isinstance(field, (int, float)):
        try:
            return float(field) == float(value)
        except ValueError:
            return False
    if isinstance(field, list):
        return any(_equal(x, value) for x in field)
    return _as_text(field) == value


def _contains(field: Any, value: str) -> bool:
    if isinstance(field, Mapping):
        return value in field
    if isinstance(field, list):
        return any(_equal(x, value) for x in field)
    if isinstance(field, str):
        return value in field
    return False


def _empty(field: Any) -> bool:
    if field is None:
        return True
    if isinstance(field, (str, list, dict)):
        return len(field) == 0
    return False


def _eval(node: _Node, record: Any) -> bool:
    if isinstance(node, _BinOp):
        if node.op == "and":
            return _eval(node.left, record) and _eval(node.right, record)
        return _eval(node.left, record) or _eval(node.right, record)
    if isinstance(node, _Not):
        return not _eval(node.inner, record)
    values, projected = _walk([record], node.selector)
    if projected:
        # A list was crossed: every element value is a candidate.
        flat: list[Any] = []
        for v in values:
            flat.extend(v if isinstance(v, list) else [v])
        candidates: list[Any] = flat if node.op != "empty" else [flat]
    else:
        candidates = values
    if node.op == "==":
        hit = any(_equal(v, node.value) for v in candidates)
    elif node.op in ("in", "contains"):
        hit = any(_contains(v, node.value) for v in candidates) or (
            projected and any(_equal(v, node.value) for v in candidates)
        )
    elif node.op == "matches":
        assert node.pattern is not None
        hit = any(isinstance(v, str) and node.pattern.search(v) is not None for v in candidates)
    else:  # empty
        hit = not candidates or all(_empty(v) for v in candidates)
    return not hit if node.negate else hit


class Filter:
    """A compiled filter; :meth:`matches` tests one record."""

    def __init__(self, expression: str, root: _Node | None) -> None:
        self.expression = expression
        self._root = root

    def matches(self, record: Any) -> bool:
        """True when ``record`` satisfies the expression (always true for an empty one)."""
        if self._root is None:
            return True
        return _eval(self._root, record)

    def apply(self, records: Iterable[Any], key: Callable[[Any], Any] | None = None) -> list[Any]:
        """The records (or the items whose ``key(item)`` record) that match, in order."""
        get = key or (lambda r: r)
        return [r for r in records if self.matches(get(r))]


def _selectors(node: _Node) -> Iterable[Selector]:
    if isinstance(node, _Match):
        yield node.selector
    elif isinstance(node, _Not):
        yield from _selectors(node.inner)
    else:
        yield from _selectors(node.left)
        yield from _selectors(node.right)


def compile_filter(expression: str, schema: Schema = None) -> Filter:
    """Parse ``expression``; with a ``schema`` every selector must name a known field.

    An empty (or blank) expression gives a filter that matches everything.
    Raises :class:`BexprError` with Consul's error text otherwise.
    """
    if not expression.strip():
        return Filter(expression, None)
    root = _Parser(expression).parse()
    if schema is not None:
        for sel in _selectors(root):
            _check_selector(sel, schema)
    return Filter(expression, root)
