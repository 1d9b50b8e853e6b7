"""Check a rendered report as a reader meets it: the HTML in headless Chromium, the PDF by its captions.

    python -m report.check --profile tiny

HTML: Chromium (the distribution's package, `apt-get install chromium`) loads report.html headless, driven over
the Chrome DevTools protocol (websocket-client); the check fails on any console error or uncaught exception,
unless every chart is drawn (one vega-embed <svg>/<canvas> per figure the renderer declared in
declared.json), and on any request to the network (the report is self-contained). It keeps a screenshot, report/_output/<profile>/screenshot.png. PDF: the figure and table
captions ("Figure N:", "Table N:") counted against the same declaration, and the page count.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import click
import pypdf
import websocket

from report.render import DECLARED, OUTPUT_DIR

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRAWN_CHARTS = ".vega-embed svg.marks, .vega-embed canvas.marks"
CAPTION = re.compile(r"^(Figure|Table)\s+(\d+):", re.MULTILINE)  # typst: a no-break space, text extraction: more


class CheckError(RuntimeError):
    """The report fails a check; the message says which and what was found."""


LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


@dataclass
class BrowserResult:
    charts: int
    errors: list[str]
    remote_requests: list[str]  # URLs the page fetched from the network (a self-contained report fetches none)
    screenshot: Path


def chromium() -> str:
    path = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    if path is None:
        raise CheckError("Chromium is not installed; install the distribution's package (apt-get install chromium)")
    return path


class DevTools:
    """One page of a headless Chromium, spoken to over the DevTools protocol."""

    def __init__(self, binary: str, profile_dir: str, width: int = 1400, height: int = 1000):
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(profile_dir) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise CheckError(f"Chromium ({binary}) did not start its DevTools endpoint within 30 s")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as response:
                page = next(t for t in json.load(response) if t["type"] == "page")
            # No Origin header: Chromium refuses websocket clients whose origin it was not told to allow.
            self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        except Exception:
            self.close()
            raise
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise CheckError(f"DevTools {method} failed: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise CheckError(f"the page did not reach {method} within {timeout} s")
            self.socket.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.socket.recv()))

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and log entries of level error, seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def remote_requests(self) -> list[str]:
        """URLs requested from anywhere but the page itself (file:, data:, blob:), seen so far."""
        urls = [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]
        return [url for url in urls if not url.startswith(LOCAL_SCHEMES)]

    def close(self) -> None:
        if getattr(self, "socket", None):
            self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=10)


def check_html(html: Path, n_figures: int, screenshot: Path, timeout: float = 30) -> BrowserResult:
    """Load `html` headless; wait until `n_figures` charts are drawn (or `timeout`); screenshot the first screen."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile_dir:
        browser = DevTools(chromium(), profile_dir)
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                browser.call(f"{domain}.enable")
            browser.call("Page.navigate", url=html.resolve().as_uri())
            browser.wait_for("Page.loadEventFired", timeout)
            deadline = time.monotonic() + timeout
            charts = browser.evaluate(f"document.querySelectorAll({json.dumps(DRAWN_CHARTS)}).length")
            while charts < n_figures and time.monotonic() < deadline:
                time.sleep(0.2)
                charts = browser.evaluate(f"document.querySelectorAll({json.dumps(DRAWN_CHARTS)}).length")
            image = browser.call("Page.captureScreenshot", format="png")["data"]
            screenshot.write_bytes(base64.b64decode(image))
            return BrowserResult(charts, browser.errors(), browser.remote_requests(), screenshot)
        finally:
            browser.close()


def pdf_captions(pdf: Path) -> tuple[int, dict[str, int]]:
    """Page count and the number of distinct figure and table captions ('Figure 3:' ...) in the PDF's text."""
    reader = pypdf.PdfReader(str(pdf))
    text = "\n".join(page.extract_text() or "" for page in reader.pages)
    numbers = {"Figure": set(), "Table": set()}
    for kind, number in CAPTION.findall(text):
        numbers[kind].add(int(number))
    return len(reader.pages), {kind: len(found) for kind, found in numbers.items()}


def check(profile: str, out_dir: Path | None = None) -> list[str]:
    """Every check of the rendered report of `profile`; returns the lines to print, raises CheckError on failure."""
    out_dir = Path(out_dir) if out_dir else OUTPUT_DIR / profile
    declared_path = out_dir / DECLARED
    if not declared_path.exists():
        raise CheckError(f"{declared_path} is missing; render the report first (python -m report.render --profile "
                         f"{profile} --engine fallback)")
    declared = json.loads(declared_path.read_text())
    n_figures, n_tables = len(declared["figures"]), len(declared["tables"])
    problems, lines = [], []
    browser = check_html(out_dir / "report.html", n_figures, out_dir / "screenshot.png")
    lines.append(f"HTML: {browser.charts} of {n_figures} declared charts drawn, {len(browser.errors)} console "
                 f"errors, {len(browser.remote_requests)} network requests; screenshot {browser.screenshot}")
    if browser.charts != n_figures:
        problems.append(f"the HTML draws {browser.charts} charts, the report declares {n_figures} figures")
    problems += [f"console error: {e}" for e in browser.errors]
    problems += [f"not self-contained, it fetches {url}" for url in browser.remote_requests]
    pages, captions = pdf_captions(out_dir / "report.pdf")
    lines.append(f"PDF: {pages} pages, {captions['Figure']} figure and {captions['Table']} table captions "
                 f"(declared {n_figures} and {n_tables})")
    if (captions["Figure"], captions["Table"]) != (n_figures, n_tables):
        problems.append(f"the PDF has {captions['Figure']} figures and {captions['Table']} tables, the report "
                        f"declares {n_figures} and {n_tables}")
    if problems:
        raise CheckError("; ".join(problems))
    return lines


@click.command()
@click.option("--profile", default="tiny", show_default=True, help="Profile whose rendered report to check.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Report directory (default: "
              "report/_output/<profile>).")
def main(profile: str, out_dir: Path | None) -> None:
    try:
        for line in check(profile, out_dir):
            click.echo(line)
    except CheckError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
