"""Compile ``adc_gemm.cpp`` on first use and cache the shared library.

The compiler is ``$CXX``, else ``c++``, ``g++`` or ``clang++``; the library lands in
``$NVMPRIV_CACHE_DIR/native`` (default ``~/.cache/nvmpriv/native``, falling back to the system
temporary folder), named by a hash of the source, the compiler, the flags and the CPU's feature
flags, and written by an atomic rename so concurrent processes never load a partial file.
``NVMPRIV_NATIVE=0`` turns the native path off everywhere.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["SOURCE", "build_library", "cache_dir", "find_compiler", "native_disabled"]

SOURCE = Path(__file__).with_name("adc_gemm.cpp")


def native_disabled() -> bool:
    """Whether ``NVMPRIV_NATIVE`` turns the native kernel off (``0``, ``false``, ``no``, ``off``).

    Returns:
        ``True`` when disabled.
    """
    return os.environ.get("NVMPRIV_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Folder of the compiled libraries.

    Returns:
        ``$NVMPRIV_CACHE_DIR/native``, else ``$XDG_CACHE_HOME/nvmpriv/native`` or
        ``~/.cache/nvmpriv/native``.
    """
    env = os.environ.get("NVMPRIV_CACHE_DIR")
    if env:
        return Path(env) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nvmpriv" / "native"


def find_compiler() -> str | None:
    """The C++ compiler to use.

    Returns:
        ``$CXX`` (resolved on ``PATH`` where possible), else the first of ``c++``, ``g++``,
        ``clang++`` found, else ``None``.
    """
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env) or env
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where the OS lists them.

    Returns:
        The ``flags`` (or ``Features``) line of ``/proc/cpuinfo``, else the processor name.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def foreign_openmp_loaded() -> bool:
    """Whether this process already runs an OpenMP runtime other than GNU's (Intel, LLVM).

    Returns:
        ``True`` when ``libiomp`` or ``libomp`` is mapped into the process.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return any("libiomp" in line or "/libomp" in line for line in f)
    except OSError:
        return False


def flag_sets() -> list[list[str]]:
    """Compiler flag sets to try, best first.

    Returns:
        ``-O3 -march=native`` then ``-O3``, each first with ``-fopenmp`` unless another OpenMP
        runtime is loaded.
    """
    # With -fopenmp the library binds to the libgomp torch already loaded (same SONAME), so
    # kernel and torch share one thread pool; in a torch-free process it brings libgomp (thread
    # hand-off measured cheaper than Python threads). Beside another OpenMP runtime a second
    # pool would compete for the cores, so threads come from Python then.
    sets = [["-O3", "-march=native"], ["-O3"]]
    if not foreign_openmp_loaded():
        sets = [[*flags, "-fopenmp"] for flags in sets] + sets
    return sets


def build_library(cxx: str) -> Path:
    """Compile the kernel with ``cxx``, or reuse a cached build.

    Args:
        cxx: The compiler command.

    Returns:
        Path of the shared library.

    Raises:
        RuntimeError: If no flag set compiles (the message ends with the compiler's last line).
    """
    source = SOURCE.read_bytes()
    last_error = ""
    for flags in flag_sets():
        key = hashlib.sha256(
            b"\0".join([source, cxx.encode(), " ".join(flags).encode(), cpu_signature().encode()])
        ).hexdigest()[:16]
        suffix = ".dll" if sys.platform == "win32" else ".so"
        for folder in (cache_dir(), Path(tempfile.gettempdir()) / "nvmpriv-native"):
            target = folder / f"adc_gemm-{key}{suffix}"
            if target.is_file():
                return target
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".adc_gemm-", suffix=suffix, dir=folder)
                os.close(fd)
            except OSError:
                continue
            cmd = [cxx, *flags, "-std=c++17", "-shared", "-fPIC", str(SOURCE), "-o", tmp]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as err:
                Path(tmp).unlink(missing_ok=True)
                last_error = str(err)
                break
            if done.returncode != 0:
                Path(tmp).unlink(missing_ok=True)
                last_error = (done.stderr.strip().splitlines() or ["compiler failed"])[-1]
                break
            os.replace(tmp, target)  # atomic: concurrent processes never load a partial file
            return target
    raise RuntimeError(f"could not compile {SOURCE.name} with {cxx}: {last_error}")
