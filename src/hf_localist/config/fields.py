"""One validation idiom for the config classes (``LocalistConfig``, ``RecruitmentConfig``, ``LocalistRouterConfig``).

A field declares its rule next to its help, ``field(default=1, metadata=spec("help", integer(1)))``; the mixin
:class:`ValidatedFields` checks it on construction and on every assignment through the one :func:`validate_field`,
so a rule reads the same in every class: ``RecruitmentConfig.every=0 is invalid: expected an integer >= 1``.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Callable
from dataclasses import Field, dataclass
from typing import Any, ClassVar

from ..errors import LocalistConfigError


@dataclass(frozen=True)
class Rule:
    """What a field accepts; build one with :func:`number`, :func:`integer`, :func:`one_of`, ... below."""

    kind: str  # "number", "int", "bool", "str", "choice", "list" or "custom"
    low: float | None = None  # for "str": the minimum length
    high: float | None = None
    open_low: bool = False  # (low, ... rather than [low, ...
    open_high: bool = False
    choices: tuple = ()
    optional: bool = False  # None is accepted (and stored)
    item: Rule | None = None  # "list": the rule of each element
    distinct: bool = False
    sort: bool = False
    note: str = ""  # why the bound is what it is; appended to the message
    convert: Callable[[Any], Any] | None = None  # "custom": value -> stored value, or raise Invalid


class Invalid(Exception):
    """A rule's (or custom converter's) refusal: ``Invalid(what_is_allowed[, part_of_the_value_to_show])``."""


def number(low=None, high=None, *, open_low=False, open_high=False, optional=False, note="") -> Rule:
    return Rule("number", low, high, open_low, open_high, optional=optional, note=note)


def integer(low=None, *, optional=False, note="") -> Rule:
    return Rule("int", low, optional=optional, note=note)


def one_of(choices, *, note="") -> Rule:
    return Rule("choice", choices=tuple(choices), note=note)


def boolean() -> Rule:
    return Rule("bool")


def text(*, nonempty=False, optional=False) -> Rule:
    return Rule("str", 1 if nonempty else None, optional=optional)


def list_of(item: Rule, *, distinct=False, sort=False, optional=False, note="") -> Rule:
    return Rule("list", item=item, distinct=distinct, sort=sort, optional=optional, note=note)


def custom(convert: Callable[[Any], Any], *, optional=False) -> Rule:
    return Rule("custom", optional=optional, convert=convert)


def spec(help: str, check: Rule | None = None) -> dict[str, Any]:
    """A field's metadata: its help text (for HfArgumentParser and the CLI) and its rule."""
    return {"help": help} if check is None else {"help": help, "check": check}


def describe(rule: Rule, plural: bool = False) -> str:
    """What ``rule`` allows, in words: "an integer >= 1", "a list of distinct integers >= 1 or None"."""
    nonempty = "non-empty " if rule.low else ""
    nouns = {"number": ("a finite number", "finite numbers"), "int": ("an integer", "integers"),
             "str": (f"a {nonempty}string", f"{nonempty}strings"), "bool": ("true or false",) * 2,
             "choice": (f"one of {list(rule.choices)}",) * 2}
    if rule.kind == "list":
        out = f"a list of {'distinct ' if rule.distinct else ''}{describe(rule.item, plural=True)}"
    else:
        bounds = _bounds(rule) if rule.kind in ("number", "int") else ""
        out = nouns.get(rule.kind, ("a valid value",) * 2)[plural] + bounds
    return out + (" or None" if rule.optional else "")


def _bounds(rule: Rule) -> str:
    lo, hi = (None if x is None else f"{x:g}" for x in (rule.low, rule.high))
    if lo and hi:
        return f" in {'(' if rule.open_low else '['}{lo}, {hi}{')' if rule.open_high else ']'}"
    if lo:
        return f" {'>' if rule.open_low else '>='} {lo}"
    return f" {'<' if rule.open_high else '<='} {hi}" if hi else ""


def validate_field(owner: str, name: str, value: Any, rule: Rule) -> Any:
    """The value to store as ``owner.name`` (numbers as floats, lists as :class:`FrozenList`), or a
    ``LocalistConfigError`` naming the class, the field, the bad value and what is allowed."""
    if value is None and rule.optional:
        return None
    try:
        out = _convert(value, rule)
    except Invalid as e:
        allowed, *shown = e.args
        raise LocalistConfigError(f"{owner}.{name}={(shown or [value])[0]!r} is invalid: {allowed}") from None
    return FrozenList(out, f"{owner}.{name}") if rule.kind == "list" else out


def _convert(value: Any, rule: Rule) -> Any:
    kind = rule.kind

    def bad() -> Invalid:  # built only on failure: describing the rule costs more than checking it
        return Invalid(f"{'choose' if kind == 'choice' else 'expected'} {describe(rule)}"
                       + (f" ({rule.note})" if rule.note else ""))

    if kind == "custom":
        return rule.convert(value)
    if kind == "list":
        if not isinstance(value, (list, tuple)):
            raise bad()
        try:
            items = [_convert(v, rule.item) for v in value]
        except Invalid:
            raise bad() from None  # the message names the list's rule, not just the element's
        if rule.distinct and len(set(items)) != len(items):
            raise bad()
        return sorted(items) if rule.sort else items
    if kind in ("number", "int"):
        # bool is an int subclass, but `alpha=True` is a mistake, not 1.0
        if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)) \
                or (kind == "number" and not math.isfinite(value)) or not _in_bounds(value, rule):
            raise bad()
        return float(value) if kind == "number" else value
    ok = {"bool": lambda: isinstance(value, bool),
          "str": lambda: isinstance(value, str) and len(value) >= (rule.low or 0),
          "choice": lambda: any(type(value) is type(c) and value == c for c in rule.choices)}[kind]
    if not ok():
        raise bad()
    return value


