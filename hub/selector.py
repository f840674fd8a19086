"""Device selectors: which devices a campaign (or a listing) targets. Pure.

Grammar (terms joined by commas; every term must hold)::

    EXPR := TERM ("," TERM)*
    TERM := "all" | "profile=" NAME | "tag=" VALUE | "id=" DEVICE_ID

``all`` matches every device and may not be combined with other terms. Repeating a
key is an AND too: ``tag=a,tag=b`` needs both tags, and two different ``id=`` or
``profile=`` terms match nothing (a device has one id and one profile), which is
refused as an error rather than silently selecting nobody.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from agent.topics import valid_device_id
from hub.errors import InvalidSelector

__all__ = ["Selector", "parse_selector", "SelectableDevice"]

_MAX_LEN = 2000


class SelectableDevice(Protocol):
    """What a selector looks at (``hub.models.Device`` satisfies it)."""

    device_id: str
    profile: str | None
    tags: list[str]


@dataclass(frozen=True)
class Selector:
    """A parsed selector; ``str()`` gives its canonical text."""

    profile: str | None = None
    tags: frozenset[str] = frozenset()
    device_id: str | None = None

    @property
    def is_all(self) -> bool:
        return self.profile is None and not self.tags and self.device_id is None

    def matches(self, device: SelectableDevice) -> bool:
        if self.device_id is not None and device.device_id != self.device_id:
            return False
        if self.profile is not None and device.profile != self.profile:
            return False
        return self.tags <= set(device.tags or ())

    def filter(self, devices: Iterable[SelectableDevice]) -> list[SelectableDevice]:
        return [d for d in devices if self.matches(d)]

    def __str__(self) -> str:
        if self.is_all:
            return "all"
        parts = [f"profile={self.profile}"] if self.profile is not None else []
        parts += [f"tag={t}" for t in sorted(self.tags)]
        if self.device_id is not None:
            parts.append(f"id={self.device_id}")
        return ",".join(parts)


def parse_selector(expr: str) -> Selector:
    """Parse ``expr`` (see the module docstring).

    Raises:
        InvalidSelector: empty, too long, an unknown key, an empty value, an invalid
            device id, ``all`` mixed with other terms, or two different ids/profiles.
    """
    text = expr.strip()
    if not text:
        raise InvalidSelector("empty selector; use 'all' to select every device")
    if len(text) > _MAX_LEN:
        raise InvalidSelector(f"selector longer than {_MAX_LEN} characters")
    terms = [t.strip() for t in text.split(",")]
    if any(not t for t in terms):
        raise InvalidSelector(f"empty term in selector {expr!r}")
    if "all" in terms:
        if len(terms) > 1:
            raise InvalidSelector("'all' cannot be combined with other terms")
        return Selector()
    profile: str | None = None
    device_id: str | None = None
    tags: set[str] = set()
    for term in terms:
        key, sep, value = term.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise InvalidSelector(f"term {term!r} is not KEY=VALUE (keys: profile, tag, id) or 'all'")
        if not value:
            raise InvalidSelector(f"term {term!r} has an empty value")
        if key == "profile":
            if profile is not None and profile != value:
                raise InvalidSelector(f"two different profiles ({profile}, {value}) select nothing")
            profile = value
        elif key == "tag":
            tags.add(value)
        elif key == "id":
            if not valid_device_id(value):
                raise InvalidSelector(f"invalid device id {value!r}")
            if device_id is not None and device_id != value:
                raise InvalidSelector(f"two different ids ({device_id}, {value}) select nothing")
            device_id = value
        else:
            raise InvalidSelector(f"unknown selector key {key!r} (keys: profile, tag, id; or 'all')")
    return Selector(profile=profile, tags=frozenset(tags), device_id=device_id)
