"""Recipe values checked against the types the components declare, before anything is built.

Every node of a recipe with a `_target_` names the callable that receives its keys; the
callable's signature says what each key must be (`image_size: int`). `check_recipe_types`
compares the recipe's values with those annotations and reports every mismatch in one
paragraph that names the key, the value given and the type wanted:

    data.image_size must be an integer (32 or 64 for the shapes data), got 'abc'

Conventions a component can use in its annotations (nothing else is needed):

- `Annotated[int, "32 or 64 for the shapes data"]`: a string in `Annotated` is a hint
  shown in parentheses after the type.
- `Annotated[int, AtLeast(1)]`: a number with a floor (a batch of 0 images, -1 prompts
  would only fail minutes later, after pretraining).
- `Annotated[dict[str, Any] | None, ArgumentsOf(fn)]`: a dict-valued argument that holds
  the keyword arguments of another callable (a pretraining dict spread into a training
  function, a decoder's generator arguments); its keys are checked against `fn`.
- a `TypedDict` annotation: a dict whose keys have types of their own.
- a factory `def dit(size, **overrides) -> DiT` forwards its `**kwargs` to the class it
  returns, so keys it does not name are checked against that class; a unizoo class whose
  `__init__` takes `**kwargs` forwards them to its base class (`LatteDiT(DiT)`).

Parameters without annotations fall back to the type of their default (int, float, bool).
Annotations the check cannot read, or types a YAML value could never be (a tensor, a
module), are passed over: the check never rejects what it does not understand.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os
import types
import typing
from enum import Enum
from functools import lru_cache
from typing import Annotated, Any, Callable, Literal, TypedDict, Union, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf

from unizoo.errors import RecipeError

_META_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
_NO_HINT = object()


class RecipeTypeError(RecipeError):
    """Recipe values of the wrong type: one paragraph naming each key, its value and the type wanted."""


@dataclasses.dataclass(frozen=True)
class ArgumentsOf:
    """`Annotated` metadata: this dict holds keyword arguments of `target`; `hints` override some of their types."""

    target: Callable[..., Any]
    hints: tuple[tuple[str, Any], ...] = ()

    def __init__(self, target: Callable[..., Any], **hints: Any) -> None:
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "hints", tuple(hints.items()))


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """`Annotated` metadata: the number must be at least `minimum`."""

    minimum: float

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # the type check reports a non-number; null is the annotation's business
        return value >= self.minimum


class EvaluationSettings(TypedDict, total=False):
    prompts: Annotated[int, AtLeast(1)]
    captions: Annotated[int, AtLeast(1)]
    steps: int | None
    guidance: float | None
    seed: int


class RecipeSettings(TypedDict, total=False):
    """The recipe's own top-level values (read by `unizoo.training.train`), checked like a component's arguments."""

    name: str
    seed: int
    run_root: str
    progress_interval: Annotated[float, "seconds"]
    compile: bool | Literal["auto"]
    warmup_steps: int
    start_stage: str | None
    init_checkpoint: str | None
    evaluation: EvaluationSettings


def check_recipe_types(recipe: DictConfig) -> None:
    """Raise `RecipeTypeError` if any value of `recipe` does not fit the type its component declares."""
    errors: dict[str, str] = {}
    _check_arguments(recipe, _nested_parameters(RecipeSettings), errors)
    _walk(recipe, errors)
    if errors:
        raise RecipeTypeError("; ".join(errors.values()) + ".")


# ------------------------------------------------------------------ walking the recipe
def _walk(node: DictConfig | ListConfig, errors: dict[str, str]) -> None:
    """Check every `_target_` node; interpolated values are checked where they are used, named where they are set."""
    if isinstance(node, DictConfig) and "_target_" in node:
        target = _locate(node.get("_target_"))
        if target is not None:
            _check_arguments(node, _parameters(target), errors)
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation() and not child._is_none():
            _walk(child, errors)


def _check_arguments(node: DictConfig, parameters: dict[str, tuple[Any, str]], errors: dict[str, str]) -> None:
    """Check each key of `node` against `parameters` (name -> (type, hint)); unknown keys are Hydra's to report."""
    for key in node.keys():
        if key in _META_KEYS or key not in parameters:
            continue
        child = _source(node._get_node(key))
        if child is None or child._is_missing():
            continue  # a value still to be given (???): Hydra names it when it is read
        name = child._get_full_key(None)
        if isinstance(child, DictConfig) and not child._is_none() and "_target_" in child:
            continue  # built by its own target, checked as a node of its own
        expected, hint = parameters[key]
        nested = _nested_parameters(expected)
        if nested is not None and isinstance(child, DictConfig) and not child._is_none():
            _check_arguments(child, nested, errors)
            continue
        if child._is_none():
            value = None
        elif isinstance(child, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(child, resolve=True)
        else:
            value = child._value()
        if not _fits(value, expected) and name not in errors:
            wanted = describe(expected) + (f" ({hint})" if hint else "")
            errors[name] = f"{name} must be {wanted}, got {value!r}"


def _source(node: Any) -> Any:
    """The node an interpolation points at (so an error names the key the user sets), or the node itself."""
    try:
        return node._dereference_node() if node._is_interpolation() else node
    except Exception:  # an interpolation that does not resolve: composition reports it
        return None


# ------------------------------------------------------------------ reading signatures
def _locate(path: str) -> Callable[..., Any] | None:
    from hydra.utils import get_object

    try:
        return get_object(path)
    except Exception:  # an unknown target: instantiate reports it, with its own message
        return None


@lru_cache(maxsize=None)
def _parameters(target: Callable[..., Any]) -> dict[str, tuple[Any, str]]:
    """Keyword parameters of `target` -> (type, hint); a factory's `**kwargs` -> those of the class it returns."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}
    found: dict[str, tuple[Any, str]] = {}
    forwards = False
    for name, parameter in signature.parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            forwards = True
            continue
        if parameter.kind is parameter.VAR_POSITIONAL:
            continue
        annotation = _evaluate(parameter.annotation, function)
        if annotation is _NO_HINT:
            annotation = _type_of_default(parameter.default)
        if annotation is not _NO_HINT:
            found[name] = _split_hint(annotation)
    if forwards and not inspect.isclass(target):
        returned = _evaluate(signature.return_annotation, function)
        if inspect.isclass(returned) and returned is not target:
            found = {**_parameters(returned), **found}
    elif forwards and _defines_init(target.__base__):  # a subclass handing its **kwargs to super().__init__
        found = {**_parameters(target.__base__), **found}
    return found


def _defines_init(cls: type) -> bool:
    """Whether `cls` is a class of a component (not `object` or a library's bare base) with an `__init__` of its own."""
    return cls is not None and cls is not object and cls.__module__.startswith("unizoo") and "__init__" in vars(cls)


def _evaluate(annotation: Any, function: Any) -> Any:
    """One annotation as a type; a string one (PEP 563) evaluated on its own, so one unreadable name spoils only itself."""
    if annotation is inspect.Parameter.empty:
        return _NO_HINT
    if isinstance(annotation, str):
        namespace = getattr(inspect.unwrap(function), "__globals__", {})
        try:
            return eval(annotation, dict(namespace))  # noqa: S307 - the component's own annotation text
        except Exception:
            return _NO_HINT
    return annotation


def _type_of_default(default: Any) -> Any:
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return type(default)
    return _NO_HINT


def _split_hint(annotation: Any) -> tuple[Any, str]:
    """`Annotated[T, "hint"]` -> (`Annotated` without the hint, "hint"); other annotations unchanged."""
    if get_origin(annotation) is Annotated:
        inner, *metadata = get_args(annotation)
        hints = [m for m in metadata if isinstance(m, str)]
        rest = [m for m in metadata if not isinstance(m, str)]
        return (Annotated[(inner, *rest)] if rest else inner), "; ".join(hints)
    return annotation, ""


def _nested_parameters(expected: Any) -> dict[str, tuple[Any, str]] | None:
    """The parameters of a dict-valued argument: `ArgumentsOf(fn)` or a `TypedDict`; None for any other type."""
    if get_origin(expected) is Annotated:
        for meta in get_args(expected)[1:]:
            if isinstance(meta, ArgumentsOf):
                overrides = {name: _split_hint(hint) for name, hint in meta.hints}
                return {**_parameters(meta.target), **overrides}
        return _nested_parameters(get_args(expected)[0])
    for option in _options(expected):
        if typing.is_typeddict(option):
            return {name: _split_hint(hint) for name, hint in typing.get_type_hints(option, include_extras=True).items()}
    return None


# ------------------------------------------------------------------ matching values to types
def _options(expected: Any) -> tuple[Any, ...]:
    if get_origin(expected) in (Union, types.UnionType):
        return get_args(expected)
    return (expected,)


def _fits(value: Any, expected: Any) -> bool:
    """Could `value` (a plain YAML value: scalar, list, dict) be passed where `expected` is declared?"""
    if expected is Any or isinstance(expected, (typing.TypeVar, str, typing.ForwardRef)):
        return True
    origin, args = get_origin(expected), get_args(expected)
    if origin is Annotated:
        return _fits(value, args[0]) and all(meta.allows(value) for meta in args[1:] if isinstance(meta, AtLeast))
    if origin in (Union, types.UnionType):
        return any(_fits(value, option) for option in args)
    if origin is Literal:
        return any(type(value) is type(option) and value == option for option in args)
    if expected is None or expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if typing.is_typeddict(expected):
        return isinstance(value, dict)
    container = origin or expected
    if container in (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection):
        if isinstance(value, str) and container in (collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection):
            return all(_fits(value, a) for a in args[:1])
        if not isinstance(value, list):
            return False
        if container is tuple and args and args[-1] is not Ellipsis and len(args) > 1:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        # tuple[int] is how many libraries write "a tuple of ints": read it as tuple[int, ...].
        return not args or all(_fits(v, args[0]) for v in value)
    if container in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if not inspect.isclass(container):
        return True  # a typing construct the check does not model (Callable, Protocol, ...)
    if issubclass(container, (os.PathLike, Enum)):
        return isinstance(value, str)
    if dataclasses.is_dataclass(container) and isinstance(value, dict):
        return True  # a structured config: Hydra builds the dataclass from the mapping
    # A YAML value stands for a class only if it is an instance of it (YAML never makes a tensor);
    # built objects come from nodes with a _target_, which are checked on their own.
    try:
        return isinstance(value, container)
    except TypeError:  # a protocol or generic isinstance cannot decide
        return True


# ------------------------------------------------------------------ describing types
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def describe(expected: Any) -> str:
    """`int | None` -> 'an integer or null'; what a recipe author reads in the error."""
    origin, args = get_origin(expected), get_args(expected)
    if origin is Annotated:
        floors = [meta.minimum for meta in args[1:] if isinstance(meta, AtLeast)]
        return describe(args[0]) + (f" of at least {floors[0]:g}" if floors else "")
    if origin in (Union, types.UnionType) or origin is Literal:
        options = _flatten(expected)
        literals = [o for o in options if not isinstance(o, type) and get_origin(o) is None and o is not None]
        # Types no YAML value can be (a tensor, an accelerator object) only clutter the sentence.
        kinds = [o for o in options if o not in literals and o is not type(None) and _writable(o)] or [
            o for o in options if o not in literals and o is not type(None)
        ]
        if float in kinds:  # "an integer or a number" says less than "a number"
            kinds = [k for k in kinds if k is not int]
        parts = [describe(k) for k in kinds]
        if literals:
            parts.append(("one of " if len(literals) > 1 else "") + ", ".join(repr(v) for v in literals))
        if type(None) in options:
            parts.append("null")
        return " or ".join(dict.fromkeys(parts))
    if expected in _NAMES:
        return _NAMES[expected]
    if expected is None:
        return "null"
    if typing.is_typeddict(expected):
        return "a mapping with keys " + ", ".join(typing.get_type_hints(expected))
    container = origin or expected
    if container is tuple and args and args[-1] is not Ellipsis and len(args) > 1:
        return f"a list of {len(args)} values [" + ", ".join(describe(a) for a in args) + "]"
    if container in (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection):
        return f"a list (each {describe(args[0])})" if args else "a list"
    if container in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return "a mapping"
    if inspect.isclass(container) and issubclass(container, os.PathLike):
        return "a path"
    name = getattr(container, "__name__", str(container))
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _flatten(expected: Any) -> list[Any]:
    """The options of nested unions and literals, in order: `int | Literal['a', 'b'] | None` -> [int, 'a', 'b', NoneType]."""
    origin, args = get_origin(expected), get_args(expected)
    if origin is Annotated:
        return _flatten(args[0])
    if origin in (Union, types.UnionType):
        return [option for arg in args for option in _flatten(arg)]
    if origin is Literal:
        return list(args)
    return [expected]


def _writable(expected: Any) -> bool:
    """Can a YAML value be of this type (scalars, lists, mappings, paths), rather than only a built object?"""
    container = get_origin(expected) or expected
    if container in _NAMES or typing.is_typeddict(container):
        return True
    if container in (list, tuple, set, frozenset, dict, collections.abc.Sequence, collections.abc.Iterable,
                     collections.abc.Collection, collections.abc.Mapping, collections.abc.MutableMapping):
        return True
    return inspect.isclass(container) and issubclass(container, (os.PathLike, Enum))
