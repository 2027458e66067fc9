"""Options stated once: a dataclass field carries its default, its help and its command-line spelling.

Configuration objects (:class:`~segpipe.pipeline.settings.RunOptions`, ``TrainConfig``) declare their fields with
:func:`option`; they validate themselves on construction. The CLI builds its flags from the same fields
(:func:`options_of`), the flows take the same objects as parameters, and the run summary records them: one name,
default and help per option, wherever it is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segpipe.core.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """How a field appears on the command line.

    Attributes:
        help: One line for ``--help``.
        flag: The flag; default ``--`` + the field name with dashes.
        metavar: Placeholder in ``--help``.
        choices: Allowed values (also checked by the dataclass itself).
        repeatable: A tuple field given once per value (``--ignore-class 5 --ignore-class 6``).
        hidden: Accepted but not listed in ``--help``.
    """

    help: str
    flag: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    repeatable: bool = False
    hidden: bool = False


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    repeatable: bool = False,
    hidden: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line option (see :class:`Option`)."""
    meta = {"option": Option(help, flag, metavar, choices, repeatable, hidden)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def same_option(cls: type, name: str) -> Any:
    """A dataclass field declared as the option ``name`` of ``cls`` is: the same default, help and spelling, for an
    option that several commands take (``--model``), so that it is stated once.

    Raises:
        TypeError: ``cls`` has no option field ``name``.
    """
    for f in dataclasses.fields(cls):
        if f.name == name and "option" in f.metadata:
            if f.default_factory is not dataclasses.MISSING:
                return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
            return dataclasses.field(default=f.default, metadata=f.metadata)
    raise TypeError(f"{cls.__name__} has no option field {name!r}")


@dataclass(frozen=True)
class OptionField:
    """A field of a configuration class seen as an option: name, type, default and :class:`Option`."""

    name: str
    type: Any
    default: Any  # dataclasses.MISSING for a required field
    option: Option

    @property
    def flag(self) -> str:
        return self.option.flag or "--" + self.name.replace("_", "-")


def options_of(cls: type) -> list[OptionField]:
    """The fields of dataclass ``cls`` declared with :func:`option`, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("option")
        if meta is None:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING  # required
        found.append(OptionField(f.name, hints[f.name], default, meta))
    return found


def values_of(obj: Any, cls: type | None = None) -> dict[str, Any]:
    """The option values of ``obj`` (of its class or of ``cls``, a base class) as a JSON-friendly dict."""
    return {f.name: _plain(getattr(obj, f.name)) for f in options_of(cls or type(obj))}


def names_of(cls: type[Any]) -> dict[str, str]:
    """How the options of ``cls`` may be named outside Python (config files, a deployment's parameters, the API's
    keywords): by field name or by the flag's spelling (``cog_options`` or ``co``), each mapped to its field."""
    fields = options_of(cls)
    return {f.flag.lstrip("-").replace("-", "_"): f.name for f in fields} | {f.name: f.name for f in fields}


def from_values(cls: type[Any], values: Any) -> Any:
    """An instance of the configuration class ``cls`` from what :func:`values_of` wrote (a deployment's JSON
    parameters; a flag's spelling names its field too): lists become tuples for repeatable options; an instance,
    or None, is returned as it is."""
    if values is None or isinstance(values, cls):
        return values
    names = names_of(cls)
    repeatable = {f.name for f in options_of(cls) if f.option.repeatable}
    named = {names.get(str(k), str(k)): v for k, v in dict(values).items()}
    return cls(**{k: tuple(v) if k in repeatable and isinstance(v, list) else v for k, v in named.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def whole_number(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``tuple[int, ...]`` -> int; ``Literal[...]`` -> str; others as they are."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return str
    if origin in (tuple, list) and args:
        return _base_type(args[0])
    if args and origin is not None:  # a Union such as int | None
        return _base_type(args[0])
    return annotation


def add_arguments(
    parser: Any,
    cls: type,
    *,
    only: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    show_defaults: bool = True,
) -> list[OptionField]:
    """Add a flag to an argparse ``parser`` for every option field of ``cls`` (all, or ``only`` these names).

    Defaults are not given to argparse: an absent flag is absent from the namespace and the dataclass's own
    default applies (see :func:`given`), so each default is stated once, in the dataclass. ``show_defaults``
    appends it to the help (off where a caller has defaults of its own, such as a recipe).

    Returns:
        The fields added, for :func:`given`.
    """
    added = []
    for f in options_of(cls):
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        kind = _base_type(f.type)
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": argparse.SUPPRESS if f.option.hidden else (_help(f) if show_defaults else f.option.help),
        }
        if kind is bool:
            kwargs["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {int: whole_number, float: float}.get(kind, str)
            if f.option.repeatable:
                kwargs["action"] = "append"
            if f.option.choices:
                kwargs["choices"] = f.option.choices
            kwargs["metavar"] = f.option.metavar or (
                "{" + ",".join(f.option.choices) + "}"
                if f.option.choices
                else {int: "N", float: "X"}.get(kind, f.name.upper())
            )
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        parser.add_argument(f.flag, **kwargs)
        added.append(f)
    return added


def _help(f: OptionField) -> str:
    if f.default is None or f.default is dataclasses.MISSING or f.default is False or f.default == ():
        return f.option.help
    if "default" in f.option.help:
        return f.option.help
    return f"{f.option.help} (default: {f.default})"


def given(args: Any, fields: list[OptionField]) -> dict[str, Any]:
    """The values of ``fields`` present in an argparse namespace (repeatable ones as tuples)."""
    found = {}
    for f in fields:
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            found[f.name] = tuple(value) if f.option.repeatable else value
    return found


#: Tables of an options file that hold the options of one kind (their keys are merged with the top level).
OPTION_TABLES = ("run", "dataset", "schedule")


def read_options_file(path: str) -> dict[str, Any]:
    """The options in a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``) file, as one flat mapping
    of option names (the keys of the tables ``run``, ``dataset`` and ``schedule`` merged into the top level).

    Raises:
        ConfigError: the file is missing, not of those kinds, not parseable, or not a mapping.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"--config {path!r} must be a .toml, .yaml or .json file")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path!r} cannot be read ({exc.strerror or exc})") from None
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # lazy: YAML files only (pyyaml, 0.02 s, comes with prefect)

            data = yaml.safe_load(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path!r} is not valid {suffix.lstrip('.').upper()}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        raise ConfigError(f"--config {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of option names to values")
    flat = {k: v for k, v in data.items() if k not in OPTION_TABLES}
    for table in OPTION_TABLES:
        if isinstance(data.get(table), dict):
            flat.update(data[table])
    return {str(k).replace("-", "_"): v for k, v in flat.items()}


def _checked(f: OptionField, value: Any, where: str) -> Any:
    """``value`` from a file for field ``f``, checked against the field's type (lists become tuples)."""
    kind = _base_type(f.type)
    is_tuple = typing.get_origin(f.type) in (tuple, list)
    if value is None and f.default is None:
        return None
    items = value if is_tuple and isinstance(value, list) else [value]
    for item in items:
        ok = (
            isinstance(item, bool)
            if kind is bool
            else isinstance(item, int | float) and not isinstance(item, bool)
            if kind is float
            else isinstance(item, int) and not isinstance(item, bool)
            if kind is int
            else isinstance(item, str)
        )
        if not ok:
            wanted = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "a string")
            raise ConfigError(f"{where}: {f.name} must be {wanted}{' (or a list of them)' if is_tuple else ''}, "
                              f"got {value!r}")  # fmt: skip
    if is_tuple:
        return tuple(items)
    return float(value) if kind is float else value


def split_options(values: dict[str, Any], classes: typing.Sequence[type], *, where: str) -> list[dict[str, Any]]:
    """Share an options file's ``values`` among ``classes`` (their option fields, by field name or by the flag's
    spelling: ``cog_options`` or ``co``), each value checked against its field's type; one dict per class, in
    order.

    Raises:
        ConfigError: a name that is no option of these classes (with the names there are), or a wrong type.
    """
    fields = [{f.name: f for f in options_of(cls)} for cls in classes]
    known = sorted(name for table in fields for name in table)
    spelled = {k: v for cls in classes for k, v in names_of(cls).items()}
    named = {spelled.get(k, k): v for k, v in values.items()}  # a flag's spelling (co, collection) names its field
    unknown = sorted(set(named) - set(known))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]!r} is not an option here; the options are: {', '.join(known)}")
    return [{k: _checked(table[k], v, where) for k, v in named.items() if k in table} for table in fields]
