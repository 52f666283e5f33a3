"""The strict-YAML loader: config dataclasses from defaults, YAML files and dotted overrides.

A config is resolved from layers, each on top of the one before:

    dataclass defaults < algorithm preset (RLVR) < YAML file < `data` mapping < `key.sub=value` overrides

Mappings merge key by key; any other value (scalar, list) replaces what was below it. A nested section
given partially (`optim: {lr: 2e-5}`) starts from the *stage's* default for that section, not from the
section class's defaults, so SFT keeps its cosine schedule and warm-up when only the lr changes.

Every key path remembers where it came from (`configs/x.yaml:12`, `override 'optim.lr=-1'`,
`RLVR preset 'dapo'`), so any mistake (unknown key, wrong type, value out of range in a `__post_init__`)
ends in one line naming that place and the field:

    configs/x.yaml:12: field 'optim.lr': expected a float > 0, got -1

The config classes themselves (the stage schemas and their shared sections) live in prism.config.stages and
prism.config.sections; this module knows nothing about stages.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from prism.atomic_io import atomic_write_text

__all__ = [
    "ConfigError",
    "FieldError",
    "YamlMapping",
    "read_yaml",
    "parse_override",
    "load_config",
    "deep_merge",
    "config_to_dict",
    "config_hash",
    "write_config_yaml",
    "check",
    "check_range",
    "check_choice",
    "check_nonempty",
    "check_types",
]


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A user mistake in a config: one line naming the file:line (or the override) and the field."""


def _show(value: Any, limit: int = 60) -> str:
    """A value as the user would have written it in YAML, shortened."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        # -1.0 reads better as -1: the user wrote `lr: -1`.
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (str, PurePath)):
        text = str(value)
        return repr(text if len(text) <= limit else text[: limit - 3] + "...")
    try:
        text = json.dumps(_plain(value), default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    names = {bool: "a bool", int: "an int", float: "a float", str: "a string", list: "a list",
             tuple: "a list", dict: "a mapping", type(None): "null"}
    return names.get(type(value), "a mapping" if isinstance(value, Mapping) else f"a {type(value).__name__}")


class FieldError(ValueError):
    """An invalid field value, raised by `__post_init__`s and by the type checks.

    `field` is a path relative to the dataclass that raised it (`lr`, `betas[1]`, `optim.lr`); the
    loader prefixes the nested path and adds the file:line. `related` names other fields the check
    depends on, so a cross-field error on a defaulted field can still point at the line that caused it.
    """

    def __init__(self, field: str, expected: str, got: Any, *, related: Sequence[str] = (), hint: str | None = None):
        self.field = field
        self.expected = expected
        self.got = got
        self.related = tuple(related)
        self.hint = hint
        super().__init__(f"field '{field}': {self.detail}")

    @property
    def detail(self) -> str:
        text = f"expected {self.expected}, got {self._got_text()}"
        return f"{text}; {self.hint}" if self.hint else text

    def _got_text(self) -> str:
        return _show(self.got)

    def at(self, prefix: str) -> FieldError:
        """The same error seen from an enclosing config whose field `prefix` holds this one."""
        if not prefix:
            return self
        moved = type(self).__new__(type(self))  # copy.copy would re-run __init__ with args=(message,)
        moved.__dict__.update(self.__dict__)
        moved.field = _join(prefix, self.field)
        moved.related = tuple(_join(prefix, name) for name in self.related)
        moved.args = (f"field '{moved.field}': {moved.detail}",)
        return moved


class _TypeMismatch(FieldError):
    def _got_text(self) -> str:
        return f"{_show(self.got)} ({_kind(self.got)})"


class _UnknownKey(FieldError):
    @property
    def detail(self) -> str:
        return self.expected  # the whole explanation: valid keys and a suggestion


class _MissingField(FieldError):
    @property
    def detail(self) -> str:
        return "required, but not set"


def _did_you_mean(word: str, options: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


# ----------------------------------------------------------------------------------------------------
# Validation helpers for __post_init__ (generic: any dataclass may use them)
# ----------------------------------------------------------------------------------------------------


def check(condition: bool, field: str, expected: str, got: Any, *, related: Sequence[str] = ()) -> None:
    """Raise FieldError(field, expected, got) unless `condition`; the one-liner for cross-field rules."""
    if not condition:
        raise FieldError(field, expected, got, related=related)


def _resolve(obj: Any, name: str) -> tuple[Any, str, Any]:
    """`name` may be dotted (`optim.lr`): returns (owner object, attribute, value)."""
    *parents, attr = name.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return obj, attr, getattr(obj, attr)


def _number_kind(owner: Any, attr: str, value: Any) -> str:
    hint = _hints(type(owner)).get(attr) if dataclasses.is_dataclass(owner) else None
    options = [a for a in get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    if options == [int] or (hint is None and isinstance(value, int)):
        return "an int"
    if options == [float] or (hint is None and isinstance(value, float)):
        return "a float"
    return "a number"


def check_range(
    obj: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Check low <= obj.name <= high (bounds optional, inclusive by default); None values pass (= off)."""
    owner, attr, value = _resolve(obj, name)
    if value is None:
        return
    kind = _number_kind(owner, attr, value)
    if low is not None and high is not None:
        expected = f"{kind} in {'[' if low_inclusive else '('}{_show(low)}, {_show(high)}{']' if high_inclusive else ')'}"
    elif low is not None:
        expected = f"{kind} {'>=' if low_inclusive else '>'} {_show(low)}"
    elif high is not None:
        expected = f"{kind} {'<=' if high_inclusive else '<'} {_show(high)}"
    else:
        expected = kind
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _TypeMismatch(name, expected, value)
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    # NaN fails every comparison, so it is caught by the explicit check.
    if too_low or too_high or value != value:
        raise FieldError(name, expected, value)


