"""Strict readers for user-supplied mappings: typed field access where every error names its path.

Used for opaque claim config and simulated-profile files. Unknown keys are errors, not silently
dropped, because a misspelt field that does nothing is worse than a refusal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from driver.errors import ConfigError

_T = TypeVar("_T")
_MISSING: Any = object()


def type_name(value: object) -> str:
    """Name a decoded JSON/YAML value's type the way a user writes it."""
    names = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


class Fields:
    """Read the fields of one mapping, then `finish()` to reject any key that was not read."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"must be an object, not {type_name(value)}")
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(path, f"keys must be strings, not {type_name(key)}")
        self._data: Mapping[str, object] = value
        self.path = path
        self._read: set[str] = set()

    def at(self, key: str) -> str:
        """The path of a field of this mapping."""
        return f"{self.path}.{key}" if self.path else key

    def keys(self) -> list[str]:
        """All keys, for mappings whose keys are names chosen by the user."""
        return list(self._data)

    def raw(self, key: str, default: object = _MISSING) -> object:
        self._read.add(key)
        if key in self._data:
            return self._data[key]
        if default is _MISSING:
            raise ConfigError(self.at(key), "is required")
        return default

    def typed(self, key: str, kind: type[_T], default: _T | None = _MISSING) -> _T:
        value = self.raw(key, default)
        if value is default and key not in self._data:
            return value  # type: ignore[return-value]
        # bool is an int subclass; a YAML `true` must not pass where a number is meant.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(self.at(key), f"must be {type_name(kind())}, not {type_name(value)}")
        return value

    def string(self, key: str, default: str | None = _MISSING) -> str:
        return self.typed(key, str, default)

    def integer(self, key: str, default: int | None = _MISSING) -> int:
        return self.typed(key, int, default)

    def boolean(self, key: str, default: bool | None = _MISSING) -> bool:
        return self.typed(key, bool, default)

    def items(self, key: str) -> list[tuple[str, object]]:
        """An optional list field, as (path, element) pairs."""
        values = self.typed(key, list, [])
        return [(f"{self.at(key)}[{i}]", value) for i, value in enumerate(values)]

    def strings(self, key: str) -> list[str]:
        result = []
        for path, value in self.items(key):
            if not isinstance(value, str):
                raise ConfigError(path, f"must be a string, not {type_name(value)}")
            result.append(value)
        return result

    def string_map(self, key: str) -> dict[str, str]:
        """An optional object field whose values are all strings."""
        value = self.typed(key, dict, {})
        result = {}
        for name, item in value.items():
            if not isinstance(item, str):
                raise ConfigError(
                    f"{self.at(key)}[{name!r}]", f"must be a string, not {type_name(item)}"
                )
            result[str(name)] = item
        return result

    def nested(self, key: str) -> Fields | None:
        """An optional object field, as Fields; None when absent."""
        value = self.raw(key, None)
        return None if value is None else Fields(value, self.at(key))

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            raise ConfigError(self.at(unknown[0]), "unknown field")
