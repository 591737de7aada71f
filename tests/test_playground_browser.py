"""The playground (GET /) in a real headless Chromium against a live `dlm serve` app on a tiny random model.

Chromium is driven over the DevTools protocol on `--remote-debugging-pipe` (JSON messages ended by NUL on fds 3
and 4), so no websocket client is needed. `--dump-dom --virtual-time-budget` is no use here: virtual time does
not wait for a streamed fetch body, so the DOM is dumped mid-generation. The page is opened with
`?prompt=...&autorun=1` and the test waits for `document.body.dataset.state` to leave "running".

Skips when no Chromium is installed; with DLM_INSTALL_BROWSER=1 and root it runs `apt-get install -y chromium`.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest
from server_helpers import live_server, tiny_app

pytest.importorskip("fastapi", reason="the server needs: pip install fastapi uvicorn")
pytest.importorskip("uvicorn", reason="the server needs: pip install fastapi uvicorn")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--mute-audio"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    if os.environ.get("DLM_INSTALL_BROWSER") == "1" and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update"], check=False, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=False, capture_output=True, timeout=600)
        return shutil.which("chromium")
    return None


# ----- a live server ---------------------------------------------------------------------------------------------
# ----- Chromium over the DevTools pipe ---------------------------------------------------------------------------
def above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium with the DevTools protocol on fds 3 (commands in) and 4 (replies and events out)."""

    def __init__(self, exe: str):
        self.profile = tempfile.mkdtemp(prefix="dlm-chromium-")
        self.log = tempfile.TemporaryFile()  # chromium's stderr, shown when it fails (a pipe could fill and block)
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        cmd_r, out_w = above_9(cmd_r), above_9(out_w)  # so that moving one to fd 3 or 4 cannot clobber the other
        # bash moves the pipe ends to fds 3 and 4 before exec (no preexec_fn: the test process has threads).
        script = f'exec "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'
        argv = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(["bash", "-c", script, "chromium", *argv], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log, pass_fds=(cmd_r, out_w))
        os.close(cmd_r)
        os.close(out_w)
        self.buf = b""
        self.next_id = 0

    def stderr_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"chromium did not answer {method} (exit code {self.proc.poll()}):\n"
                                   f"{self.stderr_tail()}")
            ready, _, _ = select.select([self.out_r], [], [], left)
            if ready:
                chunk = os.read(self.out_r, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed the DevTools pipe during {method}:\n{self.stderr_tail()}")
                self.buf += chunk

    def open(self, url: str) -> str:
        """A new tab on `url`; returns its session id once the page's document is the one evaluated."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + 15
        while True:
            try:
                if self.evaluate(session, "document.readyState !== 'loading' && location.href !== 'about:blank'"):
                    return session
            except RuntimeError as e:  # the old document's context went away under the evaluation: retry
                if "context" not in str(e).lower():
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not load")
            time.sleep(0.05)

    def evaluate(self, session: str, expression: str, timeout: float = 30):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True,
                                                "timeout": timeout * 1000}, session=session, timeout=timeout + 5)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.cmd_w, self.out_r):
            os.close(fd)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


WAIT_DONE = """new Promise((resolve) => {
  const t0 = Date.now();
  const poll = () => {
    const state = document.body && document.body.dataset.state;
    if ((state && state !== "running") || Date.now() - t0 > %d) {
      resolve({state: state || null, final: document.getElementById("final-text").textContent,
               error: document.getElementById("error").textContent,
               cells: document.querySelectorAll("#canvas .cell").length,
               masks: document.querySelectorAll("#canvas .cell.mask").length,
               fresh: document.querySelectorAll("#canvas .cell.fresh").length,
               scrubMax: Number(document.getElementById("scrub").max),
               disabled: ["run", "stop", "replay"].filter((id) => document.getElementById(id).disabled)});
    } else setTimeout(poll, 50);
  };
  poll();
})"""


WAIT_TAB = """new Promise((resolve) => {
  const t0 = Date.now();
  const $ = (id) => document.getElementById(id);
  const poll = () => {
    const state = document.body && document.body.dataset.state;
    if ((state && state !== "running") || Date.now() - t0 > %d) {
      resolve({state: state || null, tab: document.body.dataset.tab, output: $("json-output").textContent,
               final: $("final-text").textContent, error: $("error").textContent, mode: $("mode").value,
               jsonHidden: $("panel-json").hidden, canvasHidden: $("panel-canvas").hidden,
               selected: document.querySelector('[role="tab"][aria-selected="true"]').dataset.tab});
    } else setTimeout(poll, 50);
  };
  poll();
})"""


def run_page(exe: str, url: str, timeout_s: float = 30, wait: str = WAIT_DONE) -> dict:
    browser = Browser(exe)
    try:
        session = browser.open(url)
        return browser.evaluate(session, wait % int(timeout_s * 1000), timeout=timeout_s + 5)
    finally:
        browser.close()


@pytest.fixture(scope="module")
def chromium():
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on PATH: `apt-get install -y chromium` (or set DLM_INSTALL_BROWSER=1 as root)")
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to hand Chromium its DevTools pipe")
    return exe


@pytest.fixture(scope="module")
def server_url():
    with live_server(tiny_app()) as url:
        yield url


def test_playground_is_served_without_external_resources(server_url):
    html = urllib.request.urlopen(server_url + "/", timeout=10).read().decode()
    assert 'id="final-text"' in html and 'id="error"' in html
    assert "http://" not in html and "https://" not in html  # no CDN, no external font or script


def test_playground_generates_in_a_browser(chromium, server_url):
    query = urllib.parse.urlencode({"prompt": "Once upon", "autorun": 1, "steps": 8, "max_tokens": 16,
                                    "block_length": 8, "seed": 0, "ban_eos": 1})
    page = run_page(chromium, f"{server_url}/?{query}")
    assert page["state"] == "done", page
    assert page["error"] == ""
    assert page["final"].strip(), page
    assert page["cells"] == 16 and page["masks"] == 0
    assert page["fresh"] >= 1  # the last step's commits are outlined
    assert page["scrubMax"] == 7  # one history entry per step
    assert page["disabled"] == ["stop"], page  # the run over: Run and Replay are back, Stop is off


def test_playground_infills_and_shows_errors(chromium, server_url):
    query = urllib.parse.urlencode({"prompt": "ab[MASK:4]cd", "autorun": 1, "steps": 4, "seed": 0})
    page = run_page(chromium, f"{server_url}/?{query}")
    assert page["state"] == "done", page
    assert page["final"].startswith("ab") and page["final"].endswith("cd")
    bad = urllib.parse.urlencode({"prompt": "x", "autorun": 1, "steps": 0, "max_tokens": 8})
    page = run_page(chromium, f"{server_url}/?{bad}")
    assert page["state"] == "error" and "400" in page["error"], page
    assert page["disabled"] == ["stop", "replay"], page  # a failed run leaves Run usable and nothing to replay


def test_playground_json_schema_tab(chromium, server_url):
    """The JSON tab: the answer shown validates against the schema typed in; an unsupported keyword is named."""
    from dlm.control.json_schema import validate

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "ok": {"type": "boolean"}}, "required": ["name"]}
    query = urllib.parse.urlencode({"tab": "json", "schema": json.dumps(schema), "json_prompt": "A sailor:",
                                    "json_seed": 0, "autorun": 1})
    page = run_page(chromium, f"{server_url}/?{query}", wait=WAIT_TAB)
    assert page["state"] == "done" and page["error"] == "", page
    assert page["tab"] == page["selected"] == "json" and not page["jsonHidden"] and page["canvasHidden"]
    value = json.loads(page["output"])
    assert validate(value, schema) == [] and list(value) == ["name", "n", "ok"]
    bad = urllib.parse.urlencode({"tab": "json", "schema": json.dumps({"type": "string", "format": "email"}),
                                  "autorun": 1})
    page = run_page(chromium, f"{server_url}/?{bad}", wait=WAIT_TAB)
    assert page["state"] == "error" and "400" in page["error"] and "format" in page["error"], page


def test_playground_infill_tab(chromium, server_url):
    """The Infill tab sets the mode to infill (and, without a gap in the prompt, writes an example with gaps)."""
    query = urllib.parse.urlencode({"tab": "infill", "prompt": "ab[MASK:4]cd", "steps": 4, "seed": 0, "autorun": 1})
    page = run_page(chromium, f"{server_url}/?{query}", wait=WAIT_TAB)
    assert page["state"] == "done" and page["mode"] == "infill" and page["selected"] == "infill", page
    assert page["final"].startswith("ab") and page["final"].endswith("cd") and page["jsonHidden"]
    query = urllib.parse.urlencode({"tab": "infill", "prompt": "no gap", "seed": 0, "max_span": 4, "autorun": 1})
    page = run_page(chromium, f"{server_url}/?{query}", wait=WAIT_TAB)
    assert page["state"] == "done", page
    assert page["final"].startswith("The old ") and "[MASK" not in page["final"]
