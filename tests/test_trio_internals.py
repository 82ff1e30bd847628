"""The deterministic simulation relies on two private trio attributes (DESIGN.md section 6).
If a trio upgrade moves them, this fails loudly instead of the simulation silently becoming
non-deterministic."""

import random

import trio
import trio._core._run as trio_run


def test_trio_is_the_pinned_version_with_the_scheduler_hooks():
    assert trio.__version__ == "0.35.0"
    assert isinstance(trio_run._r, random.Random)
    assert hasattr(trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING")