def _in_bounds(value: float, rule: Rule) -> bool:
    above = rule.low is None or (value > rule.low if rule.open_low else value >= rule.low)
    return above and (rule.high is None or (value < rule.high if rule.open_high else value <= rule.high))


class FrozenList(list):
    """A stored list field: a real list to readers (``==``, JSON, slicing, ``+``) that refuses in-place changes,
    which would bypass validation (``cfg.block_names.append(...)`` would skip the pairing with
    ``anchor_token_ids``). Tuples would refuse them too, but would break ``cfg.block_names == ["a", "b"]``."""

    __slots__ = ("_where",)

    def __init__(self, items=(), where: str = "this config field"):
        super().__init__(items)
        self._where = where

    def _refuse(self, *args: Any, **kwargs: Any):
        name = self._where.split(".")[-1]
        raise LocalistConfigError(f"{self._where} is validated on assignment and cannot change in place: assign a "
                                  f"new list instead (e.g. cfg.{name} = [*cfg.{name}, item])")

    append = extend = insert = remove = pop = clear = sort = reverse = __setitem__ = __delitem__ = _refuse

    def __iadd__(self, other):  # `cfg.x += [...]` builds a new list, and the assignment back validates it
        return [*self, *other]

    def __reduce_ex__(self, protocol):  # copy, deepcopy and pickle rebuild it whole (the default would append)
        return FrozenList, (list(self), self._where)


def plain(value: Any) -> Any:
    """``value`` with a FrozenList turned back into a list: what ``to_dict()`` hands out (editable data)."""
    return list(value) if isinstance(value, FrozenList) else value


class ValidatedFields:
    """Mixin for a dataclass (or a ``PreTrainedConfig``) whose fields carry ``metadata["check"]``. Its
    ``__post_init__`` calls ``self._finish_init()``; from then on every assignment is validated, a rejected one
    changes nothing, and ``_validate_consistency`` (cross-field checks) runs after each accepted one."""

    _field_rules: ClassVar[dict[str, Rule]] = {}
    _declared: ClassVar[tuple[str, ...]] = ()  # the fields the class itself declares (for typo suggestions)
    _ready_flag: ClassVar[str] = "_fields_ready"  # instance attribute: construction has validated everything
    #: True: every unknown public attribute is refused. False (a PreTrainedConfig carries extra attributes by
    #: design): only a near-miss of a declared field is refused, as a typo.
    _closed: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # HfArgumentParser passes every metadata key to argparse.add_argument, so "check" moves to the class's rule
        # table here, before @dataclass (or PreTrainedConfig.__init_subclass__) reads the fields.
        rules, declared = dict(cls._field_rules), list(cls._declared)
        for name, value in list(vars(cls).items()):
            if isinstance(value, Field):
                declared.append(name)
                if "check" in value.metadata:
                    rules[name] = value.metadata["check"]
                    value.metadata = types.MappingProxyType({k: v for k, v in value.metadata.items() if k != "check"})
        cls._field_rules, cls._declared = rules, tuple(dict.fromkeys(declared))
        super().__init_subclass__(**kwargs)

    def __new__(cls, *args: Any, **kwargs: Any):
        cls._reject_unknown(kwargs)  # a LocalistConfigError naming the close match, not the dataclass's TypeError
        return super().__new__(cls)

    @classmethod
    def _reject_unknown(cls, names) -> None:
        unknown = [n for n in names if not (n.startswith("_") or n in cls.__dataclass_fields__ or hasattr(cls, n))]
        cutoff = 0.6 if cls._closed else 0.8
        matches = {n: difflib.get_close_matches(n, cls._declared, n=1, cutoff=cutoff) for n in unknown}
        bad = unknown if cls._closed else [n for n in unknown if matches[n]]
        if bad:
            hints = ", ".join(repr(matches[n][0]) for n in bad if matches[n])
            raise LocalistConfigError(f"unknown {cls.__name__} field(s) {bad}"
                                      + (f" (did you mean {hints}?)" if hints else "")
                                      + f"; known fields: {sorted(cls._declared)}")

    def __setattr__(self, name: str, value: Any) -> None:
        if not self.__dict__.get(self._ready_flag, False):
            super().__setattr__(name, value)  # under construction: _finish_init validates everything at once
        elif name in self._field_rules:
            self._assign({name: value})
        else:
            if name not in self.__dict__:
                self._reject_unknown([name])
            super().__setattr__(name, value)

    def _assign(self, values: dict[str, Any]) -> None:
        """Validate and store several fields together; on any error none of them changes."""
        self._reject_unknown([n for n in values if n not in self.__dict__])
        owner, rules = type(self).__name__, self._field_rules
        new = {n: validate_field(owner, n, v, rules[n]) if n in rules else v for n, v in values.items()}
        previous = {n: self.__dict__[n] for n in new if n in self.__dict__}
        for n, v in new.items():
            super().__setattr__(n, v)
        try:
            self._validate_consistency()
        except LocalistConfigError:
            for n, v in previous.items():
                super().__setattr__(n, v)
            raise

    def _finish_init(self) -> None:
        """Validate (and normalise) every field as constructed, then the cross-field checks; arm __setattr__."""
        self._assign({name: getattr(self, name) for name in self._field_rules})
        super().__setattr__(self._ready_flag, True)

    def _validate_consistency(self) -> None:
        """The class's cross-field checks (raise LocalistConfigError); none by default."""
