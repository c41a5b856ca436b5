"""Configuration: defaults, parsing, errors that name the key, search order."""

from __future__ import annotations

from pathlib import Path

import pytest

from spoolops.config import (
    Config,
    ConfigError,
    load_config,
    parse_duration,
    parse_mode,
    render_config,
)


def test_defaults_without_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPOOLOPS_CONFIG", raising=False)
    monkeypatch.setattr("spoolops.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.conf")
    config = load_config()
    assert config == Config()
    assert config.root == Path("/var/spool/spoolops") and config.durable is True
    assert config.allowed_users("anything") == ("*",)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800), (" 2.5m ", 150)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "m", "-5s", "1h30m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_modes() -> None:
    assert parse_mode("0644") == 0o644 and parse_mode("2770") == 0o2770
    with pytest.raises(ValueError):
        parse_mode("0999")


def test_sample_config_parses() -> None:
    sample = Path(__file__).resolve().parent.parent / "etc" / "spoolops.conf"
    config = load_config(sample)
    assert config.worker_user == "fitsdata" and config.reply_ttl == 86400


@pytest.mark.parametrize(("text", "message"), [
    ("[spool]\nrooot = /x\n", "unknown key [spool] rooot"),
    ("[spoool]\nroot = /x\n", "unknown section [spoool]"),
    ("[spool]\ndurable = perhaps\n", "[spool] durable"),
    ("[worker]\nconcurrency = many\n", "[worker] concurrency"),
    ("[worker]\nconcurrency = 0\n", "[worker] concurrency"),
    ("[janitor]\nreply_ttl = 1 week\n", "[janitor] reply_ttl"),
    ("[storage]\nfile_mode = rw-r--r--\n", "[storage] file_mode"),
    ("[storage]\nprocessed_cals_path = ../cals\n", "[storage] processed_cals_path"),
    ("[access]\necho = fits web\n", "[access] echo"),
    ("no section header\n", "no section headers"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_relative_paths_and_access(tmp_path: Path) -> None:
    path = tmp_path / "c.conf"
    path.write_text("[spool]\nroot = spool\n[access]\ndefault = fitsweb\n"
                    "update_headers = fitsweb, ops\necho = *\n")
    config = load_config(path)
    assert config.root == tmp_path / "spool"
    assert config.allowed_users("update_headers") == ("fitsweb", "ops")
    assert config.allowed_users("echo") == ("*",)
    assert config.allowed_users("other") == ("fitsweb",)
    assert config.allowed_users("other", ("x",)) == ("x",)


def test_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / "env.conf"
    env_file.write_text("[spool]\nroot = /from/env\n")
    explicit = tmp_path / "explicit.conf"
    explicit.write_text("[spool]\nroot = /from/explicit\n")
    monkeypatch.setenv("SPOOLOPS_CONFIG", str(env_file))
    assert load_config().root == Path("/from/env")
    assert load_config(explicit).root == Path("/from/explicit")
    assert load_config(explicit, root="/override").root == Path("/override")
    monkeypatch.setenv("SPOOLOPS_CONFIG", str(tmp_path / "missing.conf"))
    with pytest.raises(ConfigError, match="not found"):
        load_config()


def test_render_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "a.conf"
    path.write_text("[spool]\nroot = /r\nworker_user = fitsdata\n[janitor]\ntmp_ttl = 90s\n"
                    "[access]\ningest_upload = fitsweb\n")
    config = load_config(path)
    again = tmp_path / "b.conf"
    again.write_text(render_config(config))
    assert load_config(again) == Config(**{**config.__dict__, "source": again})


def test_sample_config_has_every_key_with_its_default() -> None:
    """etc/spoolops.conf is checked against the schema, where each default is
    written once: every key is there, with the default, except the two a
    FitsStorage host sets (the sample's names for the accounts)."""
    import configparser

    from spoolops.config import SCHEMA, Config, _default
    sample = Path(__file__).resolve().parent.parent / "etc" / "spoolops.conf"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(sample)
    site_values = {("spool", "group"): "fitsdata", ("spool", "worker_user"): "fitsdata"}
    for section, keys in SCHEMA.items():
        assert sorted(parser[section]) == sorted(keys), section
        for key, (_kind, default_text) in keys.items():
            expected = site_values.get((section, key), default_text)
            assert parser[section][key] == expected, (section, key)
            assert getattr(Config(), key) == _default(section, key)
    assert dict(parser["access"]) == {"default": "*"}
