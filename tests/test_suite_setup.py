"""The test suite's own set-up holds: what tests/conftest.py and pyproject.toml arrange."""

import os

import pytest


@pytest.mark.xdist_group("suite-setup-probe")
def test_xdist_groups_are_kept_together(request):
    # `--dist loadgroup` (pyproject.toml) runs the tests of one xdist_group on one worker:
    # the big-memory tests (tests/conftest.py) rely on it, so that two of them never
    # share the machine's memory. pytest-xdist marks such a test by a suffix on its node
    # id; pytest 9.2.0 drops the suffix and the groups silently (pytest-xdist#1386).
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        pytest.skip("not under pytest-xdist (-n): no groups to keep")
    if not getattr(request.config.option, "loadgroup", False):  # set on xdist's workers
        pytest.fail("the suite runs with --dist loadgroup (pyproject.toml's addopts)")
    assert request.node.nodeid.endswith("@suite-setup-probe"), (
        f"{request.node.nodeid}: xdist_group marks are ignored (pytest-xdist's group suffix "
        "is missing); see the pytest pin in pyproject.toml")