def check_choice(obj: Any, name: str, choices: Sequence[Any]) -> None:
    """Check obj.name is one of `choices` (for a list value: each item is), with a suggestion."""
    _, _, value = _resolve(obj, name)
    is_list = isinstance(value, (list, tuple))
    shown = ", ".join(_show(c) for c in choices)
    for index, item in enumerate(value if is_list else [value]):
        if item not in choices:
            strings = [c for c in choices if isinstance(c, str)]
            hint = _did_you_mean(item, strings) if isinstance(item, str) else None
            raise FieldError(f"{name}[{index}]" if is_list else name, f"one of {shown}", item, hint=hint)


def check_nonempty(obj: Any, name: str) -> None:
    """Check a string (or list) field is not empty; None passes (an optional field left unset)."""
    _, _, value = _resolve(obj, name)
    if value is not None and len(value) == 0:
        raise FieldError(name, "a non-empty value", value)


def check_types(obj: Any) -> None:
    """Check (and normalise: int -> float, list -> tuple, str -> Path) every field of a dataclass
    against its annotation, so configs built in Python are as strict as loaded ones and hash the same."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        # A section given as a mapping starts from the field's default (only then is it worth building).
        default = _field_default(f) if isinstance(value, Mapping) else dataclasses.MISSING
        coerced = _coerce(hints[f.name], value, f.name, default)
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)


# ----------------------------------------------------------------------------------------------------
# Types: strict conversion of YAML values to annotated field types
# ----------------------------------------------------------------------------------------------------

# PyYAML implements YAML 1.1, where a float needs a dot and a signed exponent: `1e-5` and `1.0e5` load
# as strings. Every config has learning rates written that way, so they are floats here (YAML 1.2).
_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _name(tp: Any) -> str:
    """Short type name inside a container description."""
    simple = {int: "int", float: "float", bool: "bool", str: "string", Path: "path", type(None): "null"}
    if tp in simple:
        return simple[tp]
    if dataclasses.is_dataclass(tp):
        return f"{tp.__name__} mappings"
    return _describe(tp)


def _describe(tp: Any) -> str:
    """What a user must write for a field of type `tp`, e.g. 'a float or null'."""
    simple = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string",
              Path: "a path (string)", type(None): "null", Any: "any value"}
    if tp in simple:
        return simple[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if _is_union(tp):
        options = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(options + (["null"] if type(None) in args else []))
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {_name(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} items ({', '.join(_name(a) for a in args)})"
    if origin is dict:
        return f"a mapping of string to {_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str, default: Any = dataclasses.MISSING) -> Any:
    """`value` as type `tp`, or FieldError at `path`. Returns `value` itself when nothing changes."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)

    if _is_union(tp):
        options = [a for a in args if a is not type(None)]
        if value is None:
            if len(options) < len(args):
                return None
            raise _TypeMismatch(path, _describe(tp), value)
        if len(options) == 1:  # X | None: X's own, more precise errors
            return _coerce(options[0], value, path, default)
        for option in options:
            try:
                return _coerce(option, value, path, default)
            except FieldError:
                continue
        raise _TypeMismatch(path, _describe(tp), value)

    if origin is Literal:
        for option in args:
            if type(value) is type(option) and value == option:
                return value
        if value is False and "no" in args:  # YAML 1.1 reads an unquoted `no` as false (`mixed_precision=no`)
            return "no"
        strings = [a for a in args if isinstance(a, str)]
        hint = _did_you_mean(value, strings) if isinstance(value, str) else None
        raise FieldError(path, _describe(tp), value, hint=hint)

    if tp is bool:
        if type(value) is bool:
            return value
        raise _TypeMismatch(path, _describe(tp), value)
    if tp is int:
        if isinstance(value, bool):
            raise _TypeMismatch(path, _describe(tp), value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # `steps: 1e3`
            return int(value)
        raise _TypeMismatch(path, _describe(tp), value)
    if tp is float:
        if isinstance(value, bool):
            raise _TypeMismatch(path, _describe(tp), value)
        if isinstance(value, float):
            return value
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):  # from a YAML 1.1 reader elsewhere
            return float(value.strip().replace("_", ""))
        raise _TypeMismatch(path, _describe(tp), value)
    if tp is str:
        if isinstance(value, str):
            return value
        hint = "quote it to keep it a string" if isinstance(value, (bool, int, float)) else None
        raise _TypeMismatch(path, _describe(tp), value, hint=hint)
    if tp is Path:
        if isinstance(value, Path):
            return value
        if isinstance(value, (str, PurePath)) and str(value):
            return Path(value)
        raise _TypeMismatch(path, _describe(tp), value)

    if origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch(path, _describe(tp), value)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise FieldError(path, _describe(tp), value)
            items = [_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        result = list(items) if origin is list else tuple(items)
        same = type(value) is type(result) and all(a is b for a, b in zip(items, value))
        return value if same else result
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _TypeMismatch(path, _describe(tp), value)
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _TypeMismatch(_join(path, str(key)), "a string key", key)
            result[key] = _coerce(args[1], item, _join(path, key))
        same = type(value) is dict and all(result[k] is value[k] for k in value)
        return value if same else result

    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, path, base=default if isinstance(default, tp) else None)
        raise _TypeMismatch(path, _describe(tp), value)

    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError(f"config field '{path}': unsupported annotation {tp!r}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _build(cls: type, raw: Mapping, path: str, base: Any = None) -> Any:
    """Instantiate dataclass `cls` from a mapping, strictly. With `base` (an instance: the enclosing
    config's default for this section), unset fields keep base's values instead of cls's defaults."""
    if not isinstance(raw, Mapping):
        raise _TypeMismatch(path, _describe(cls), raw)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            suggestion = _did_you_mean(str(key), list(fields))
            message = f"unknown key for {cls.__name__}" + (f" ({suggestion})" if suggestion else "")
            raise _UnknownKey(_join(path, str(key)), f"{message}; valid keys: {', '.join(fields)}", key)

    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in raw:
            default = getattr(base, name) if base is not None else _field_default(f)
            kwargs[name] = _coerce(hints[name], raw[name], _join(path, name), default)
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _MissingField(_join(path, name), "a value", None)
    # Fields that describe one setting together (warm-up as a ratio or in steps): setting one of them
    # resets the others to the class defaults instead of inheriting the stage's default for them.
    if base is not None:
        for group in getattr(cls, "__config_linked__", ()):
            if any(name in raw for name in group):
                for name in group:
                    if name not in raw:
                        kwargs[name] = _field_default(fields[name])
    try:
        return cls(**kwargs)
    except FieldError as error:
        raise error.at(path) from None


# ----------------------------------------------------------------------------------------------------
# YAML with line numbers
# ----------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`1e-5` is a float) and no timestamps (a date stays a string)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Quotes every string our loader would read as a float (`"1e-5"`), so dumps round-trip."""


_Dumper.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in yaml.SafeDumper.yaml_implicit_resolvers.items()
}
_Dumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def _represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
    # Lists of scalars on one line (`betas: [0.9, 0.999]`), sections as blocks.
    flat = all(not isinstance(item, (list, dict)) for item in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)


