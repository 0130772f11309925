"""Find attacks by name, or load a user's attack class from a Python path, without changing library code.

Specs accepted by `get_attack` / `resolve_attack`:
    "sign-flip"                       a registered name (see `list_attacks`)
    "my_pkg.my_module:MyAttack"       a class in an importable module
    "/path/to/my_attack.py:MyAttack"  a class in a Python file (loaded as a fresh module)

A registered entry is a class or, for attacks whose module must not be imported eagerly (protocol attacks that
live in the protocol package), a "module:Class" string resolved on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

from btard.attacks.base import Attack, AttackKind
from btard.attacks.gradient import (
    ALIE,
    IPM,
    DelayedGradient,
    GaussianNoise,
    LabelFlip,
    NaNAttack,
    RandomDirection,
    SignFlip,
)

__all__ = ["get_attack", "list_attacks", "load_attack_class", "register_attack", "resolve_attack"]

_NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

# name → class, or "module:Class" resolved lazily (and then replaced by the class).
_REGISTRY: dict[str, type[Attack] | str] = {}


def _check_attack_class(cls: object, origin: str) -> type[Attack]:
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise TypeError(
            f"{origin} is not an attack class: it must subclass btard.attacks.GradientAttack "
            "(gradient attacks) or the protocol attack base (subclasses of btard.attacks.Attack)"
        )
    if inspect.isabstract(cls):
        raise TypeError(
            f"{origin} is abstract; implement its abstract methods ({sorted(cls.__abstractmethods__)})"
        )
    if not isinstance(getattr(cls, "kind", None), AttackKind):
        raise TypeError(f"{origin} must set the class attribute kind to an AttackKind")
    return cls


def register_attack(name: str, cls: type[Attack] | str, *, replace: bool = False) -> None:
    """Register ``cls`` (an `Attack` subclass, or a lazy "module:Class" string) under ``name``.

    Names are lower-case words joined by hyphens. Registering an existing name raises ValueError unless
    ``replace=True``.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"attack name {name!r} must be lower-case words joined by hyphens")
    if name in _REGISTRY and not replace:
        raise ValueError(f"attack name {name!r} is already registered; pass replace=True to override")
    if isinstance(cls, str):
        if ":" not in cls:
            raise ValueError(f"a lazy attack target must read 'module:Class', got {cls!r}")
        _REGISTRY[name] = cls
    else:
        _REGISTRY[name] = _check_attack_class(cls, f"{cls!r}")


def load_attack_class(path: str) -> type[Attack]:
    """Load an attack class from "module.path:Class" or "file.py:Class" (attribute paths like "Outer.Inner"
    work too). Raises ValueError for a malformed path, ImportError/AttributeError if it does not exist, and
    TypeError if the object is not a concrete attack class."""
    module_part, sep, attr_part = path.rpartition(":")
    if not sep or not module_part or not attr_part:
        raise ValueError(f"an attack path must read 'module:Class' or 'file.py:Class', got {path!r}")
    module = _load_module(module_part)
    obj: object = module
    for attr in attr_part.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise AttributeError(f"{module_part!r} has no attribute {attr_part!r}") from None
    return _check_attack_class(obj, repr(path))


def _load_module(module_part: str) -> ModuleType:
    if module_part.endswith(".py"):
        file = Path(module_part)
        if not file.is_file():
            raise ImportError(f"no such attack file: {module_part}")
        mod_name = f"_btard_user_attack_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {module_part} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look the module up here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[mod_name]
            raise
        return module
    return importlib.import_module(module_part)


def resolve_attack(spec: str) -> type[Attack]:
    """The attack class for a registered name or a "module:Class" / "file.py:Class" path."""
    if ":" in spec:
        return load_attack_class(spec)
    entry = _REGISTRY.get(spec)
    if entry is None:
        raise ValueError(
            f"unknown attack {spec!r}; registered attacks: {', '.join(list_attacks())} "
            "(or give 'module:Class' for your own)"
        )
    if isinstance(entry, str):
        entry = load_attack_class(entry)
        _REGISTRY[spec] = entry
    return entry


def get_attack(spec: str, **params: object) -> Attack:
    """Build the attack named by ``spec`` (see `resolve_attack`) with keyword parameters ``params``,
    e.g. ``get_attack("sign-flip", k=1000)`` or ``get_attack("my_attacks:Sneaky", eps=0.5)``."""
    cls = resolve_attack(spec)
    try:
        return cls(**params)
    except TypeError as e:
        raise TypeError(f"cannot build attack {spec!r} with parameters {params}: {e}") from e


def list_attacks(kind: AttackKind | str | None = None) -> list[str]:
    """Sorted registered names; with ``kind``, only attacks of that `AttackKind` (imports lazy entries)."""
    if kind is None:
        return sorted(_REGISTRY)
    kind = AttackKind(kind)
    return sorted(name for name in _REGISTRY if resolve_attack(name).kind == kind)


for _cls in (SignFlip, RandomDirection, LabelFlip, DelayedGradient, IPM, ALIE, GaussianNoise, NaNAttack):
    register_attack(_cls.name, _cls)
del _cls

# Protocol attacks live beside the protocol (they subclass its Behaviour); registered lazily to keep imports light.
_PROTOCOL_ATTACKS = {
    "wrong-aggregate": "WrongAggregate",
    "equivocate-aggregate": "EquivocateAggregate",
    "equivocate-commit": "EquivocateCommit",
    "commit-mismatch": "CommitMismatch",
    "bad-shape": "BadShapePart",
    "nan-part": "NaNPart",
    "lying-projections": "LyingProjections",
    "false-accusation": "FalseAccusation",
    "framing-by-omission": "FramingByOmission",
    "mprng-withhold": "WithholdReveal",
    "mprng-alter": "AlterReveal",
    "replay": "Replay",
    "malformed": "Malformed",
    "silent": "Silent",
}
for _name, _cls_name in _PROTOCOL_ATTACKS.items():
    register_attack(_name, f"btard.attacks.protocol:{_cls_name}")
