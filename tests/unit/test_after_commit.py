"""The one rule for a message just committed (policy.after_commit), as every
submitter and the daemon apply it."""

from __future__ import annotations

import pytest

from relayq.core import config, policy


@pytest.mark.parametrize(("mode", "action"), [
    ("q", policy.LEAVE), ("d", policy.LEAVE), ("b", policy.CHILD), ("i", policy.NOW),
    ("x", policy.NOW),  # an unknown letter: delivered while the caller waits, never lost
])
def test_each_mode_has_one_action(mode: str, action: str) -> None:
    assert policy.after_commit(mode) == action


@pytest.mark.parametrize(("name", "letter"), [
    ("background", "b"), ("interactive", "i"), ("queue", "q"), ("deferred", "d")])
def test_relayq_toml_and_sendmail_flags_name_the_same_modes(name: str, letter: str) -> None:
    from relayq.cli import flags

    assert config.parse(f'delivery_mode = "{name}"').delivery_mode == letter
    assert flags.parse(["-O", f"DeliveryMode={name}", "a@example.org"]).delivery == letter
    assert flags.parse([f"-od{letter}", "a@example.org"]).delivery == letter
    assert policy.after_commit(letter) != policy.NOW or letter == policy.Mode.INTERACTIVE
