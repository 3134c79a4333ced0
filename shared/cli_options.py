"""Command-line options generated from pydantic settings: one source for name, default, help and bounds.

A settings class is the single description of a setting (field name, type, default, bounds,
description, environment variable). `settings_options` turns its fields into typer options of a
command and hands the command one validated settings object:

    @app.command()
    @settings_options(EdgeSettings, into="edge_settings")
    def generate(prompt: str = "...", *, edge_settings: EdgeSettings) -> None: ...

- `check_interval` becomes `--check-interval`; `Flags("--lookahead")` in the field's Annotated
  metadata adds names users already know; bools become `--x/--no-x`; Literal fields become choices.
- Help is the field's description, its bounds (`ge`/`gt`/`le`/`lt`) and its default.
- Precedence: a flag given > the environment (e.g. HANDOFF_EDGE_CHECK_INTERVAL) > the default: only
  flags present on the command line are passed to the settings class, which reads the rest itself.
- Pydantic validates (bounds included), so flags and environment variables share one rule and one
  message; an invalid flag is a usage error naming the flag, an invalid variable one naming it.

A new setting therefore becomes a flag of every command that takes its class by adding the field.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import annotated_types
import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings
from rich.markup import escape

from handoff.shared.errors import HandoffError

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


@dataclass(frozen=True)
class Flags:
    """Extra command-line names of a settings field, in its Annotated metadata.

    Args:
        names: more flags for the field besides the one from its name (e.g. "--lookahead"); a bool
            field's extra names get their "--no-" form too.
        switches: (flag, value, help) triples: value-less flags that set the field to value, e.g.
            ("--edge-only", "edge", "...") for a mode field; two different ones exclude each other.
    """

    names: tuple[str, ...] = ()
    switches: tuple[tuple[str, Any, str], ...] = ()

    def __init__(self, *names: str, switches: Sequence[tuple[str, Any, str]] = ()) -> None:
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "switches", tuple(switches))


@dataclass(frozen=True)
class _Option:
    """One generated parameter: the field it sets and the Python name typer knows it by."""

    field: str
    param: str
    flags: tuple[str, ...]
    value: Any = None  # a switch: the value it sets
    switch: bool = False


def flag_name(field: str) -> str:
    """The flag of a settings field: check_interval -> --check-interval."""
    return "--" + field.replace("_", "-")


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable pydantic-settings reads for a field (prefix + name, upper case)."""
    return (str(cls.model_config.get("env_prefix") or "") + field).upper()


def field_flags(cls: type[BaseSettings], field: str) -> tuple[str, ...]:
    """Every flag that sets `field`: the one from its name, its extra names, then its switches.

    Args:
        cls: a settings class.
        field: one of its field names.

    Returns:
        The flags, e.g. ("--lookahead-windows", "--lookahead") or ("--mode", "--edge-only", "--cloud-only").
    """
    meta = _flags(cls.model_fields[field])
    return (flag_name(field), *meta.names, *(s[0] for s in meta.switches))


def settings_flags(cls: type[BaseSettings]) -> dict[str, tuple[str, ...]]:
    """field name -> its flags, for every field of `cls` (what a command that takes `cls` accepts)."""
    return {name: field_flags(cls, name) for name in cls.model_fields}


def _flags(info: FieldInfo) -> Flags:
    return next((m for m in info.metadata if isinstance(m, Flags)), Flags())


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, (annotation, False) otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _bounds(info: FieldInfo) -> str:
    """The field's numeric bounds in typer's notation ("x>=1", "0<x<=1"); "" when it has none."""
    low = high = None  # (value, inclusive)
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            low = (m.ge, True)
        elif isinstance(m, annotated_types.Gt):
            low = (m.gt, False)
        elif isinstance(m, annotated_types.Le):
            high = (m.le, True)
        elif isinstance(m, annotated_types.Lt):
            high = (m.lt, False)
    if low and high:
        return f"{low[0]}{'<=' if low[1] else '<'}x{'<=' if high[1] else '<'}{high[0]}"
    if low:
        return f"x{'>=' if low[1] else '>'}{low[0]}"
    if high:
        return f"x{'<=' if high[1] else '<'}{high[0]}"
    return ""


