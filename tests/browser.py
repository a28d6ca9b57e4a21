"""A page as a person sees it: headless Chromium driven over the DevTools protocol (on a pipe, no extra package),
recording the page's own network requests and console errors, and a screenshot of the whole page."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@dataclass
class Visit:
    requests: list[str] = field(default_factory=list)  # URLs the page asked for (its own document included)
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, error log entries
    screenshot: bytes = b""
    height: int = 0  # of the whole page, CSS pixels
    values: dict = field(default_factory=dict)  # of the expressions asked for, evaluated in the loaded page


def visit(
    path: Path, screenshot: Path | None = None, expressions: dict[str, str] | None = None, width: int = 1200
) -> Visit:
    commands_read, commands_write = os.pipe()
    answers_read, answers_write = os.pipe()

    def pipes_on_3_and_4():  # where --remote-debugging-pipe expects them
        # copied above 4 first: the pipes may be 3 and 4 already, and dup2 onto itself keeps close-on-exec
        read, write = os.dup(commands_read), os.dup(answers_write)
        os.dup2(read, 3)
        os.dup2(write, 4)

    process = subprocess.Popen(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
         "--disable-background-networking", "--hide-scrollbars", f"--window-size={width},900", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=False,
        preexec_fn=pipes_on_3_and_4,
    )  # fmt: skip
    os.close(commands_read)
    os.close(answers_write)
    out, into = os.fdopen(answers_read, "rb"), os.fdopen(commands_write, "wb")
    buffer = b""
    counter = iter(range(1, 10_000))
    seen = Visit()

    def receive() -> dict:
        nonlocal buffer
        while b"\0" not in buffer:
            chunk = os.read(out.fileno(), 65536)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            buffer += chunk
        message, buffer = buffer.split(b"\0", 1)
        return json.loads(message)

    def note(event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            seen.requests.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            seen.errors.append(json.dumps(params.get("args"))[:300])
        elif method == "Runtime.exceptionThrown":
            seen.errors.append(json.dumps(params.get("exceptionDetails"))[:300])
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            seen.errors.append(params["entry"].get("text", "")[:300])

    def call(method: str, params: dict | None = None, session: str | None = None, until: str | None = None) -> dict:
        ident = next(counter)
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        into.write(json.dumps(message).encode() + b"\0")
        into.flush()
        result, waited = None, until is None
        while result is None or not waited:
            answer = receive()
            if answer.get("id") == ident:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                result = answer["result"]
            else:
                note(answer)
                waited = waited or answer.get("method") == until
        return result

    try:
        target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            call(f"{domain}.enable", session=session)
        call("Page.navigate", {"url": path.resolve().as_uri()}, session=session, until="Page.loadEventFired")
        for name, expression in (expressions or {}).items():
            answer = call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
            seen.values[name] = answer["result"].get("value")
        metrics = call("Page.getLayoutMetrics", session=session)
        seen.height = int(metrics["cssContentSize"]["height"])
        shot = call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
        seen.screenshot = base64.b64decode(shot["data"])
        if screenshot is not None:
            screenshot.write_bytes(seen.screenshot)
        call("Browser.close")
    finally:
        process.kill()
        process.wait(timeout=60)
        out.close()
        into.close()
    return seen
