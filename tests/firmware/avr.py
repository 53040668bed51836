"""Builds the README's sketch with Debian's Arduino core and gcc-avr, and the simavr pty harness (firmware/)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKETCH = REPO / "firmware" / "edgeforward_sketch" / "edgeforward_sketch.ino"
HARNESS_SOURCE = REPO / "firmware" / "simavr_pty.c"
ARDUINO_AVR = Path("/usr/share/arduino/hardware/arduino/avr")  # Debian's arduino-core-avr
SIMAVR_INCLUDE = Path("/usr/include/simavr")  # Debian's libsimavr-dev
MCU = "atmega328p"  # an Arduino Uno
F_CPU = 16_000_000
COMPILE_TIMEOUT_S = 120
# As Arduino's platform.txt compiles (version 1.8.x), for an Uno.
COMMON_FLAGS = (
    f"-mmcu={MCU}",
    f"-DF_CPU={F_CPU}L",
    "-DARDUINO=10807",
    "-DARDUINO_AVR_UNO",
    "-DARDUINO_ARCH_AVR",
    f"-I{ARDUINO_AVR}/cores/arduino",
    f"-I{ARDUINO_AVR}/variants/standard",
    "-Os",
    "-ffunction-sections",
    "-fdata-sections",
    "-flto",
)
CXX_FLAGS = ("-std=gnu++11", "-fno-exceptions", "-fno-threadsafe-statics")
# Debian's core 1.8.7 WString.cpp uses DECIMAL_DIG, which gcc-avr 5.4's float.h defines for C99 only (upstream
# Arduino ships gcc 7): give C++ the same definition. Only the core needs it; the sketch is built as it is.
CORE_CXX_FLAGS = (*CXX_FLAGS, "-fpermissive", "-DDECIMAL_DIG=__DECIMAL_DIG__")
SKETCH_WARNINGS = ("-Wall", "-Wextra", "-Werror")


def missing_tools() -> str | None:
    """Say which Debian package is missing for building and running the firmware, or None when all are there."""
    needs = {
        "avr-g++ (apt: gcc-avr)": shutil.which("avr-g++") is not None,
        "avr-libc (apt: avr-libc)": Path("/usr/lib/avr/include/avr/io.h").exists(),
        "the Arduino AVR core (apt: arduino-core-avr)": (ARDUINO_AVR / "cores" / "arduino" / "Arduino.h").exists(),
        "libsimavr headers (apt: libsimavr-dev)": (SIMAVR_INCLUDE / "sim_avr.h").exists(),
        "a C compiler (apt: gcc)": shutil.which("cc") is not None,
    }
    absent = [name for name, present in needs.items() if not present]
    return "missing " + ", ".join(absent) if absent else None


def _run(command: Sequence[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")


def build_core(out: Path) -> Path:
    """Compile Debian's Arduino core for an Uno into one archive (cached under `out` by the core's content)."""
    sources = sorted((ARDUINO_AVR / "cores" / "arduino").glob("*.[cS]")) + sorted(
        (ARDUINO_AVR / "cores" / "arduino").glob("*.cpp")
    )
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources) + repr(COMMON_FLAGS).encode())
    archive = out / f"core-{digest.hexdigest()[:16]}.a"
    if archive.exists():
        return archive
    objects = out / "core-objects"
    objects.mkdir(parents=True, exist_ok=True)
    built = []
    for source in sources:
        target = objects / (source.name + ".o")
        if source.suffix == ".cpp":
            _run(["avr-g++", *COMMON_FLAGS, *CORE_CXX_FLAGS, "-c", str(source), "-o", str(target)])
        elif source.suffix == ".S":
            _run(["avr-gcc", *COMMON_FLAGS, "-x", "assembler-with-cpp", "-c", str(source), "-o", str(target)])
        else:
            _run(["avr-gcc", *COMMON_FLAGS, "-std=gnu11", "-c", str(source), "-o", str(target)])
        built.append(str(target))
    _run(["avr-gcc-ar", "rcs", str(archive), *built])
    return archive


def build_sketch(out: Path, defines: Sequence[str] = ()) -> Path:
    """Compile the sketch (warnings are errors) and link it with the core; return the ELF file."""
    out.mkdir(parents=True, exist_ok=True)
    core = build_core(out)
    name = "sketch" + "".join("-" + define.replace("=", "_") for define in defines)
    obj, elf = out / f"{name}.o", out / f"{name}.elf"
    flags = [f"-D{define}" for define in defines]
    _run(
        [
            "avr-g++",
            *COMMON_FLAGS,
            *CXX_FLAGS,
            *SKETCH_WARNINGS,
            *flags,
            "-x",
            "c++",
            "-include",
            "Arduino.h",
            "-c",
            str(SKETCH),
            "-o",
            str(obj),
        ]
    )
    _run(
        [
            "avr-gcc",
            f"-mmcu={MCU}",
            "-Os",
            "-flto",
            "-fuse-linker-plugin",
            "-Wl,--gc-sections",
            "-o",
            str(elf),
            str(obj),
            str(core),
            "-lm",
        ]
    )
    return elf


def build_harness(out: Path) -> Path:
    """Compile the simavr harness that puts the emulated UART on a pty."""
    out.mkdir(parents=True, exist_ok=True)
    binary = out / "simavr_pty"
    _run(
        [
            "cc",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-I{SIMAVR_INCLUDE}",
            "-o",
            str(binary),
            str(HARNESS_SOURCE),
            "-lsimavr",
            "-lutil",
        ]
    )
    return binary


def readme_sketch() -> str:
    """Return the ```cpp block of the README's MCU section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("```cpp\n") + len("```cpp\n")
    return text[start : text.index("```", start)]
