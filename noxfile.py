"""The sessions a developer and CI run: ``nox`` = natlab + tests + typecheck + lint.

Every session installs from pyproject.toml's dependency groups, so the list of
what the tests need lives in one place.
"""

from __future__ import annotations

import os
import shutil

import nox

# natlab runs before tests: .ci/run repeats the last pytest count, which must be the suite's.
nox.options.sessions = ["natlab", "tests", "typecheck", "lint"]
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
def natlab(session: nox.Session) -> None:
    """The NAT lab (tests/natlab): real kernel NAT in network namespaces, as root."""
    if os.geteuid() != 0:
        session.skip("the NAT lab needs root (network namespaces, iptables)")
    for tool in ("ip", "iptables-restore"):
        if shutil.which(tool) is None:
            session.skip(f"the NAT lab needs {tool} (apt-get install iproute2 iptables)")
    _install(session, "test")
    session.run("pytest", "-m", "natlab", "tests/natlab", *session.posargs)


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
    session.run("python", "bench/udt_many.py")
    session.run("python", "bench/tunnel.py")
    session.run("python", "bench/adapters.py")
