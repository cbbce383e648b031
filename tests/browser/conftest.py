"""A JupyterLab server and a headless Debian Chromium for the end-to-end test, both always shut down.

Why Playwright for Python rather than JupyterLab's Galata: it runs inside pytest (same skips, markers,
tmp_path and timeouts as the rest of the suite), needs no Node project, and `pip install playwright`
downloads no browser when `executable_path` names Debian's chromium. Galata's in-page helpers would save
a few lines, but would bring npm, a second test runner and a server config of its own.

Everything the server, kernel and browser write goes under the test's tmp_path: a copy of the notebooks,
Jupyter's config/runtime/settings/workspaces dirs, IPython's dir and the browser profile. The stored
notebooks on disk are never opened, so nothing (autosave included) can modify them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("OVERLAYKIT_CHROMIUM", "/usr/bin/chromium")
# The flags the issue asks for; Playwright adds a fresh --user-data-dir (launch_persistent_context).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
SERVER_START_TIMEOUT = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes: the server, and whatever it started (kernels run in sessions of their own) -----------

def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a live process, None once it is gone (zombies count as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st:
                children.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[1]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = starts[child]
            todo.append(child)
    return out


def _alive(procs: dict[int, int]) -> list[int]:
    """The pids in ``procs`` that still run and are still the same process (pids get reused)."""
    return [pid for pid, start in procs.items() if (_proc_stat(pid) or (0, None))[1] == start]


def _stop(procs: dict[int, int], sig: int, grace: float) -> None:
    for pid in _alive(procs):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)


class LabServer:
    def __init__(self, url: str, token: str, root: Path, log: Path):
        self.url, self.token, self.root, self.log = url, token, root, log

    def api(self, path: str, method: str = "GET") -> object:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def lab_url(self, notebook: str) -> str:
        return f"{self.url}/lab/tree/{notebook}?token={self.token}"


@pytest.fixture
def chromium_path() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set OVERLAYKIT_CHROMIUM)")
    return CHROMIUM


@pytest.fixture
def lab_server(tmp_path) -> LabServer:
    """JupyterLab from this Python (the repo's venv under ./dev test) on 127.0.0.1, over a copy of notebooks/."""
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install -e '.[test]')")
    pytest.importorskip("ipywidgets", reason="ipywidgets is not installed (pip install -e '.[test]')")
    root = tmp_path / "notebooks"
    if (REPO / "notebooks").is_dir():  # all of them: a lesson may link to or load its neighbours
        shutil.copytree(REPO / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "_scratch"))
    else:
        root.mkdir()

    home = tmp_path / "jupyter"
    settings = home / "lab-settings"
    # No autosave (belt and braces: we work on a copy anyway) and no news/update checks (no network).
    for plugin, values in {
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        # every cell in the DOM (JupyterLab 4 otherwise renders only those near the viewport): the layout
        # checks read the whole notebook
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    }.items():
        f = settings / f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    # No news feed and no update check: they would fetch from the internet.
    (home / "config").mkdir(parents=True)
    (home / "config" / "jupyter_server_config.json").write_text(json.dumps(
        {"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}}))
    token = secrets.token_hex(16)
    port = _free_port()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        # The test is about the browser round trip; both backends are covered by nbval. The simulator makes
        # no mounts, so even a killed kernel cannot leave one behind.
        OVERLAYKIT_BACKEND="sim",
        JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTER_DATA_DIR=str(home / "data"), JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), IPYTHONDIR=str(home / "ipython"),
        JUPYTER_PLATFORM_DIRS="1",
    )
    args = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
        "--LabApp.expose_app_in_browser=True",  # lets the test read cell states; all actions go through the UI
    ]
    if os.geteuid() == 0:
        args.append("--allow-root")
    log = tmp_path / "jupyterlab.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(args, cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = LabServer(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}", pytrace=False)
            try:
                server.api("/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer within {SERVER_START_TIMEOUT}s:\n"
                                f"{log.read_text()[-3000:]}", pytrace=False)
                time.sleep(0.2)
        yield server
    finally:
        # The server and its kernels (each in a session of its own, so not in the server's process group).
        procs = {proc.pid: (_proc_stat(proc.pid) or (0, 0))[1], **_descendants(proc.pid)}
        try:
            server.api("/api/shutdown", method="POST")  # shuts the kernels down cleanly too
        except Exception:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        _stop(procs, signal.SIGTERM, 5)
        _stop(procs, signal.SIGKILL, 5)
        proc.poll()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log, ARTIFACTS / "browser-jupyterlab.log")
        left = _alive(procs)
        if left:
            pytest.fail(f"processes of the lab server survived SIGKILL: {left}", pytrace=False)


@pytest.fixture
def browser_page(chromium_path, tmp_path):
    """A page in headless Chromium with a fresh profile; the browser is closed even if the test fails."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright for Python is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()
