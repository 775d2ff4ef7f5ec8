# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""The memory rules by their ``memory_rule`` name (``TitansConfig(memory_rule=...)``). A new rule is a flat sibling
module ``rule_<name>.py`` defining a :class:`~memory_rule.MemoryRule` subclass, imported here and listed in
:data:`RULES`."""

from __future__ import annotations

from .memory_rule import MemoryRule
from .rule_moneta import MonetaRule
from .rule_omega import OmegaRule
from .rule_titans import TitansRule
from .rule_titans_hf import TitansHFRule
from .rule_yaad import YaadRule

RULES: tuple[type[MemoryRule], ...] = (
    TitansHFRule,
    TitansRule,
    MonetaRule,
    YaadRule,
    OmegaRule,
)
MEMORY_RULES: dict[str, type[MemoryRule]] = {rule.name: rule for rule in RULES}


def rule_class(name: str, field: str = "memory_rule") -> type[MemoryRule]:
    """The rule called ``name``; ``ValueError`` listing the known ones otherwise (naming ``field``)."""
    if name not in MEMORY_RULES:
        raise ValueError(f"{field} must be one of {sorted(MEMORY_RULES)}, got {name!r}.")
    return MEMORY_RULES[name]


def rule_settings() -> dict[str, str]:
    """Every rule-specific setting's name and the rule it belongs to."""
    return {setting: name for name, rule in MEMORY_RULES.items() for setting in rule.settings}


__all__ = ["MEMORY_RULES", "rule_class", "rule_settings"]
