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


def test_every_configurable_mode_is_a_mode() -> None:
    letters = {policy.Mode.BACKGROUND, policy.Mode.INTERACTIVE, policy.Mode.QUEUE,
               policy.Mode.DEFERRED}
    assert set(config.DELIVERY_MODES.values()) == letters
