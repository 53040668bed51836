"""The README's Arduino sketch as a tested artefact: it compiles without warnings, and in simavr, against the real
daemon over a pty, every reading reaches the cloud exactly once with its true time through a stop and a kill."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import avr, scenario


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    problem = avr.missing_tools()
    if problem:
        pytest.skip(
            f"the firmware tests need Debian's gcc-avr, avr-libc, arduino-core-avr and libsimavr-dev: {problem}"
        )
    yield tmp_path_factory.mktemp("firmware")


def test_readme_shows_the_sketch_verbatim() -> None:
    assert avr.readme_sketch() == avr.SKETCH.read_text(encoding="utf-8")


def test_sketch_compiles_for_an_uno_without_warnings(build: Path) -> None:
    elf = avr.build_sketch(build)  # -Wall -Wextra -Werror, the default one reading a second
    assert elf.stat().st_size > 0


async def test_sketch_in_simavr_through_a_stop_and_a_kill(build: Path, tmp_path: Path) -> None:
    elf = avr.build_sketch(build, [f"INTERVAL_MS={scenario.INTERVAL_MS}UL"])
    harness = avr.build_harness(build)
    started = time.monotonic()
    outcome = await scenario.run(tmp_path, elf, harness, pythonpath=None, keep_lines=True)
    print(f"simavr scenario: {outcome.summary()} in {time.monotonic() - started:.1f} s")
    assert outcome.taken >= 80, outcome.summary()
    assert outcome.missing == [], (outcome.summary(), outcome.missing)
    assert outcome.duplicates == {}, (outcome.summary(), outcome.duplicates)
    assert outcome.off == {}, (outcome.summary(), outcome.off, outcome.log[-4000:])
    assert outcome.resent_counted > 0, outcome.summary()  # the MCU did resend, and the daemon saw it
