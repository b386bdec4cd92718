"""Configuration: the schema-checked YAML, with defaults filled, as plain dicts and dataclasses.

The JSON schemas in ``workflow/schemas/`` are the single source of truth for keys, defaults
and descriptions; Snakemake validates the same files at parse time.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import jsonschema
import yaml

from histopipe.errors import ConfigError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "workflow" / "schemas"
CONFIG_SCHEMA = SCHEMA_DIR / "config.schema.yaml"
SHEET_SCHEMA = SCHEMA_DIR / "sheet.schema.yaml"

T = TypeVar("T")


def _default_filling_validator(schema: dict) -> jsonschema.Validator:
    base = jsonschema.validators.validator_for(schema)

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    return cls(schema)


def load_schema(path: Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


@functools.lru_cache(maxsize=8)
def _validator(path: Path) -> jsonschema.Validator:
    # Built once per schema: a cohort sheet validates thousands of rows against one schema.
    return _default_filling_validator(load_schema(path))


def validate(instance: dict, schema_path: Path, what: str) -> dict:
    """Validate ``instance`` in place against a schema, filling defaults; return it.

    Nested defaults are filled too (an absent section becomes ``{}`` and then gets its keys).
    Raises ConfigError naming ``what`` and the offending key.
    """
    validator = _validator(Path(schema_path))
    # Two passes: the first creates absent sections from their `{}` default, the second
    # fills the keys inside them.
    for _ in range(2):
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        if errors:
            err = errors[0]
            where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
            raise ConfigError(f"{what}: {where}: {err.message}")
    return instance


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a YAML config (or none), apply ``overrides`` (nested dict), validate, fill defaults."""
    return load_configs([path] if path is not None else [], overrides)


def load_configs(paths: Iterable[str | Path], overrides: dict | None = None) -> dict:
    """Several YAML configs merged in order, as Snakemake merges ``--configfile a b c`` (later
    files win key by key, nested sections merged), then ``overrides``; validated, defaults
    filled. The one loader for tools that stand in for a workflow run (status, benchmarks)."""
    paths = [Path(p) for p in paths]
    cfg: dict = {}
    for path in paths:
        cfg = deep_merge(cfg, _read_yaml(path))
    if overrides:
        cfg = deep_merge(cfg, overrides)
    what = str(paths[0]) if len(paths) == 1 else " + ".join(map(str, paths)) if paths else "config"
    return validate(cfg, CONFIG_SCHEMA, what)


PRESET_DIR = SCHEMA_DIR.parent.parent / "config" / "presets"


def load_preset(name: str, overrides: dict | None = None) -> dict:
    """The validated config of a model preset (``config/presets/<name>.yaml``: tiny, cpu,
    base, large) over the schema defaults, with ``overrides`` merged over it."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"{path}: no preset {name!r} (presets: {', '.join(known) or 'none found'})")
    return load_config(path, overrides)


def json_overrides(text: str | None) -> dict | None:
    """Parse a ``--config-json`` argument (config sections as a JSON object)."""
    if not text:
        return None
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config-json: not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError("--config-json: expected a JSON object")
    return value


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def section(cfg: dict, name: str, cls: type[T]) -> T:
    """Build the dataclass ``cls`` from config section ``name`` (unknown keys are an error)."""
    values = cfg.get(name, {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(f"config.{name}: unknown keys {sorted(unknown)}")
    return cls(**values)


def add_config_args(parser) -> None:
    """``--config FILE`` and ``--config-json JSON`` on a subcommand (see config_from_args)."""
    parser.add_argument("--config", type=Path, default=None, help="workflow config YAML (defaults for keys it leaves out)")
    parser.add_argument("--config-json", default=None, help="config sections as JSON, merged over --config (used by the workflow)")


def config_from_args(args) -> dict:
    """The validated config of a subcommand: ``--config`` with ``--config-json`` merged over it."""
    return load_config(getattr(args, "config", None), json_overrides(getattr(args, "config_json", None)))
