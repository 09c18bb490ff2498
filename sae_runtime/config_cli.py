"""Command lines generated from a pydantic config model (``sae-serve``, ``sae-train``).

Each field of the model (and of a nested model, e.g. ``ServeConfig.engine``, flattened: its
fields become top-level flags) is one option, reachable three ways:

- a flag, ``--field-name`` (``--max-model-len``), unless :class:`Option` gives it another name;
- an environment variable, ``PREFIX`` + the field name in capitals (``SAE_SERVE_MAX_MODEL_LEN``);
- a key of the ``--config`` file, as the model nests it (``engine: {max_model_len: 1024}``).

Precedence: flag > environment variable > config file > the model's default. ``--help``
shows each option with the field's description and default: the text lives once, in the
model. Values are converted the same way from a flag and from a variable (``none``/``null``
clears an optional field; lists are repeated flags or ``a,b`` in a variable; booleans are
``--flag``/``--no-flag`` or ``1/0, true/false, yes/no, on/off``), and the merged values are
validated once by the model; an error names the flag, variable or file key it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

NONE_WORDS = ("none", "null")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names where it came from."""


@dataclasses.dataclass(frozen=True)
class Option:
    """How one field deviates from the generated defaults (all optional)."""

    flag: str | None = None          # the flag, e.g. "--eager" for enforce_eager
    aliases: tuple[str, ...] = ()    # more flags for the same field
    metavar: str | None = None
    repeat: bool = False             # a list field as a repeatable flag (--dictionary A --dictionary B)
    accumulate: bool = False         # flag and variable values add up (and replace the file's)
    none_words: tuple[str, ...] = NONE_WORDS  # values that mean None for an optional field
    default_text: str | None = None  # what --help shows as the default


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One generated option: the field's path in the model and its flag and variable."""

    path: tuple[str, ...]
    name: str                        # the field's own name (unique over the flattened model)
    flag: str
    env: str
    kind: str                        # scalar, bool, list, dict
    convert: Any                     # str -> value (one item for a list)
    option: Option
    description: str
    default: Any
    choices: tuple[Any, ...] | None = None

    @property
    def dest(self) -> str:
        return "cfg__" + self.name


def _unwrap_optional(ann: Any) -> tuple[Any, bool]:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else ann), True
    return ann, False


def _scalar(kind: Any, optional: bool, none_words: tuple[str, ...]) -> Any:
    if kind is SecretStr:
        kind = str
    base = kind if kind in (int, float, str) else str

    def convert(text: str) -> Any:
        if optional and text.strip().lower() in none_words:
            return None
        return base(text)

    convert.__name__ = base.__name__  # argparse: "invalid int value: 'x'"
    return convert


def _boolean(text: str) -> bool:
    low = text.strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}")


_boolean.__name__ = "boolean"


def field_specs(model: type[BaseModel], env_prefix: str,
                options: Mapping[str, Option] | None = None) -> list[FieldSpec]:
    """Every leaf field of ``model`` with its flag and variable; nested models are flattened."""
    options = dict(options or {})
    specs: list[FieldSpec] = []

    def walk(m: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, field in m.model_fields.items():
            ann, optional = _unwrap_optional(field.annotation)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, (*prefix, name))
                continue
            opt = options.pop(name, Option())
            origin, args = typing.get_origin(ann), typing.get_args(ann)
            choices = None
            if ann is bool:
                kind, convert = "bool", _boolean
            elif origin is list:
                kind, convert = "list", _scalar(args[0], False, ())
            elif origin is dict:
                kind, convert = "dict", _scalar(args[1], False, ())
            elif origin is typing.Literal:
                kind, choices = "scalar", args
                convert = _scalar(type(args[0]), optional, opt.none_words)
            else:
                kind, convert = "scalar", _scalar(ann, optional, opt.none_words)
            specs.append(FieldSpec(
                path=(*prefix, name), name=name, flag=opt.flag or "--" + name.replace("_", "-"),
                env=env_prefix + name.upper(), kind=kind, convert=convert, option=opt,
                description=field.description or "", default=field.get_default(call_default_factory=True),
                choices=choices))

    walk(model, ())
    if options:
        raise ValueError(f"options for fields that {model.__name__} does not have: {sorted(options)}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{model.__name__}: flattened field names repeat: {names}")
    return specs


def _default_text(spec: FieldSpec) -> str:
    if spec.option.default_text is not None:
        return spec.option.default_text
    value = spec.default
    if value is None or value == [] or value == {}:
        return "unset"
    if value == "":
        return "''"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _help(spec: FieldSpec) -> str:
    text = f"{spec.description} " if spec.description else ""
    return (text + f"(default: {_default_text(spec)}; env {spec.env})").replace("%", "%%")


