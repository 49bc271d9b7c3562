"""system/configfile: which file a process uses, and reading it (the I/O of configuration)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from relayq.core.errors import ConfigError
from relayq.system import configfile

if TYPE_CHECKING:
    from pathlib import Path


def test_default_paths() -> None:
    env = {"XDG_CONFIG_HOME": "/h/.cfg"}
    assert configfile.default_path(env, 0, "/root") == "/etc/relayq/relayq.toml"
    assert configfile.default_path(env, 1000, "/h") == "/h/.cfg/relayq/relayq.toml"
    assert configfile.default_path({"RELAYQ_CONFIG": "/x.toml"}, 0, "/") == "/x.toml"
    assert configfile.default_queue({}, 0, "/root") == "/var/spool/relayq"
    assert configfile.default_queue({}, 1000, "/home/a") == "/home/a/.local/state/relayq"


def _source(path: Path, tmp_path: Path, explicit: bool = True) -> configfile.Source:
    return configfile.Source(str(path), explicit, os.getuid(), str(tmp_path))


def test_a_missing_file_is_the_defaults_unless_named(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYQ_CACHE_DIR", str(tmp_path / "cache"))
    missing = tmp_path / "none.toml"
    cfg = _source(missing, tmp_path, explicit=False).load()
    assert cfg.smarthost == ["[127.0.0.1]"] and cfg.queue_dir
    with pytest.raises(ConfigError, match="no such configuration file"):
        _source(missing, tmp_path).load()


def test_a_password_in_a_loose_file_is_refused(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYQ_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "relayq.toml"
    path.write_text('password = "hunter2"\nuser = "u"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="holds a password"):
        _source(path, tmp_path).load()
    path.chmod(0o600)
    assert _source(path, tmp_path).load().password == "hunter2"
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_the_cache_gives_the_same_settings(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYQ_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "relayq.toml"
    path.write_text('domain = "example.org"\nqueue_dir = "/q"\n')
    first = _source(path, tmp_path).load()
    assert list((tmp_path / "cache").iterdir())  # written by the first load
    second = _source(path, tmp_path).load()
    assert second.values == first.values and second.domain == "example.org"
