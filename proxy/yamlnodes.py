"""A YAML reader that keeps where every value came from, and the errors that say so.

The YAML is composed into nodes rather than loaded into plain Python values, so each
value still knows its line and column. :class:`Reader` walks those nodes: it converts
values (strings, paths, durations, sizes, lists, choices), checks mappings for
duplicate and unknown keys (with a "did you mean" hint), and collects every problem as
a :class:`ConfigError` (``FILE:LINE:COL: message``, 1-based) instead of stopping at
the first, so one ``check-config`` run shows everything that needs fixing. It knows
nothing of trackproxy's keys: ``config`` says what each section holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, cast

import attrs
import yaml

from proxy.values import parse_duration, parse_size


@attrs.frozen
class Located:
    """A message about a place in a file (1-based line and column)."""

    file: str
    line: int
    column: int
    message: str


@attrs.frozen
class ConfigError(Located):
    """One problem in a configuration file, with where it is."""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class ConfigErrors(Exception):
    """A configuration file was refused; ``errors`` says every reason."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


@attrs.frozen
class Warning_(Located):
    """Something allowed but worth an operator's attention (e.g. plain-HTTP upstream)."""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: warning: {self.message}"


class Reader:
    """Walks the composed YAML, converting values and collecting every error."""

    def __init__(self, path: str, base_dir: str) -> None:
        self.path = path
        self.base_dir = base_dir
        self.errors: list[ConfigError] = []
        self.warnings: list[Warning_] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def _where(self, node: yaml.Node | None) -> tuple[int, int]:
        if node is None:
            return 1, 1
        return node.start_mark.line + 1, node.start_mark.column + 1

    def error(self, node: yaml.Node | None, message: str) -> None:
        self.errors.append(ConfigError(self.path, *self._where(node), message))

    def warn(self, node: yaml.Node | None, message: str) -> None:
        self.warnings.append(Warning_(self.path, *self._where(node), message))

    def scalar(self, node: yaml.Node) -> Any:
        if node.tag == "tag:yaml.org,2002:str" and isinstance(node, yaml.ScalarNode):
            return node.value  # most values are strings: no constructor round trip
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as e:
            problem = getattr(e, "problem", None) or str(e)
            raise self._fail(node, f"cannot read this value: {problem}")

    def mapping(
        self, node: yaml.Node, what: str, allowed: Iterable[str] | None = None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """A mapping's entries by key, with duplicate and unknown keys reported."""
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping")
            return None
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        allowed_set = set(allowed) if allowed is not None else None
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.error(key_node, f"{what}: YAML merge keys (<<) are not supported; write the keys out")
                continue
            try:
                key = self.scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            except Reported:
                continue
            if not isinstance(key, str):
                self.error(key_node, f"{what}: keys must be strings")
                continue
            if key in entries:
                self.error(key_node, f"{what}: duplicate key {key!r}")
                continue
            if allowed_set is not None and key not in allowed_set:
                hint = closest(key, allowed_set)
                self.error(
                    key_node,
                    f"{what}: unknown key {key!r}"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                    + f"; allowed: {', '.join(sorted(allowed_set))}",
                )
                continue
            entries[key] = (key_node, value_node)
        return entries

    def value(
        self,
        entries: dict[str, tuple[yaml.Node, yaml.Node]] | None,
        key: str,
        what: str,
        convert: Callable[[yaml.Node, str], Any],
        default: Any,
    ) -> Any:
        """Convert ``entries[key]`` or return ``default``; on error report and default."""
        if not entries or key not in entries:
            return default
        node = entries[key][1]
        try:
            return convert(node, f"{what}.{key}")
        except Reported:
            return default

    # Converters: each takes (node, what) and either returns or reports and raises.

    def _fail(self, node: yaml.Node, message: str) -> Reported:
        self.error(node, message)
        return Reported()

    def as_string(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str) or not value:
            raise self._fail(node, f"{what} must be a non-empty string")
        return value

    def as_optional_string(self, node: yaml.Node, what: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        return self.as_string(node, what)

    def as_path(self, node: yaml.Node, what: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, self.as_string(node, what)))

    def as_optional_existing_file(self, node: yaml.Node, what: str) -> str | None:
        if self.as_optional_string(node, what) is None:
            return None
        path = self.as_path(node, what)
        if not os.path.isfile(path):
            raise self._fail(node, f"{what}: no such file {path!r}")
        return path

    def as_optional_ca_file(self, node: yaml.Node, what: str) -> str | None:
        """A CA bundle: an existing, readable file holding at least one PEM certificate
        (checked here, so a bad file is a config error and not a crash at start or
        reload)."""
        path = self.as_optional_existing_file(node, what)
        if path is None:
            return None
        from cryptography import x509

        try:
            with open(path, "rb") as f:
                x509.load_pem_x509_certificates(f.read())
        except OSError as e:
            raise self._fail(node, f"{what}: cannot read {path!r}: {e.strerror or e}")
        except ValueError:
            raise self._fail(node, f"{what}: {path!r} holds no PEM certificate")
        return path

    def as_duration(self, node: yaml.Node, what: str) -> float:
        try:
            return parse_duration(self._plain(node, what))
        except ValueError as e:
            raise self._fail(node, f"{what}: {e}")

    def as_positive_duration(self, node: yaml.Node, what: str) -> float:
        seconds = self.as_duration(node, what)
        if seconds <= 0:
            raise self._fail(node, f"{what} must be more than 0")
        return seconds

    def as_cache_ttl(self, node: yaml.Node, what: str) -> float:
        seconds = self.as_duration(node, what)
        if 0 < seconds < 1:
            # Below a second the cache absorbs nothing useful, and counts still inflate.
            raise self._fail(node, f"{what}: use 0 to turn the cache off, or at least 1s")
        return seconds

    def as_size(self, node: yaml.Node, what: str) -> int:
        try:
            size = parse_size(self._plain(node, what))
        except ValueError as e:
            raise self._fail(node, f"{what}: {e}")
        if size <= 0:
            raise self._fail(node, f"{what} must be more than 0")
        return size

    def as_positive_int(self, node: yaml.Node, what: str) -> int:
        value = self._plain(node, what)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self._fail(node, f"{what} must be a whole number of at least 1")
        return value

    def as_choice(self, choices: tuple[str, ...]) -> Callable[[yaml.Node, str], str]:
        def convert(node: yaml.Node, what: str) -> str:
            value = self._plain(node, what)
            if value not in choices:
                raise self._fail(node, f"{what} must be one of: {', '.join(choices)}")
            return cast(str, value)  # one of the choices

        return convert

    def as_list(
        self, item: Callable[[yaml.Node, str], Any], allow_scalar: bool = False
    ) -> Callable[[yaml.Node, str], tuple[Any, ...]]:
        def convert(node: yaml.Node, what: str) -> tuple[Any, ...]:
            if allow_scalar and isinstance(node, yaml.ScalarNode) and not node.tag.endswith(":null"):
                return (item(node, what),)
            if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
                return ()
            if not isinstance(node, yaml.SequenceNode):
                raise self._fail(node, f"{what} must be a list")
            results = []
            failed = False
            for i, child in enumerate(node.value):
                try:
                    results.append(item(child, f"{what}[{i}]"))
                except Reported:
                    failed = True
            if failed:
                raise Reported()
            return tuple(results)

        return convert

    def _plain(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self._fail(node, f"{what} must be a single value")
        return self.scalar(node)


class Reported(Exception):
    """An error was already recorded for this node; unwind to the next value."""


def closest(word: str, candidates: Iterable[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.7)
    return matches[0] if matches else None


#: libyaml when PyYAML has it: a 10,000-domain file composes in a fraction of the time.
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)


def compose(text: str) -> yaml.Node | None:
    """The YAML's node tree, with positions. A file libyaml refuses is composed again by
    the pure-Python loader, whose messages (and positions) are the ones documented."""
    if _FAST_LOADER is not None:
        try:
            return yaml.compose(text, Loader=_FAST_LOADER)
        except yaml.YAMLError:
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)