_Dumper.add_representer(list, _represent_list)

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlMapping(dict):
    """A YAML mapping as a plain dict that also knows the line of every key path
    (`lines["rollout.temperature"] == 14`; list items as `seeds[1]`). Pass one, or a `section()` of
    one, as `load_config(..., data=...)` and errors point into its file."""

    def __init__(self, data: Mapping, file: str, lines: dict[str, int], origin: str | None = None):
        super().__init__(data)
        self.file = file
        self.lines = lines
        self.origin = origin or file  # where to point when a path has no line of its own

    def location(self, path: str) -> str | None:
        line = self.lines.get(path)
        return f"{self.file}:{line}" if line is not None else None

    def section(self, key: str) -> YamlMapping:
        """The mapping under `key`, its line numbers re-rooted."""
        value = self.get(key)
        if not isinstance(value, dict):
            where = self.location(key) or self.origin
            raise ConfigError(f"{where}: field '{key}': expected a mapping, got {_show(value)} ({_kind(value)})")
        lines = {p[len(key) + 1:]: n for p, n in self.lines.items() if p.startswith(f"{key}.")}
        return YamlMapping(value, self.file, lines, origin=self.location(key))


def _convert(node: yaml.Node, path: str, lines: dict[str, int], loader: _Loader,
             locate: Callable[[int], str], stack: tuple[int, ...] = ()) -> Any:
    """A composed YAML node as plain Python values, recording the line of each key path in `lines`."""
    line = node.start_mark.line + 1
    if id(node) in stack:
        raise ConfigError(f"{locate(line)}: recursive alias")
    stack = stack + (id(node),)
    if isinstance(node, MappingNode):
        result: dict[str, Any] = {}
        merges = []
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                raise ConfigError(f"{locate(key_line)}: keys must be plain names, got a {key_node.id}")
            key = key_node.value  # the text as written: `on:` or `1:` are names here, not bool or int
            child = _join(path, key)
            if key in result:
                raise ConfigError(f"{locate(key_line)}: field '{child}': duplicate key (first set at line {lines[child]})")
            lines[child] = key_line
            result[key] = _convert(value_node, child, lines, loader, locate, stack)
        # `<<: *defaults` merges: explicit keys win, then earlier merged mappings win over later ones.
        for merge_node in merges:
            sources = merge_node.value if isinstance(merge_node, SequenceNode) else [merge_node]
            for source in sources:
                if not isinstance(source, MappingNode):
                    raise ConfigError(f"{locate(source.start_mark.line + 1)}: '<<' needs a mapping or a list of mappings")
                merged_lines: dict[str, int] = {}
                merged = _convert(source, path, merged_lines, loader, locate, stack)
                for key, value in merged.items():
                    if key not in result:
                        result[key] = value
                        child = _join(path, key)
                        lines.update({p: n for p, n in merged_lines.items() if _within(p, child)})
        return result
    if isinstance(node, SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            lines[f"{path}[{index}]"] = item.start_mark.line + 1
            items.append(_convert(item, f"{path}[{index}]", lines, loader, locate, stack))
        return items
    return loader.construct_object(node, deep=True)


def _yaml_error(error: yaml.YAMLError, locate: Callable[[int], str]) -> ConfigError:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = locate(mark.line + 1) if mark is not None else locate(0)
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    text = "; ".join(p for p in parts if p) or str(error)
    return ConfigError(f"{where}: invalid YAML: {' '.join(text.split())}")


def _parse(text: str, locate: Callable[[int], str]) -> tuple[Any, dict[str, int], yaml.Node | None]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}, None
        lines: dict[str, int] = {}
        return _convert(node, "", lines, loader, locate), lines, node
    except yaml.YAMLError as error:
        raise _yaml_error(error, locate) from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> YamlMapping:
    """Read a YAML config file: a top-level mapping, duplicate keys rejected, lines kept."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: a folder, not a YAML config file") from None
    except UnicodeDecodeError as error:
        line = Path(path).read_bytes()[: error.start].count(b"\n") + 1
        raise ConfigError(f"{name}:{line}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{name}: cannot read config file ({error})") from None

    def locate(line: int) -> str:
        return f"{name}:{line}" if line else name

    data, lines, node = _parse(text, locate)
    if data is None:
        return YamlMapping({}, name, {})
    if not isinstance(data, dict):
        where = locate(node.start_mark.line + 1)
        raise ConfigError(f"{where}: expected a mapping of fields at the top level, got {_kind(data)}")
    return YamlMapping(data, name, lines)


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", value). The value is YAML: `1e-5`, `[1, 2]`, `{a: 1}`, `null`,
    `'quoted'`; text that is not a flow value (`a: b`) stays a string."""
    label = f"override {text!r}"
    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p or p != p.strip() for p in parts):
        raise ConfigError(f"{label}: expected key=value with a dotted key, e.g. optim.lr=1e-5")
    value, _, node = _parse(raw, lambda line: label)
    if isinstance(node, (MappingNode, SequenceNode)) and not node.flow_style:
        value = raw.strip()  # `prompt=Answer: yes` meant a string, not a mapping
    return key, value


