"""The sessions a developer and CI run: ``nox`` = tests + typecheck + lint.

Every session installs from pyproject.toml's dependency groups, so the list of
what the tests need lives in one place.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "typecheck", "lint"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
PYTHON = "3.11"


def _install(session: nox.Session, *groups: str) -> None:
    session.install("-e", ".[trio]")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite: unit, property (default budget) and end-to-end tests."""
    _install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def fuzz(session: nox.Session) -> None:
    """The hypothesis properties only, with the large `fuzz` example budget."""
    _install(session, "test")
    session.run("pytest", "-m", "property", "--hypothesis-profile=fuzz", *session.posargs)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the packages, the tests, the benchmarks and this file."""
    _install(session, "typecheck")
    session.run("mypy", "--strict", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks, each printing wavesync side by side with its reference."""
    _install(session, "bench")
    session.run("python", "bench/stun_codec.py", *session.posargs)
    session.run("python", "bench/mediator.py")
    session.run("python", "bench/relay.py")
    session.run("python", "bench/udt.py")
    session.run("python", "bench/tunnel.py")
