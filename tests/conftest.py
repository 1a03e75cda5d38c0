"""Hypothesis profiles: `default` for every run, `fuzz` for `nox -s fuzz`.

The deadline is off in both: a per-example time limit is a timing assertion,
and timings do not belong in the test suite (bench/ measures speed).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=200, deadline=None, print_blob=True)
settings.register_profile(
    "fuzz",
    max_examples=20_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")
