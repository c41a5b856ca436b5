"""Configuration: the INI file, its defaults, and the parsing of its values.

Trusts: the configuration file (it is written by root or the operator).
Search order: an explicit path (``--config``), ``$SPOOLOPS_CONFIG``, then
``/etc/spoolops/spoolops.conf``; if none exists, the defaults below apply.
An unknown section or key, or a value that does not parse, raises
``ConfigError`` naming ``[section] key`` -- a typo must not silently fall
back to a default.  Relative paths are taken relative to the file's folder.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/spoolops/spoolops.conf")
CONFIG_ENV = "SPOOLOPS_CONFIG"
ALL_USERS = "*"

# section -> key -> (kind, default as written in the file)
SCHEMA: dict[str, dict[str, tuple[str, str]]] = {
    "spool": {
        "root": ("path", "/var/spool/spoolops"),
        "group": ("str", ""),            # empty: the group of the spool root
        "worker_user": ("str", ""),      # empty: the owner of <root>/active
        "durable": ("bool", "yes"),
        "max_request_bytes": ("size", "65536"),
        "transport": ("str", "spool"),   # spool, or postgresql (see [postgresql])
    },
    "worker": {
        "concurrency": ("int", "4"),
        "rescan_interval": ("duration", "60s"),
        "log": ("str", "stderr"),        # stderr, syslog, or a file path
        "log_level": ("str", "info"),
        "metrics_file": ("str", ""),     # Prometheus textfile, rewritten by the worker
    },
    "janitor": {
        "tmp_ttl": ("duration", "1h"),
        "reply_ttl": ("duration", "1d"),
        "failed_ttl": ("duration", "30d"),
        "stuck_after": ("duration", "15m"),
    },
    "postgresql": {
        "dsn": ("str", ""),              # libpq connection string; no password here
        "schema": ("str", "spoolops"),
        "channel": ("str", ""),          # NOTIFY channel prefix; empty: the schema name
        "submit_role": ("str", "spoolops_submit"),
        "worker_role": ("str", "spoolops_worker"),
        "lock_grace": ("duration", "30s"),
    },
    "storage": {
        "storage_root": ("path", "/data/fits"),
        "upload_staging_dir": ("path", "/data/upload_staging"),
        "processed_cals_path": ("str", "processed_cals"),
        "file_mode": ("mode", "0644"),
        "compressed_layout": ("str", "single"),  # single, or streams (faster, not cfitsio)
    },
}

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}
_SQL_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$")


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``1h`` or ``7d``."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 1h, 7d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_mode(text: str) -> int:
    """A file mode written in octal, e.g. ``0644``."""
    try:
        mode = int(text.strip(), 8)
    except ValueError:
        raise ValueError(f"not an octal mode: {text!r} (use e.g. 0644)") from None
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode out of range: {text!r}")
    return mode


def parse_users(text: str) -> tuple[str, ...]:
    """``user, user`` or ``*`` as a tuple of names."""
    users = tuple(u.strip() for u in text.split(",") if u.strip())
    for user in users:
        if user != ALL_USERS and not _USER_RE.match(user):
            raise ValueError(f"not a user name: {user!r}")
    return users


def _parse_size(text: str) -> int:
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size in bytes: {text!r} (use e.g. 65536 or 64k)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def _parse_bool(text: str) -> bool:
    value = configparser.ConfigParser.BOOLEAN_STATES.get(text.strip().lower())
    if value is None:
        raise ValueError(f"not a yes/no value: {text!r}")
    return value


def _convert(kind: str, raw: str, base_dir: Path | None) -> object:
    raw = raw.strip()
    if kind == "path":
        if not raw:
            raise ValueError("empty path")
        path = Path(raw).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return Path(os.path.abspath(path))
    if kind == "bool":
        return _parse_bool(raw)
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"not an integer: {raw!r}") from None
    if kind == "size":
        return _parse_size(raw)
    if kind == "duration":
        return parse_duration(raw)
    if kind == "mode":
        return parse_mode(raw)
    return raw


def _default(section: str, key: str) -> Any:
    """A key's default, parsed from its one written form in ``SCHEMA``."""
    kind, text = SCHEMA[section][key]
    return _convert(kind, text, None) if text or kind == "str" else text


