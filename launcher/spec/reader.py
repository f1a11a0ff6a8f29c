"""Read a YAML spec file within limits: every hostile or malformed file is one UserError naming it.

`yaml.safe_load` runs no code, but it still (1) reads a file of any size, (2) expands aliases (a
"billion laughs" document of a few hundred bytes is 10^9 leaves once pydantic or json walks it),
(3) keeps the last of duplicate keys without a word, and (4) recurses once per nesting level. The
loader here counts nodes *as they would be after expansion* while composing, before anything is
constructed, and stops at MAX_NODES; it refuses duplicate keys and nesting deeper than MAX_DEPTH.
It pairs libyaml's C parser (events) with PyYAML's Python composer, which we can bound: the pure-
Python parser takes ~7 s for a 1 MiB file, this ~1.5 s.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode
from yaml.resolver import Resolver

from launcher.errors import UserError

try:
    from yaml._yaml import CParser as _Parser
except ImportError:  # PyYAML built without libyaml: slower, same limits
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)

MAX_BYTES = 1 << 20  # 1 MiB: a real spec is a few KB
MAX_NODES = 100_000  # scalars + sequences + mappings, counting every alias use as a full copy
MAX_DEPTH = 100  # a spec is ~5 levels deep; kwargs may nest a few more

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class _Refused(Exception):
    """A limit was hit while composing; the message is built without expanding anything."""


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class _BoundedComposer(Composer):
    """PyYAML's composer, counting expanded nodes and depth and refusing duplicate keys."""

    def __init__(self) -> None:
        super().__init__()
        self._expanded = 0  # nodes so far, each alias counted as the size of what it names
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(finished node) -> its expanded size

    if TYPE_CHECKING:  # the parser's, in BoundedLoader
        def check_event(self, *choices: Any) -> bool: ...
        def peek_event(self) -> Any: ...

    def _count(self, n: int, mark: Any) -> None:
        self._expanded += n
        if self._expanded > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} YAML nodes once aliases are expanded{_at(mark)} (an alias bomb?)")

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is left to PyYAML's own error
                size = self._sizes.get(id(target))
                if size is None:
                    raise _Refused(f"alias *{event.anchor}{_at(event.start_mark)} refers to a node that contains"
                                   " it (a cycle)")
                self._count(size, event.start_mark)
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels{_at(mark)}")
        before = self._expanded
        self._count(1, mark)
        node = super().compose_node(parent, index)
        self._sizes[id(node)] = self._expanded - before
        self._depth -= 1
        return node

    def compose_mapping_node(self, anchor: Any) -> MappingNode:  # the anchor's name or None (the stubs say dict)
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], Any] = {}
        for key, _ in node.value:
            if isinstance(key, ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                first = seen.get((key.tag, key.value))
                if first is not None:
                    raise _Refused(f"duplicate key {_short(key.value)}{_at(key.start_mark)} (first at line"
                                   f" {first.line + 1}; YAML would silently keep only the last)")
                seen[(key.tag, key.value)] = key.start_mark
        return node


class BoundedLoader(_BoundedComposer, _Parser, SafeConstructor, Resolver):
    """A safe loader with the limits above (libyaml events, Python composer and constructor)."""

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        _BoundedComposer.__init__(self)


def _load_single(text: str) -> Any:
    """`yaml.safe_load` with the bounded composer: the same steps as yaml.load, with SafeConstructor
    (plain data only, no Python objects), but the loader class is ours."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document within the limits; any problem is a one-line UserError naming `source`."""
    try:
        return _load_single(text)
    except _Refused as exc:
        raise UserError(f"{source}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or exc.context or "malformed YAML"
        raise UserError(f"{source}: YAML syntax error{_at(exc.problem_mark)}: {_one_line(problem)}") from None
    except yaml.reader.ReaderError as exc:
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise UserError(f"{source}: character {char} at offset {exc.position} is not allowed in YAML"
                        f" ({exc.reason})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: YAML syntax error: {_one_line(str(exc))}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a constructor's own: 2001-13-99, a 5000-digit int
        raise UserError(f"{source}: YAML value cannot be read: {_one_line(str(exc))}") from None
    except RecursionError:  # not expected with MAX_DEPTH; kept so that it can never be a traceback
        raise UserError(f"{source}: nested too deeply") from None


def read_text(path: Path) -> str:
    """The file's text: at most MAX_BYTES, UTF-8 (a UTF-8 or UTF-16 byte-order mark is honoured)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the spec file ({exc.strerror or exc})") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{path}: larger than the {MAX_BYTES / 2**20:g} MiB limit for a spec file"
                        " (large data belongs in a file that a component reads, not in the spec)")
    encoding = "utf-16" if data.startswith(_UTF16_BOMS) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        what = "UTF-16" if encoding == "utf-16" else "UTF-8"
        raise UserError(f"{path}: not {what} text (byte 0x{data[exc.start]:02x} at offset {exc.start});"
                        " save the spec as UTF-8") from None


def _short(value: str, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