# ----------------------------------------------------------------------------------------------------
# Layering and load_config
# ----------------------------------------------------------------------------------------------------


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(f"{root}.") or path.startswith(f"{root}[")


def _parent(path: str) -> str:
    """`a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> ``."""
    match = re.match(r"^(.*)(?:\.[^.\[]+|\[\d+\])$", path)
    return match.group(1) if match else ""


def _all_paths(value: Any, prefix: str) -> list[str]:
    paths = [prefix] if prefix else []
    if isinstance(value, Mapping):
        for key, item in value.items():
            paths += _all_paths(item, _join(prefix, str(key)))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            paths += _all_paths(item, f"{prefix}[{index}]")
    return paths


def _plain_tree(value: Any, label: str, path: str = "") -> Any:
    """A private deep copy of a user mapping (dict keys must be strings)."""
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{label}: field '{_join(path, str(key))}': keys must be strings, got {_show(key)}")
            result[key] = _plain_tree(item, label, _join(path, key))
        return result
    if isinstance(value, list):
        return [_plain_tree(item, label, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


def _overlay(dst: dict, dst_sources: dict[str, str], top: Mapping, top_sources: dict[str, str], prefix: str = "") -> None:
    """Put `top` over `dst` in place: mappings merge key by key, anything else replaces."""
    for key, value in top.items():
        path = _join(prefix, key)
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _overlay(dst[key], dst_sources, value, top_sources, path)
            if path in top_sources:
                dst_sources[path] = top_sources[path]
        else:
            for stale in [p for p in dst_sources if _within(p, path)]:
                del dst_sources[stale]
            dst[key] = copy.deepcopy(value)
            dst_sources.update({p: s for p, s in top_sources.items() if _within(p, path)})


def deep_merge(under: Mapping, over: Mapping) -> dict:
    """`over` laid on a copy of `under`: mappings merge key by key, anything else in `over` replaces."""
    merged = copy.deepcopy(dict(under))
    _overlay(merged, {}, over, {})
    return merged


T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), data: Mapping | None = None) -> T:
    """Build dataclass `cls` from defaults, an optional YAML file, an optional mapping and dotted
    overrides (in that order, later wins). Raises ConfigError with a one-line, located message."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config needs a dataclass, got {cls!r}")
    if isinstance(overrides, str):
        overrides = [overrides]
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    fallback = f"{cls.__name__} defaults"

    if path is not None:
        document = read_yaml(path)
        _overlay(tree, sources, document, {p: f"{document.file}:{n}" for p, n in document.lines.items()})
        fallback = document.file
    if data is not None:
        if isinstance(data, YamlMapping):
            data_sources = {p: f"{data.file}:{n}" for p, n in data.lines.items()}
            label = data.origin
        else:
            label = "config data"
            data = _plain_tree(data, label)
            data_sources = {p: label for p in _all_paths(data, "")}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{label}: expected a mapping of fields, got {_kind(data)}")
        _overlay(tree, sources, data, data_sources)
        fallback = label if path is None else fallback
    for text in overrides:
        key, value = parse_override(text)
        label = f"override {text!r}"
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        # Only the key and what is under it come from the override; its enclosing sections keep their lines.
        _overlay(tree, sources, nested, {p: label for p in _all_paths(value, key)})

    # A class may lay a named preset under the user's values (RLVR algorithms do).
    preset_hook = getattr(cls, "config_preset", None)
    if preset_hook is not None:
        label, preset = preset_hook(tree)
        if preset:
            under: dict[str, Any] = copy.deepcopy(preset)
            under_sources = {p: label for p in _all_paths(under, "")}
            _overlay(under, under_sources, tree, sources)
            tree, sources = under, under_sources

    try:
        return _build(cls, tree, "")
    except FieldError as error:
        # The field's own line; else a field the check depends on; else the enclosing section's.
        where = next((sources[p] for p in (error.field, *error.related) if p in sources), None)
        ancestor = error.field
        while where is None and ancestor:
            ancestor = _parent(ancestor)
            where = sources.get(ancestor)
        raise ConfigError(f"{where or fallback}: field '{error.field}': {error.detail}") from None


# ----------------------------------------------------------------------------------------------------
# Serialisation: plain dicts, content hashes, atomic YAML
# ----------------------------------------------------------------------------------------------------


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _hashed(f: dataclasses.Field, value: Any) -> bool:
    """Whether field `f` of a config holding `value` enters config_hash (see config_hash)."""
    rule = f.metadata.get("hash", True)
    return rule is not False and not (rule == "if_set" and value == _field_default(f))


def _plain(value: Any, for_hash: bool = False) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), for_hash)
            for f in dataclasses.fields(value)
            if f.init and not (for_hash and not _hashed(f, getattr(value, f.name)))
        }
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, for_hash) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, for_hash) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict:
    """Every init field, nested configs as dicts, tuples as lists, paths as strings: JSON-able."""
    return _plain(cfg)


def config_hash(cfg: Any) -> str:
    """First 12 hex chars of the sha256 of the canonical JSON of a config (or a mapping holding
    configs). Fields marked `metadata={"hash": False}` (where outputs go, how often to log or save)
    are left out: they do not change what a stage computes, so they must not change its directory. Fields marked
    `{"hash": "if_set"}` (added after runs existed) count only when set to another value than their default, so
    adding one leaves every existing stage directory's hash as it was."""
    canonical = json.dumps(_plain(cfg, for_hash=True), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) of every field of a config dataclass, nested sections flattened: what
    `prism train STAGE --help` lists."""
    rows = []
    for f in dataclasses.fields(cls):
        tp, key = _hints(cls)[f.name], _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, key)
            continue
        default = _field_default(f)
        shown = "required" if default is dataclasses.MISSING else _show(_plain(default), limit=40)
        rows.append((key, shown, f.metadata.get("help", _describe(tp))))
    return rows


def write_config_yaml(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML that `load_config` reads back to an equal object; atomically
    (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    header = f"# {type(cfg).__name__} (config_hash {config_hash(cfg)})\n" if dataclasses.is_dataclass(cfg) else ""
    body = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)
    atomic_write_text(path, header + body)
    return path
