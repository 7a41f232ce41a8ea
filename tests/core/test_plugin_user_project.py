"""The pytest plugin in a user's own project (a child pytest in a fresh directory): the async
``event_log`` fixture works with no configuration at all (the plugin marks unmarked async tests
for anyio), with the README's anyio mode, with the anyio marker, and the marking can be turned
off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

USER_TEST = '''
from eventcore import Envelope


async def test_uses_the_fixture(event_log):
    s = await event_log.create_session("echo")
    await event_log.append(Envelope(type="input", session_id=s.session_id, payload=1))
    assert [e.seq for e in await event_log.read(s.session_id)] == [1, 2]
'''

# the settings the README names (section "Testing your code"): the plugin then steps aside
CONFIGS = {
    "pyproject.toml": '[tool.pytest.ini_options]\nanyio_mode = "auto"\n',
    "pytest.ini": "[pytest]\nanyio_mode = auto\n",
}


def _run_user_suite(project: Path, test: str = USER_TEST) -> subprocess.CompletedProcess[str]:
    (project / "test_user.py").write_text(test)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTCORE_", "PYTEST_"))}
    env.update({k: v for k, v in os.environ.items() if k == "EVENTCORE_TEST_REDIS_SERVER"})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test_user.py"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)


def test_works_without_any_configuration(tmp_path: Path) -> None:
    done = _run_user_suite(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_a_users_own_async_fixture_on_event_log(tmp_path: Path) -> None:
    test = """
import pytest

@pytest.fixture
async def session_id(event_log):
    return (await event_log.create_session("echo")).session_id

async def test_it(event_log, session_id):
    assert (await event_log.get_session(session_id)).state == "created"

def test_sync_tests_are_untouched():
    assert True
"""
    done = _run_user_suite(tmp_path, test)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_marking_can_be_turned_off(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\neventcore_mark_async = false\n")
    done = _run_user_suite(tmp_path)
    assert done.returncode != 0
    assert "async fixture 'event_log'" in done.stdout or "async def functions" in done.stdout


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_readme_config_makes_it_work(tmp_path: Path, config: str) -> None:
    (tmp_path / config).write_text(CONFIGS[config])
    done = _run_user_suite(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_or_the_anyio_marker(tmp_path: Path) -> None:
    marked = USER_TEST.replace("async def", "@pytest.mark.anyio\nasync def")
    done = _run_user_suite(tmp_path, "import pytest\n" + marked)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