def _help(name: str, info: FieldInfo) -> str:
    text = (info.description or name.replace("_", " ").capitalize()).rstrip()
    bounds = _bounds(info)
    if bounds:
        text += f" [{bounds}]"
    # typer renders help as rich markup: brackets in descriptions are text, not styles.
    return escape(text)


def _default(info: FieldInfo) -> Any:
    default = info.get_default(call_default_factory=True)
    return None if default is PydanticUndefined else default


def _check_type(cls: type[BaseSettings], name: str, annotation: Any) -> None:
    """Refuse a field type typer cannot parse, at import time rather than on a user's command line."""
    base, _ = _strip_optional(annotation)
    ok = base in (str, int, float, bool, Path) or typing.get_origin(base) is Literal
    if typing.get_origin(base) is list:
        ok = typing.get_args(base)[0] in (str, int, float, Path)
    if not ok:
        raise TypeError(f"{cls.__name__}.{name}: no command-line form for the type {annotation!r}")


def _parameters(
    cls: type[BaseSettings], into: str, fields: Sequence[str], panel: str | None
) -> tuple[list[inspect.Parameter], list[_Option]]:
    """The typer parameters of `fields` and what each one sets."""
    params: list[inspect.Parameter] = []
    options: list[_Option] = []
    for name in fields:
        info = cls.model_fields[name]
        _check_type(cls, name, info.annotation)
        meta = _flags(info)
        base, _ = _strip_optional(info.annotation)
        flags = (flag_name(name), *meta.names)
        decls = [f"{f}/--no-{f[2:]}" for f in flags] if base is bool else list(flags)
        param = f"{into}__{name}"
        option = typer.Option(*decls, help=_help(name, info), rich_help_panel=panel)
        params.append(
            inspect.Parameter(
                param,
                inspect.Parameter.KEYWORD_ONLY,
                default=_default(info),
                annotation=Annotated[info.annotation, option],  # type: ignore[valid-type]
            )
        )
        options.append(_Option(name, param, flags))
        for i, (flag, value, text) in enumerate(meta.switches):
            sparam = f"{into}__{name}__{i}"
            sopt = typer.Option(flag, help=escape(text), rich_help_panel=panel)
            params.append(
                inspect.Parameter(
                    sparam, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, sopt]
                )
            )
            options.append(_Option(name, sparam, (flag,), value=value, switch=True))
    return params, options


def _given(options: Sequence[_Option], values: dict[str, Any], ctx: typer.Context) -> dict[str, Any]:
    """Field values of the flags present on the command line (switches resolved; conflicts refused)."""
    given: dict[str, Any] = {}
    set_by: dict[str, str] = {}  # field -> the flag that set it
    for opt in options:
        value = values.pop(opt.param)
        source = ctx.get_parameter_source(opt.param)
        if source is None or source.name != "COMMANDLINE" or (opt.switch and not value):
            continue
        value = opt.value if opt.switch else value
        if opt.field in given and given[opt.field] != value:
            raise typer.BadParameter(
                f"{set_by[opt.field]} and {opt.flags[0]} exclude each other", param_hint=f"'{opt.flags[0]}'"
            )
        given[opt.field] = value
        set_by[opt.field] = opt.flags[0] if opt.switch else f"{opt.flags[0]} {value}"
    return given


