"""Loading typed configs from YAML with environment overrides and one-line errors.

Every service has one pydantic model for its config (``extra="forbid"``, so a misspelt key is
an error, not a silent default). :func:`load_config` reads a YAML file, applies environment
overrides and validates; any problem becomes a :class:`~gptfl.errors.ConfigError` whose
message is one line naming the file and the key, e.g.::

    silo.yaml: reconnect.max_backoff_s: Input should be greater than 0 (got -3)

Environment overrides use a prefix and ``__`` between nested keys, values parsed as YAML:
``GPTFL_SILO__RECONNECT__MAX_BACKOFF_S=10`` sets ``reconnect.max_backoff_s``.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import pydantic_core
import yaml

from gptfl.errors import ConfigError

M = TypeVar("M", bound=pydantic.BaseModel)

#: the error type of a bool given for a number (its location is the model's; ``ctx`` names
#: the key)
_BOOL_FOR_NUMBER = "bool_for_number"
#: the error type a union keyed on ``name`` reports for a name it does not know (its
#: location is the union's; the message names the key)
UNKNOWN_NAME = "unknown_name"


class StrictModel(pydantic.BaseModel):
    """Base for config models: unknown keys are errors and instances are immutable.

    Numbers are checked more strictly than pydantic's defaults: ``.inf`` and ``.nan`` are
    refused (a deadline of infinity overflows the int64 milliseconds on the wire), and so
    are ``true``/``false`` where a number is expected (pydantic would read them as 1 and 0).
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data: Any) -> Any:
        # A model validator, not a field validator for "*": pydantic refuses a before
        # validator on the ``kind`` field that discriminates the data sources.
        if not isinstance(data, Mapping):
            return data
        for key, value in data.items():
            field = cls.model_fields.get(key) if isinstance(key, str) else None
            if isinstance(value, bool) and field is not None and _wants_a_number(field.annotation):
                raise pydantic_core.PydanticCustomError(
                    _BOOL_FOR_NUMBER,
                    "Input should be a number, not true or false",
                    {"key": key, "value": value},
                )
        return data


def _wants_a_number(annotation: Any) -> bool:
    """Whether a field typed ``annotation`` takes a number but not a bool."""
    members = _members(annotation)
    return bool(members & {int, float}) and not members & {bool, Any}


def _members(annotation: Any) -> set[Any]:
    """The types a field annotation admits, with unions and ``Annotated`` taken apart."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return set().union(*(_members(arg) for arg in typing.get_args(annotation)))
    return {annotation}


def format_validation_error(
    error: pydantic.ValidationError, *, source: str, data: Any = None
) -> str:
    """Turns pydantic's multi-line report into one line naming the first bad key.

    With ``data`` (what was validated), the labels pydantic adds for union members (a
    discriminator value such as ``npz``, or ``float``) are left out of the key path, so the
    message names only keys that are in the file.
    """
    first = error.errors()[0]
    loc = tuple(first["loc"])
    ctx = first.get("ctx") or {}
    if first["type"] == _BOOL_FOR_NUMBER:
        loc = (*loc, ctx["key"])
    if first["type"] == UNKNOWN_NAME and isinstance(first.get("input"), Mapping):
        loc = (*loc, "name")
    member = None
    if data is not None:
        loc, member = _key_path(loc, data, missing=first["type"] == "missing")
    key = ".".join(str(part) for part in loc) or "<root>"
    if first["type"] == "extra_forbidden":
        # In a union keyed on a name (strategy, data source), say whose settings these are.
        detail = "unknown key" + (f" for {member!r}" if member is not None else "")
    elif first["type"] == "missing":
        detail = "required key is missing"
    elif not loc or first["type"] == "value_error":
        # A rule across keys (a model validator): its message says what is wrong; echoing
        # the whole input would bury it.
        detail = str(first["msg"]).removeprefix("Value error, ")
    elif first["type"] == _BOOL_FOR_NUMBER:
        detail = f"{first['msg']} (got {ctx['value']!r})"
    elif first["type"] == UNKNOWN_NAME and isinstance(first.get("input"), Mapping):
        detail = f"{first['msg']} (got {first['input'].get('name')!r})"
    else:
        detail = f"{first['msg']} (got {first.get('input')!r})"
    more = len(error.errors()) - 1
    suffix = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {key}: {detail}{suffix}"


def _key_path(
    loc: tuple[int | str, ...], data: Any, *, missing: bool
) -> tuple[tuple[int | str, ...], str | None]:
    """``loc`` without the union-member labels: only the parts that walk through ``data``;
    and the union member the error is in, by the ``name`` or ``kind`` its mapping gives.

    ``missing``: the error is a required key that is missing, so the last part of ``loc``
    names a key that is not in ``data``; otherwise a last part not in ``data`` is a label
    (e.g. the discriminator value a model validator of a union member reports under).
    """
    path: list[int | str] = []
    member: str | None = None
    node = data
    for i, part in enumerate(loc):
        in_mapping = isinstance(node, Mapping) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_mapping or in_list:
            node = node[part]
        elif missing and isinstance(node, Mapping) and i == len(loc) - 1:
            pass  # the missing key: not in the data, but it is the key to name
        elif isinstance(node, Mapping | list):
            # a union member's label (e.g. the discriminator value)
            if isinstance(node, Mapping) and i < len(loc) - 1:
                member = str(node.get("name", node.get("kind", part)))
            continue
        else:
            break  # below a scalar only union labels remain
        path.append(part)
    return tuple(path), member


def parse_config(model: type[M], data: Any, *, source: str) -> M:
    """Validates already-parsed data (a dict) against ``model``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return model.model_validate(dict(data))
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source, data=data)) from None


def parse_yaml_text(text: str, *, source: str) -> Any:
    """Parses YAML, turning syntax errors into a one-line :class:`ConfigError`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}:{where}: invalid YAML: {problem}") from None


def apply_env_overrides(
    data: dict[str, Any], *, prefix: str, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Returns a copy of ``data`` with ``PREFIX__A__B=value`` variables applied as ``a.b``."""
    environ = os.environ if environ is None else environ
    result: dict[str, Any] = _deep_copy(data)
    marker = prefix + "__"
    for name, raw in sorted(environ.items()):
        if not name.startswith(marker):
            continue
        path = [part.lower() for part in name[len(marker) :].split("__") if part]
        if not path:
            continue
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = parse_yaml_text(raw, source=f"${name}")
    return result


def load_config(
    model: type[M],
    path: str | Path,
    *,
    env_prefix: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> M:
    """Reads ``path`` (YAML), applies ``env_prefix`` overrides, then ``overrides`` (e.g. from
    command-line flags), and validates the result against ``model``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    data = parse_yaml_text(text, source=path.name) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping at the top level")
    if env_prefix:
        data = apply_env_overrides(data, prefix=env_prefix)
    if overrides:
        data = {**data, **overrides}
    config = parse_config(model, data, source=path.name)
    return _resolve_paths(config, base=path.resolve().parent)


def resolve_path(path: Path, base: Path) -> Path:
    """``path`` as given when absolute, else relative to ``base`` (the config file's folder)."""
    return path if path.is_absolute() else base / path


def _resolve_paths(config: M, *, base: Path) -> M:
    """Makes relative ``Path`` fields absolute against the config file's folder."""
    hook = getattr(config, "resolve_paths", None)
    if callable(hook):
        resolved = hook(base)
        assert isinstance(resolved, type(config))
        return resolved
    return config


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}
