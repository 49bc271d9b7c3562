"""relayq.toml: defaults, checks naming the key, smarthost syntax."""

import pytest

from relayq.core import config
from relayq.core.errors import EX_CONFIG, ConfigError


def test_empty_file_means_defaults() -> None:
    cfg = config.parse("")
    assert cfg.delivery_mode == "b"
    assert cfg.tls == "opportunistic"
    assert cfg.max_queue_age == 5 * 86400
    assert repr(cfg.smarthosts()) == "[[127.0.0.1]:25]"


def test_minimal_real_config() -> None:
    cfg = config.parse('smarthost = "mail.example.org:587"\ntls = "required"\n')
    (host,) = cfg.smarthosts()
    assert (host.host, host.port, host.mx) == ("mail.example.org", 587, True)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("[mail.example.org]", ("mail.example.org", 25, False)),
        ("[127.0.0.1]:2525", ("127.0.0.1", 2525, False)),
        ("[::1]:2525", ("::1", 2525, False)),
        ("[IPv6:::1]", ("::1", 25, False)),
        ("mail.example.org", ("mail.example.org", 25, True)),
    ],
)
def test_smarthost_forms(spec: str, expected: tuple[str, int, bool]) -> None:
    h = config.Smarthost.parse(spec, 25)
    assert (h.host, h.port, h.mx) == expected


def test_implicit_tls_defaults_to_465() -> None:
    cfg = config.parse('smarthost = ["[a.example.org]", "[b.example.org]:2465"]\ntls = "implicit"')
    assert [h.port for h in cfg.smarthosts()] == [465, 2465]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("smarthostt = 'x'", "smarthostt"),
        ("tls = 'sometimes'", "tls"),
        ("delivery_mode = 'fast'", "delivery_mode"),
        ("max_queue_age = '5 days'", "max_queue_age"),
        ("port = -1", "port"),
        ("tls_verify = 'yes'", "tls_verify"),
        ("smarthost = '[unbalanced'", "smarthost"),
        ("smarthost = 'host:99999'", "smarthost"),
        ("masquerade_as = 'bad domain'", "masquerade_as"),
        ("password = 'a'\npassword_file = '/x'", "password"),
        ("= broken", "relayq.toml"),
    ],
)
def test_bad_values_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    assert key in info.value.message
    assert info.value.code == EX_CONFIG


def test_durations() -> None:
    assert config.parse_duration("1h30m", "k") == 5400
    assert config.parse_duration("5d", "k") == 432000
    assert config.parse_duration(90, "k") == 90


def test_secrets_are_masked() -> None:
    cfg = config.parse('password = "hunter2"\nuser = "u"')
    assert "hunter2" not in repr(cfg.effective())


def test_a_port_above_65535_is_refused() -> None:
    with pytest.raises(ConfigError, match="port: must be at most 65535"):
        config.parse("port = 65536\n")
    assert config.parse("port = 65535\n").port == 65535


@pytest.mark.parametrize(("typo", "nearest"), [("smarthots", "smarthost"),
                                                ("retry_mni", "retry_min"),
                                                ("password-file", "password_file"),
                                                ("Queuedir", "queue_dir")])
def test_an_unknown_key_names_the_nearest(typo: str, nearest: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.parse(f'{typo} = "x"\n', "/etc/relayq/relayq.toml")
    assert str(exc.value) == (f"/etc/relayq/relayq.toml: unknown key {typo!r} "
                              f"(did you mean {nearest!r}?)")
