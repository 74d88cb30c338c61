"""The one way mtrain's commands start: Hydra config -> validated dataclass -> `main(cfg)`.

Every entry point (`python -m mtrain.sft`, `python -m converters.hf2mcore`, ...) is
`hydra_command("name", Schema)(main)`. Hydra composes `conf/<name>.yaml` over the structured
schema; missing keys and mtrain's own errors become one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mtrain import log
from mtrain.config import CONF_DIR
from mtrain.errors import ConfigError, exit_on_user_error

T = TypeVar("T")


def to_schema(cfg: DictConfig) -> Any:
    """The validated dataclass behind `cfg`, refusing any key left unset."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hints = []
        for key in missing:
            group = CONF_DIR / key
            if group.is_dir():  # a config group: name its presets
                presets = sorted(p.stem for p in group.glob("*.yaml"))
                hints.append(f"+{key}=<{'|'.join(presets)}>")
            else:
                hints.append(f"{key}=...")
        raise ConfigError(f"missing required key(s) {', '.join(missing)}: pass {' '.join(hints)}")
    return OmegaConf.to_object(cfg)


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
            user = sys.argv[1:]
            exit_on_user_error(check_overrides)(schema, user)
            given = {a.split("=", 1)[0] for a in user}
            sys.argv[1:] = [q for q in QUIET_HYDRA if q.split("=", 1)[0] not in given] + user
            return hydra_main()

        return command

    return decorate