def build_settings(cls: type[T], given: dict[str, Any], flags: dict[str, tuple[str, ...]] | None = None) -> T:
    """cls(**given), its validation errors turned into one clear line naming the flag or variable.

    Args:
        cls: a pydantic-settings class (reads the environment for what `given` lacks).
        given: field values from flags given on the command line.
        flags: field -> its flags, for the messages (default: the fields' own flags).

    Returns:
        The settings.

    Raises:
        typer.BadParameter: a flag's value is invalid (a usage error, exit 2).
        HandoffError: an environment variable's value is invalid.
    """
    try:
        return cls(**given)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        msg = err["msg"].removeprefix("Value error, ")  # a validator's ValueError: its own message
        if field is not None and field in given:
            names = (flags or {}).get(field) or field_flags(cls, field)  # type: ignore[arg-type]
            hint = " / ".join(f"'{n}'" for n in names if not n.startswith("--no-"))
            raise typer.BadParameter(
                f"{msg}, got {given[field]!r} (setting {field})", param_hint=hint
            ) from None
        if field is not None and field in cls.model_fields:  # type: ignore[attr-defined]
            raise HandoffError(
                f"invalid {env_name(cls, field)}: {msg} (setting {field}, read from the environment)"  # type: ignore[arg-type]
            ) from None
        raise HandoffError(f"invalid {cls.__name__}: {msg}") from None


def settings_options(
    cls: type[BaseSettings],
    *,
    into: str,
    panel: str | None = None,
    exclude: Collection[str] = (),
    only: Collection[str] | None = None,
) -> Callable[[F], F]:
    """Decorator: give a typer command one option per field of `cls` and pass it the settings.

    The command declares a keyword parameter `into` (annotated with `cls`); the decorator replaces it
    in the command's signature (what typer reads) by the generated options and, per call, builds
    `cls` from the flags given (flag > environment > default). Decorators may be stacked, one per
    settings class.

    Args:
        cls: a pydantic-settings class; every field needs a type typer can parse.
        into: the command's parameter that receives the settings object.
        panel: the help panel the options are listed under; its title is the place to name the
            environment variables (default: the command's own options).
        exclude: fields that get no option (they still come from the environment).
        only: if given, the fields that get an option (in the class's order).

    Returns:
        The decorator.
    """
    fields = [n for n in cls.model_fields if n not in exclude and (only is None or n in only)]
    missing = (set(exclude) | set(only or ())) - set(cls.model_fields)
    if missing:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(missing))}")

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        if into not in sig.parameters:
            raise TypeError(f"{func.__name__} has no parameter {into!r} to receive {cls.__name__}")
        generated, options = _parameters(cls, into, fields, panel)
        own = [p for p in sig.parameters.values() if p.name != into]
        # typer injects the context into the one parameter annotated typer.Context: reuse one an inner
        # decorator (or the command) declared, else add ours.
        ctx_name = next((p.name for p in own if p.annotation is typer.Context), None)
        added_ctx = ctx_name is None
        if added_ctx:
            ctx_name = f"{into}__ctx"
            own.append(inspect.Parameter(ctx_name, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
        names = {o.field: o.flags for o in options if not o.switch}
        for o in options:
            if o.switch:
                names[o.field] = (*names.get(o.field, ()), *o.flags)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = kwargs.pop(ctx_name) if added_ctx else kwargs[ctx_name]
            kwargs[into] = build_settings(cls, _given(options, kwargs, ctx), names)
            return func(*args, **kwargs)

        params = [*own, *generated]
        # Keyword-only parameters may not precede positional ones in a signature.
        params.sort(key=lambda p: p.kind == inspect.Parameter.KEYWORD_ONLY)
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate


def csv_values(value: str, kind: Callable[[str], T], flag: str) -> tuple[T, ...]:
    """A comma-separated option's values, e.g. "0.1,0.3" -> (0.1, 0.3).

    Args:
        value: the option's text.
        kind: converts one item (int, float, ...).
        flag: the option, for the message.

    Returns:
        At least one value.

    Raises:
        typer.BadParameter: an item does not convert, or there is none.
    """
    try:
        items = tuple(kind(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(
            f"expected a comma-separated list, got {value!r}", param_hint=f"'{flag}'"
        ) from None
    if not items:
        raise typer.BadParameter("give at least one value", param_hint=f"'{flag}'")
    return items


def positive_ints(text: str) -> list[int]:
    """Sorted distinct positive integers from "1,4,16" (an argparse `type=` for the scripts).

    Raises:
        argparse.ArgumentTypeError: an item is not an integer, or none is positive.
    """
    import argparse

    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
