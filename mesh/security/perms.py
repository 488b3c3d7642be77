"""The permission model: who may do what to which topic, queue or service.

A rule is a string ``"<action>:<pattern>"`` (or ``"!<action>:<pattern>"`` to deny):

=========== ==========================================================================
action      meaning
=========== ==========================================================================
publish     send events on a stream/topic (pub/sub)
subscribe   receive a stream's live events
replay      ask a publisher for a stream's history (NAK / catch-up)
replicate   hold and serve a copy of a stream (a pub/sub store; checked by the origin and
            by subscribers that would read from the store)
push        add tasks to a queue (pipeline producer)
work        take tasks from a queue (pipeline worker)
call        send requests to a service
serve       answer a service's requests
observe     ask a node for its stats (``node.stats``; resource: the node's name)
``*``       every action
=========== ==========================================================================

``pattern`` is a shell-style glob matched against the whole name (``sensors.*``, ``*``).
A deny rule wins over any allow rule; nothing matching means **deny** (deny by default).
Pure logic, no I/O: where each check is enforced is documented in docs/architecture.md.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mesh.errors import ConfigError, PermissionDenied

__all__ = ["ACTIONS", "PermissionTable", "Permissions", "Rule", "parse_rule"]

ACTIONS = ("publish", "subscribe", "replay", "replicate", "push", "work", "call", "serve",
           "observe")


@dataclass(frozen=True)
class Rule:
    """One parsed rule.

    Attributes:
        allow: False for a ``!`` deny rule.
        action: one of :data:`ACTIONS` or ``*``.
        pattern: the glob.
    """

    allow: bool
    action: str
    pattern: str

    def matches(self, action: str, resource: str) -> bool:
        """True when this rule speaks about ``action`` on ``resource``."""
        return (self.action == "*" or self.action == action) and _glob(self.pattern).match(
            resource) is not None


_GLOB_CACHE: dict[str, re.Pattern[str]] = {}


def _glob(pattern: str) -> re.Pattern[str]:
    rx = _GLOB_CACHE.get(pattern)
    if rx is None:
        rx = _GLOB_CACHE[pattern] = re.compile(fnmatch.translate(pattern))
    return rx


def parse_rule(text: str) -> Rule:
    """Parse ``"[!]action:pattern"``.

    Raises:
        ConfigError: unknown action or empty pattern.
    """
    if not isinstance(text, str):
        raise ConfigError(f"permission rule must be a string, got {text!r}")
    allow = not text.startswith("!")
    body = text if allow else text[1:]
    action, sep, pattern = body.partition(":")
    if not sep or not pattern:
        raise ConfigError(f"permission rule must be 'action:pattern', got {text!r}")
    if action != "*" and action not in ACTIONS:
        raise ConfigError(f"unknown permission action {action!r} in {text!r}; "
                          f"one of {ACTIONS} or *")
    return Rule(allow, action, pattern)


class Permissions:
    """The rules of one principal.

    Args:
        rules: rule strings (see module docstring).

    Raises:
        ConfigError: a malformed rule.
    """

    def __init__(self, rules: Iterable[str] = ()) -> None:
        self.rules = tuple(parse_rule(r) for r in rules)

    def allows(self, action: str, resource: str) -> bool:
        """True when an allow rule matches and no deny rule does.

        Raises:
            ConfigError: unknown action.
        """
        if action not in ACTIONS:
            raise ConfigError(f"unknown action {action!r}")
        allowed = False
        for rule in self.rules:
            if rule.matches(action, resource):
                if not rule.allow:
                    return False
                allowed = True
        return allowed


class PermissionTable:
    """Rules per principal (a node id or a Z85 public key); ``"*"`` applies to everybody.

    The rules of every name that identifies the peer (its node id and its key) and of ``"*"``
    are combined (a deny anywhere wins).

    Args:
        table: principal -> rule strings.
    """

    def __init__(self, table: Mapping[str, Sequence[str]] | None = None) -> None:
        self._table: dict[str, Permissions] = {
            k: Permissions(v) for k, v in (table or {}).items()
        }

    def set(self, principal: str, rules: Sequence[str]) -> None:
        """Replace ``principal``'s rules (e.g. from its certificate).

        Raises:
            ConfigError: a malformed rule.
        """
        self._table[principal] = Permissions(rules)

    def allows(self, principals: Sequence[str | None], action: str, resource: str) -> bool:
        """True when the combined rules of ``principals`` (and ``*``) allow the action."""
        allowed = False
        for p in (*principals, "*"):
            perms = self._table.get(p) if p is not None else None
            if perms is None:
                continue
            for rule in perms.rules:
                if rule.matches(action, resource):
                    if not rule.allow:
                        return False
                    allowed = True
        if action not in ACTIONS:
            raise ConfigError(f"unknown action {action!r}")
        return allowed

    def check(self, principals: Sequence[str | None], action: str, resource: str) -> None:
        """Like :meth:`allows` but raises.

        Raises:
            PermissionDenied: not allowed.
        """
        if not self.allows(principals, action, resource):
            who = next((p for p in principals if p), "anonymous")
            raise PermissionDenied(who, action, resource)
