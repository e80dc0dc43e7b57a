"""YAML loading with the interpolations users know from Modalities, and strict key checking.

Supported inside string values: `${node_env:num_cpus}` (usable CPUs of this process) and `${env:VAR}`
(an environment variable; `${env:VAR,default}` gives a default). A value that is exactly one
interpolation takes the interpolated type: an int for num_cpus; for `${env:...}` the type of the key it
sets (`steps: ${env:STEPS}` is an int, `fsdp: ${env:FSDP}` a bool, `name: ${env:RUN}` stays text even
when RUN is 007). Anything else is substituted as text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
import typing
from typing import Any, Iterable

from fastlm import usable_cpus

_INTERP = re.compile(r"\$\{([a-z_]+):([^}]*)\}")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


class Interpolated(str):
    """The text of a value that was exactly one `${env:...}`. An environment variable is text, so the
    key it sets decides what it is: `coerce_value` reads it as a YAML scalar (`50`, `true`, `3e-4`,
    `null`) for a number, bool or list key, and keeps the text for a str key (a path, a run name)."""


def _interpolate_one(kind: str, arg: str, where: str) -> Any:
    if kind == "node_env":
        if arg == "num_cpus":
            return usable_cpus()
        raise ConfigError(f"{where}: unknown node_env variable {arg!r} (supported: num_cpus)")
    if kind == "env":
        name, _, default = arg.partition(",")
        value = os.environ.get(name.strip())
        if value is None:
            if _:
                return default.strip()
            raise ConfigError(f"{where}: environment variable {name.strip()!r} is not set")
        return value
    raise ConfigError(f"{where}: unknown interpolation ${{{kind}:...}} (supported: node_env, env)")


def interpolate(obj: Any, where: str = "config") -> Any:
    """Return `obj` with every `${kind:arg}` in its strings resolved."""
    if isinstance(obj, dict):
        return {k: interpolate(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, str):
        whole = _INTERP.fullmatch(obj)
        if whole:
            value = _interpolate_one(whole.group(1), whole.group(2), where)
            return Interpolated(value) if isinstance(value, str) else value
        return _INTERP.sub(lambda m: str(_interpolate_one(m.group(1), m.group(2), where)), obj)
    return obj


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping (interpolations resolved); errors name the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.load(text, Loader=_strict_loader())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except _DuplicateKey as dup:
        raise ConfigError(f"{path}:{dup.line}: the key {dup.key!r} is set twice in one section (first on "
                          f"line {dup.first_line}); YAML would keep the last silently") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty (or only comments); expected the config's sections")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return interpolate(data, str(path))


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first_line: int):
        self.key, self.line, self.first_line = key, line, first_line


_LOADER = None


def _strict_loader():
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (lines 1-based)."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class StrictLoader(yaml.SafeLoader):
            def construct_mapping(self, node, deep=False):
                seen = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`; its keys may be overridden
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise _DuplicateKey(key, line, seen[key])
                    except TypeError:  # an unhashable key: SafeLoader reports it
                        break
                    seen[key] = line
                return super().construct_mapping(node, deep=deep)

        _LOADER = StrictLoader
    return _LOADER


def check_keys(
    section: Any, allowed: Iterable[str], prefix: str, source: str, required: Iterable[str] = ()
) -> None:
    """Raise ConfigError for a section that is not a mapping, an unknown key (with "did you mean") or a
    missing required key. `prefix` is the section's dotted name ("" for the top level), `source` the
    file."""
    allowed = list(allowed)
    if not isinstance(section, dict):
        raise ConfigError(f'{source}: "{prefix}" must be a mapping, found {type(section).__name__}')
    for key in section:
        if key not in allowed:
            import difflib

            def dotted(name):  # prefix "": the top level of the file
                return f"{prefix}.{name}" if prefix else str(name)

            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f' (did you mean "{dotted(close[0])}"?)' if close else ""
            raise ConfigError(f'{source}: unknown key "{dotted(key)}"{hint}; valid keys of '
                              f'{prefix or "the top level"}: {", ".join(allowed)}')
    for key in required:
        if key not in section:
            raise ConfigError(f'{source}: missing key "{prefix + "." if prefix else ""}{key}"')


def coerce_value(value: Any, typ: Any, where: str) -> Any:
    """Check `value` against a field type: int takes ints; float takes ints, floats and numeric strings
    (YAML 1.1 reads `3e-4` as a string); bool only true/false; `X | None` also None. An `Interpolated`
    value is text read as a YAML scalar unless the key takes text."""
    if isinstance(typ, str):  # postponed annotations
        typ = {"int": int, "float": float, "bool": bool, "str": str, "list": list}.get(typ, typ)
    union = typing.get_origin(typ) is typing.Union or type(typ).__name__ == "UnionType"
    if isinstance(value, Interpolated):
        kinds = typing.get_args(typ) if union else (typ,)
        typed = str not in kinds and any(k in kinds for k in (int, float, bool, list))
        value = _yaml_scalar(value, kinds) if typed else str(value)
    if union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else coerce_value(value, args[0], where)
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is str:
        if isinstance(value, str):
            return str(value)
    elif typ is list:
        if isinstance(value, list):
            return value
    else:
        return value
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{where} must be {name}, found {value!r} ({type(value).__name__})")


def _yaml_scalar(text: str, kinds: tuple) -> Any:
    """`text` as YAML reads it, when that is a value of one of the types `kinds` (None for `X | None`);
    else the text itself, for the caller's type error to show."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return str(text)
    if value is None:
        return None if type(None) in kinds else str(text)
    return value if isinstance(value, (bool, int, float, list)) else str(text)
