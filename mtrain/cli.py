"""The one way mtrain's commands start: Hydra config -> validated dataclass -> `main(cfg)`.

Every entry point (`python -m mtrain.sft`, `python -m converters.hf2mcore`, ...) is
`hydra_command("name", Schema)(main)`. Hydra composes `conf/<name>.yaml` over the structured
schema; a misspelt key, an override Hydra cannot parse or compose (a wrong type, an unknown
preset), a missing key and mtrain's own errors become one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException, ValidationError

from mtrain import log
from mtrain.config import CONF_DIR
from mtrain.errors import ConfigError, exit_on_user_error

T = TypeVar("T")


def _presets(group: str) -> list[str]:
    """The presets of config group `group` (conf/<group>/*.yaml); [] when it is no group."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _choose(group: str) -> str:
    return f"+{group}=<{'|'.join(_presets(group))}>"


def _first_line(err: Exception) -> str:
    return str(err).strip().split("\n", 1)[0]


def to_schema(cfg: DictConfig) -> Any:
    """The validated dataclass behind `cfg`, refusing any key left unset."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if not missing:
            return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # e.g. an interpolation `${...}` that does not resolve
        raise ConfigError(f"{err.full_key or 'config'}: {_first_line(err)}") from None
    hints = [_choose(key) if _presets(key) else f"{key}=..." for key in missing]
    raise ConfigError(f"missing required key(s) {', '.join(missing)}: pass {' '.join(hints)}")


def _known_keys(schema: type, prefix: str = "") -> set[str]:
    """Every dotted key of a (nested) dataclass schema."""
    keys = set()
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        key = prefix + field.name
        keys.add(key)
        sub = hints.get(field.name)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            keys |= _known_keys(sub, key + ".")
    return keys


def check_overrides(schema: type, argv: list[str]) -> None:
    """Refuse a misspelt `key=value` in one line (Hydra's own message is a multi-line dump).

    Group selections and additions (`+model=...`), deletions and Hydra's own keys are left to
    Hydra.
    """
    known = _known_keys(schema)
    for arg in argv:
        if "=" not in arg or arg.startswith(("+", "~", "-", "hydra.", "hydra/")):
            continue
        key = arg.split("=", 1)[0]
        if key in known:
            continue
        guess = difflib.get_close_matches(key, sorted(known), n=1)
        group = key.rsplit(".", 1)[0] + "." if "." in key else ""
        siblings = sorted(k for k in known if k.startswith(group) and "." not in k[len(group) :])
        hint = f"did you mean {guess[0]}?" if guess else f"known keys: {', '.join(siblings)}"
        raise ConfigError(f"unknown config key {key!r} in {arg!r}; {hint}")


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _field_type(schema: type, key: str) -> Any:
    """The annotation of dotted `key` in a (nested) dataclass schema; None for no such field."""
    hint: Any = schema
    for name in key.split("."):
        hint = _drop_none(hint)
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            return None
        hint = typing.get_type_hints(hint).get(name)
    return hint


def _drop_none(hint: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _expected(key: str, hint: Any) -> str:
    """What a value of `key` must look like, in words ("an integer or null")."""
    plain = _drop_none(hint)
    null = " or null" if plain is not hint else ""
    origin, args = typing.get_origin(plain), typing.get_args(plain)
    if origin in (list, tuple):
        items = _PLURALS.get(args[0], "values") if args else "values"
        return f"a list of {items}{null}, e.g. {key}=[a,b]"
    if origin is dict:
        return f"a mapping{null}, e.g. {key}={{a:b}}"
    if isinstance(plain, type) and dataclasses.is_dataclass(plain):
        return f"a config group: set its keys as {key}.<key>=..."
    return _TYPE_NAMES.get(plain, getattr(plain, "__name__", str(plain))) + null


def _hydra_args(argv: list[str]) -> Any:
    """Hydra's own reading of the command line; None when Hydra does not compose the job's
    config from it (--help, --info, another config dir, ...) or rejects the flags itself."""
    parser = get_args_parser()

    def refuse(message: str):
        raise ValueError(message)

    parser.error = refuse  # type: ignore[method-assign]
    if "--version" in argv:
        return None
    try:
        args = parser.parse_args(argv)
    except ValueError:
        return None
    skip = ("help", "hydra_help", "shell_completion", "info", "experimental_rerun")
    if any(getattr(args, k) for k in (*skip, "config_path", "config_dir")):
        return None
    return args


def _compositions(overrides: list[Override], multirun: bool) -> list[list[str]]:
    """The override lists to compose: the overrides as given; with --multirun, every sweep at
    its first value, then one list for each further value of each sweep."""
    base = [o.input_line for o in overrides]
    if not multirun:
        return [base]
    sweeps = []
    for i, o in enumerate(overrides):
        if o.is_sweep_override() and o.is_discrete_sweep():
            values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if values:
                base[i] = values[0]
                sweeps.append((i, values[1:]))
    return [base] + [base[:i] + [v] + base[i + 1 :] for i, rest in sweeps for v in rest]


def _explain(err: Exception, overrides: list[str], schema: type) -> str:
    """Hydra's or OmegaConf's composition error as one line that names the override."""
    parser = OverridesParser.create()
    by_key = {parser.parse_override(line).key_or_group: line for line in overrides}
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        presets = err.options or _presets(group)
        if group and presets:
            guess = difflib.get_close_matches(name, presets, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            arg = by_key.get(group, f"{group}={name}")
            return (
                f"{arg}: no preset {name!r} in conf/{group}/; "
                f"choose one of {', '.join(presets)}{hint}"
            )
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    key = getattr(cause, "full_key", None)
    if isinstance(cause, MissingMandatoryValue) and key and _presets(key):
        arg = next((o for k, o in by_key.items() if k.startswith(key + ".")), key)
        return f"{arg}: no {key} preset chosen; pass {_choose(key)}"
    if isinstance(cause, ValidationError) and key:
        hint = _field_type(schema, key)
        if hint is not None:
            return f"{by_key.get(key, key)}: expected {_expected(key, hint)}"
        return f"{by_key.get(key, key)}: {_first_line(cause)}"
    lines = [line.strip() for line in str(err).splitlines()]
    return " ".join(line for line in lines if line)


def check_composition(config_name: str, schema: type, argv: list[str]) -> None:
    """Compose the config the way Hydra is about to, and refuse what fails in one line that
    names the override (Hydra would print several lines of its internals and exit with 1)."""
    args = _hydra_args(argv)
    if args is None or GlobalHydra.instance().is_initialized():
        return
    parser = OverridesParser.create()
    overrides = []
    for arg in args.overrides:
        try:
            overrides.append(parser.parse_override(arg))
        except HydraException as err:
            raise ConfigError(
                f"cannot parse the override {arg!r}: {_first_line(err)}; quote a value with "
                "special characters (key='a=b,c'), see "
                "https://hydra.cc/docs/advanced/override_grammar/basic/"
            ) from None
    for lines in _compositions(overrides, args.multirun):
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                compose(args.config_name or config_name, lines)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(_explain(err, lines, schema)) from None


# Keys whose value may be written `key=a,b` as LLaMA-Factory's --dataset is; Hydra would read it
# as a sweep and refuse it without --multirun.
COMMA_LISTS = ("data.dataset", "data.val_dataset")


def comma_lists(argv: list[str]) -> list[str]:
    """`argv` with `key=a,b` of a COMMA_LISTS key (unbracketed, unquoted) as `key=[a,b]`."""
    if "--multirun" in argv or "-m" in argv:
        return argv
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in COMMA_LISTS and "," in value and not value.startswith(("[", "'", '"')):
            arg = f"{key}=[{value}]"
        out.append(arg)
    return out


# mtrain's commands write nothing of Hydra's own (no outputs/ dir, no log files, no cwd change).
QUIET_HYDRA = (
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
    "hydra.output_subdir=null",
    "hydra.run.dir=.",
)


def hydra_command(config_name: str, schema: type[T]) -> Callable[[Callable[[T], Any]], Callable]:
    """Decorate `main(cfg: schema)` into a Hydra command.

    The schema gives keys, types and defaults; `conf/<config_name>.yaml`, when it exists, sets
    values and config-group defaults on top of it.
    """
    schema_name = f"{config_name}_schema"
    ConfigStore.instance().store(name=schema_name, node=schema)
    has_yaml = (CONF_DIR / f"{config_name}.yaml").is_file()

    def decorate(main: Callable[[T], Any]) -> Callable:
        @exit_on_user_error
        def run(cfg: DictConfig) -> Any:
            log.setup()
            return main(to_schema(cfg))

        @functools.wraps(main)
        def task(cfg: DictConfig) -> Any:
            return run(cfg)

        hydra_main = hydra.main(
            version_base="1.3",
            config_path=str(CONF_DIR),
            config_name=config_name if has_yaml else schema_name,
        )(task)

        @functools.wraps(main)
        def command() -> Any:
            user = comma_lists(sys.argv[1:])
            exit_on_user_error(check_overrides)(schema, user)
            name = config_name if has_yaml else schema_name
            exit_on_user_error(check_composition)(name, schema, user)
            given = {a.split("=", 1)[0] for a in user}
            sys.argv[1:] = [q for q in QUIET_HYDRA if q.split("=", 1)[0] not in given] + user
            return hydra_main()

        return command

    return decorate
