"""Headless Chromium driven over the DevTools protocol through a pipe (``--remote-debugging-pipe``: JSON
messages ending in NUL on fds 3 and 4), so the browser tests need no Python package beyond the standard
library and no WebDriver. Chromium comes from the system (Debian: ``apt-get install chromium``)."""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


def _high_fd(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page. ``call`` sends a command to the page and waits for its answer."""

    def __init__(self, binary: str, profile: Path, size: tuple[int, int] = (1280, 900), log: Path | None = None):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the browser's ends move above 10, out of the way of the 3 and 4 they become in the browser
        to_chrome_r, from_chrome_w = (_high_fd(fd) for fd in (to_chrome_r, from_chrome_w))
        profile.mkdir(parents=True, exist_ok=True)
        args = [binary, "--headless=new", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
                "--use-angle=swiftshader", "--ignore-gpu-blocklist", "--mute-audio", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")
        # the protocol pipe must be fds 3 (commands) and 4 (answers) in the browser
        wrapper = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self._log = open(log or os.devnull, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(["bash", "-c", wrapper, *args], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._answers: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.call(f"{domain}.enable")

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from_chrome, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    msg = json.loads(raw)
                    if "id" in msg and msg["id"] in self._answers:
                        self._answers[msg["id"]].put(msg)
                    else:
                        self.events.append(msg)

    def call(self, method: str, params: dict | None = None, session: bool = True, timeout: float = 60) -> dict:
        with self._lock:
            self._next_id += 1
            msg_id = self._next_id
            self._answers[msg_id] = queue.Queue()
            msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = self.session
            os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        try:
            answer = self._answers[msg_id].get(timeout=timeout)
        except queue.Empty:
            raise CDPError(f"{method}: no answer in {timeout} s") from None
        finally:
            self._answers.pop(msg_id, None)
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The JSON value of a JavaScript expression (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(f"JavaScript error: {details.get('exception', {}).get('description') or details}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 120, interval: float = 1.0) -> Any:
        """Poll ``expression`` until it is truthy; its value. TimeoutError with the last value otherwise."""
        t_end, value = time.time() + timeout, None
        while time.time() < t_end:
            try:
                value = self.evaluate(expression)
            except CDPError as exc:
                value = str(exc)
            else:
                if value:
                    return value
            time.sleep(interval)
        raise TimeoutError(f"{expression!r} still {value!r} after {timeout} s")

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"}, timeout=120)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def console(self) -> list[str]:
        """Console messages and exceptions seen so far (for failure messages)."""
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.consoleAPICalled":
                p = e["params"]
                out.append(f"{p['type']}: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append("exception: " + str(e["params"]["exceptionDetails"].get("exception", {}).get("description")))
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=10)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        os.close(self._to_chrome)
        self._log.close()