@dataclass(frozen=True)
class Config:
    """Every setting, parsed.  Build with ``load_config`` or ``Config.from_text``.
    The defaults are ``SCHEMA``'s (written there once)."""

    root: Path = field(default_factory=lambda: _default("spool", "root"))
    group: str = _default("spool", "group")
    worker_user: str = _default("spool", "worker_user")
    durable: bool = _default("spool", "durable")
    max_request_bytes: int = _default("spool", "max_request_bytes")
    transport: str = _default("spool", "transport")
    dsn: str = _default("postgresql", "dsn")
    schema: str = _default("postgresql", "schema")
    channel: str = _default("postgresql", "channel")
    submit_role: str = _default("postgresql", "submit_role")
    worker_role: str = _default("postgresql", "worker_role")
    lock_grace: float = _default("postgresql", "lock_grace")
    concurrency: int = _default("worker", "concurrency")
    rescan_interval: float = _default("worker", "rescan_interval")
    log: str = _default("worker", "log")
    log_level: str = _default("worker", "log_level")
    metrics_file: str = _default("worker", "metrics_file")
    tmp_ttl: float = _default("janitor", "tmp_ttl")
    reply_ttl: float = _default("janitor", "reply_ttl")
    failed_ttl: float = _default("janitor", "failed_ttl")
    stuck_after: float = _default("janitor", "stuck_after")
    storage_root: Path = field(default_factory=lambda: _default("storage", "storage_root"))
    upload_staging_dir: Path = field(
        default_factory=lambda: _default("storage", "upload_staging_dir"))
    processed_cals_path: str = _default("storage", "processed_cals_path")
    file_mode: int = _default("storage", "file_mode")
    compressed_layout: str = _default("storage", "compressed_layout")
    access_default: tuple[str, ...] = (ALL_USERS,)
    access: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: Path | None = None

    def allowed_users(self, op: str, op_default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Who may call ``op``: ``[access]``, else the op's own default (an
        empty one, ``ops.SITE_DEFAULT``, means none), else ``default``."""
        if op in self.access:
            return self.access[op]
        return op_default or self.access_default

    @classmethod
    def from_text(cls, text: str, base_dir: Path | None = None,
                  source: Path | None = None) -> Config:
        parser = configparser.ConfigParser(interpolation=None, default_section="\x00none")
        parser.optionxform = str  # op names are case-sensitive
        try:
            parser.read_string(text, source=str(source or "<config>"))
        except configparser.Error as exc:
            raise ConfigError(f"{source or 'config'}: {exc}") from None
        values: dict[str, object] = {}
        access: dict[str, tuple[str, ...]] = {}
        access_default: tuple[str, ...] = (ALL_USERS,)
        for section in parser.sections():
            if section == "access":
                for op, raw in parser.items(section):
                    try:
                        users = parse_users(raw)
                    except ValueError as exc:
                        raise ConfigError(f"[access] {op}: {exc}") from None
                    if op == "default":
                        access_default = users
                    else:
                        access[op] = users
                continue
            keys = SCHEMA.get(section)
            if keys is None:
                raise ConfigError(f"unknown section [{section}] in {source or 'config'}"
                                  f" (known: {', '.join(sorted([*SCHEMA, 'access']))})")
            for key, raw in parser.items(section):
                if key not in keys:
                    raise ConfigError(f"unknown key [{section}] {key} in {source or 'config'}"
                                      f" (known: {', '.join(keys)})")
                try:
                    values[key] = _convert(keys[key][0], raw, base_dir)
                except ValueError as exc:
                    raise ConfigError(f"[{section}] {key}: {exc}") from None
        config = cls(**values, access=access, access_default=access_default, source=source)
        config.check()
        return config

    def check(self) -> None:
        """Cross-field sanity checks; raises ``ConfigError`` naming the key."""
        if self.concurrency < 1 or self.concurrency > 256:
            raise ConfigError("[worker] concurrency: must be between 1 and 256")
        if self.rescan_interval <= 0:
            raise ConfigError("[worker] rescan_interval: must be positive")
        if self.max_request_bytes < 256:
            raise ConfigError("[spool] max_request_bytes: must be at least 256")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("[worker] log_level: one of debug, info, warning, error")
        if self.transport not in ("spool", "postgresql"):
            raise ConfigError("[spool] transport: spool or postgresql")
        for key in ("schema", "submit_role", "worker_role"):
            if not _SQL_NAME_RE.match(getattr(self, key)):
                raise ConfigError(f"[postgresql] {key}: a lower-case SQL name (letters,"
                                  " digits, _), at most 40 characters")
        if self.channel and not _SQL_NAME_RE.match(self.channel):
            raise ConfigError("[postgresql] channel: a lower-case SQL name, at most 40"
                              " characters")
        if self.lock_grace < 2:
            raise ConfigError("[postgresql] lock_grace: at least 2s")
        if self.compressed_layout not in ("single", "streams"):
            raise ConfigError("[storage] compressed_layout: single or streams")
        if os.path.isabs(self.processed_cals_path) or ".." in Path(
                self.processed_cals_path).parts:
            raise ConfigError("[storage] processed_cals_path: must be relative to "
                              "storage_root, without '..'")


def find_config_path(explicit: str | os.PathLike | None = None) -> Path | None:
    """The file to read, by the search order; None when no file applies."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None


def load_config(path: str | os.PathLike | None = None, root: str | os.PathLike | None = None
                ) -> Config:
    """Read the configuration; ``root`` overrides ``[spool] root``."""
    found = find_config_path(path)
    if found is None:
        config = Config()
    else:
        try:
            text = found.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {found}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {found}: {exc}") from None
        config = Config.from_text(text, base_dir=found.resolve().parent, source=found)
    if root is not None:
        config = replace_config(config, root=Path(os.path.abspath(root)))
    return config


def replace_config(config: Config, **changes: object) -> Config:
    """A copy of ``config`` with some fields changed (and re-checked)."""
    from dataclasses import replace
    new = replace(config, **changes)
    new.check()
    return new


def render_config(config: Config) -> str:
    """The INI text for ``config``: every key of ``SCHEMA`` (used by
    ``spoolops init --write-config``)."""
    lines: list[str] = []
    for section, keys in SCHEMA.items():
        if section == "postgresql" and config.transport != "postgresql":
            continue
        lines.append(f"[{section}]")
        lines += [f"{key} = {_render(kind, getattr(config, key))}"
                  for key, (kind, _default_text) in keys.items()]
        lines.append("")
    lines += ["[access]", f"default = {', '.join(config.access_default)}"]
    lines += [f"{op} = {', '.join(users)}" for op, users in sorted(config.access.items())]
    return "\n".join(lines) + "\n"


def _render(kind: str, value: Any) -> str:
    if kind == "bool":
        return "yes" if value else "no"
    if kind == "mode":
        return f"{value:04o}"
    if kind == "duration":
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if value >= size and value % size == 0:
                return f"{int(value // size)}{unit}"
        return f"{value:g}s"
    return str(value)