def add_options(parser: argparse.ArgumentParser | Any, specs: list[FieldSpec],
                groups: Mapping[tuple[str, ...], Any] | None = None) -> None:
    """Add one argument per spec (into ``groups[spec.path[:-1]]`` when given)."""
    for spec in specs:
        target = (groups or {}).get(spec.path[:-1], parser)
        flags = [spec.flag, *spec.option.aliases]
        common: dict[str, Any] = dict(dest=spec.dest, help=_help(spec), default=argparse.SUPPRESS)
        if spec.kind == "bool":
            target.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif spec.kind == "list":
            metavar = spec.option.metavar or spec.convert.__name__.upper()
            if spec.option.repeat:
                target.add_argument(*flags, action="append", type=spec.convert, metavar=metavar, **common)
            else:
                target.add_argument(*flags, nargs="+", type=spec.convert, metavar=metavar, **common)
        elif spec.kind == "dict":
            target.add_argument(*flags, action="append", type=_pair(spec.convert),
                                metavar=spec.option.metavar or "KEY=VALUE", **common)
        else:
            target.add_argument(
                *flags,
                type=spec.convert,
                choices=spec.choices,
                metavar=spec.option.metavar or (None if spec.choices else spec.convert.__name__.upper()),
                **common,
            )


def _pair(convert: Any) -> Any:
    def parse(text: str) -> tuple[str, Any]:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ValueError("expected KEY=VALUE")
        return key.strip(), convert(value)

    parse.__name__ = "KEY=VALUE"
    return parse


def _from_env(spec: FieldSpec, text: str) -> Any:
    try:
        if spec.kind == "bool":
            return _boolean(text)
        if spec.kind == "list":
            return [spec.convert(item.strip()) for item in text.split(",") if item.strip()]
        if spec.kind == "dict":
            return dict(_pair(spec.convert)(item) for item in text.split(",") if item.strip())
        value = spec.convert(text)
    except ValueError as exc:  # never echo the value: it may be a secret
        raise ConfigError(f"{spec.env}: invalid {spec.convert.__name__} value ({exc.__class__.__name__})") from None
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{spec.env}: invalid choice {value!r} (choose from {', '.join(map(str, spec.choices))})")
    return value


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[path[-1]] = value


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``overrides`` into ``base``: ``overrides`` wins."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve(
    model: type[BaseModel],
    specs: list[FieldSpec],
    args: argparse.Namespace,
    file_values: Mapping[str, Any] | None = None,
    file_name: str | None = None,
    environ: Mapping[str, str] | None = None,
    extra: Mapping[str, list[Any]] | None = None,
) -> Any:
    """Defaults < config file < environment < flags, validated as ``model``.

    ``extra`` adds values to an ``accumulate`` field from elsewhere on the command line (a
    key file). Raises :class:`ConfigError` naming the flag, variable or file key at fault.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = dict(file_values or {})
    origin: dict[tuple[str, ...], str] = {}
    for spec in specs:
        has_env = bool(environ.get(spec.env, "").strip())
        from_cli = getattr(args, spec.dest, None)
        if spec.kind == "dict" and from_cli is not None:
            from_cli = dict(from_cli)
        if spec.option.accumulate:
            from_env = _from_env(spec, environ[spec.env]) if has_env else None
            items = [*(from_cli or []), *((extra or {}).get(spec.name) or []), *(from_env or [])]
            if items:
                _set(values, spec.path, list(dict.fromkeys(items)))
                origin[spec.path] = f"{spec.flag} / {spec.env}"
            continue
        if hasattr(args, spec.dest):
            _set(values, spec.path, from_cli)
            origin[spec.path] = spec.flag
        elif has_env:  # a variable the flag overrides is not read at all
            _set(values, spec.path, _from_env(spec, environ[spec.env]))
            origin[spec.path] = spec.env
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, specs, origin, file_name)) from None


def describe_errors(
    exc: ValidationError, specs: list[FieldSpec], origin: Mapping[tuple[str, ...], str], file_name: str | None
) -> str:
    """One clause per error, naming the flag (or variable, or file key) the value came from."""
    by_path = {s.path: s for s in specs}
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = tuple(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        path = next((loc[:i] for i in range(len(loc), 0, -1) if loc[:i] in by_path), None)
        if not loc:
            where = ""
        elif path is not None and path in origin:
            where = f"{origin[path]}: "
        elif path is not None:
            where = f"{'.'.join(loc)}{f' ({file_name})' if file_name else ''}: "
        else:  # a key the model does not have (from the file)
            where = f"{'.'.join(loc)}{f' in {file_name}' if file_name else ''}: "
        parts.append(where + msg)
    return "; ".join(parts)
