"""Headless-Chromium check of the Prefect and MLflow UIs and of report pages: each page loads, shows what it
should, logs no errors.

    python bench/ui_check.py [--out DIR]      (the stack must be up: python -m infra.stack up; the newest
                                              report page under KOTODAMA_HOME is checked too)
    python bench/ui_check.py --report PATH/report.html [--out DIR]   (a report or comparison page; no stack)

Drives Chromium through the DevTools protocol: navigates, waits for the page to settle, collects
uncaught exceptions, console errors and error log entries (failed requests included), checks that the
expected run names appear in the rendered text, and saves a screenshot per page. Exit code 0 when every
page passes. Needs the Debian package `chromium`.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def chromium_binary() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@dataclass
class PageResult:
    url: str
    screenshot: Path
    errors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.missing


class Browser:
    """One headless Chromium with a DevTools websocket to its first page."""

    def __init__(self, binary: str):
        self.profile = Path(tempfile.mkdtemp(prefix="kotodama-chromium-"))
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--disable-extensions", "--window-size=1440,900", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > end or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 << 20)
        self._id = 0
        self.events: list[dict] = []
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=max(0.05, end - time.monotonic()))))
            except TimeoutError:
                break

    def text(self) -> str:
        res = self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                        returnByValue=True)
        return res.get("result", {}).get("value", "") or ""

    def check(self, url: str, expect: list[str], screenshot: Path, settle: float = 20.0,
              full_page: bool = False) -> PageResult:
        self.events.clear()
        self.call("Page.navigate", url=url)
        result = PageResult(url=url, screenshot=screenshot)
        end = time.monotonic() + settle
        found: set[str] = set()
        while time.monotonic() < end:  # SPAs render after their API calls: poll until the text shows
            self.pump(1.0)
            page_text = self.text()
            found = {e for e in expect if e in page_text}
            if len(found) == len(expect) and time.monotonic() > end - settle + 3:
                self.pump(2.0)
                break
        result.missing = [e for e in expect if e not in found]
        result.errors = page_errors(self.events)
        png = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=full_page,
                        **({"clip": self.page_clip()} if full_page else {}))["data"]
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(png))
        return result

    def page_clip(self) -> dict:
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        return {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - closing a broken socket
            pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


# Requests the UIs themselves make to endpoints their servers do not have (nothing of ours): Prefect's UI asks
# for /favicon.ico and, for some state badges, /ico/undefined.svg; MLflow's UI probes its optional auth app.
KNOWN_UI_404 = ("/favicon.ico", "/ico/undefined.svg", "/ajax-api/2.0/mlflow/users/current")


def page_errors(events: list[dict]) -> list[str]:
    """Uncaught exceptions, console.error/assert calls and error log entries (failed requests included),
    except the 404s of KNOWN_UI_404."""
    errors = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", ""))[:300])
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            errors.append(f"console.{p['type']}: {args[:300]}")
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            entry = p["entry"]
            if entry.get("source") == "network" and entry.get("url", "").endswith(KNOWN_UI_404) \
                    and "404" in entry.get("text", ""):
                continue
            errors.append(f"log: {p['entry'].get('text', '')[:300]} {p['entry'].get('url', '')}")
    return errors


def pages_for_stack(urls: dict[str, str]) -> list[tuple[str, str, list[str]]]:
    """(name, url, expected texts): the Prefect flow-runs list and newest run, the MLflow experiment."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=5, sort="START_TIME_DESC")
    if not runs:
        raise RuntimeError("the Prefect server holds no flow runs yet: run a deployment first")
    newest = runs[0]
    mc = MlflowClient(urls["mlflow"])
    exp = mc.get_experiment_by_name("kotodama")
    if exp is None:
        raise RuntimeError("no MLflow experiment 'kotodama' yet: run a deployment first")
    parents = mc.search_runs([exp.experiment_id], filter_string="tags.`kotodama.pipeline` != ''",
                             order_by=["attributes.start_time DESC"], max_results=1)
    ui = urls["prefect_ui"]
    pages = [("prefect-runs", f"{ui}/runs", [newest.name]),
             ("prefect-flow-run", f"{ui}/runs/flow-run/{newest.id}", [newest.name])]
    if parents:
        parent = parents[0]
        pages.append(("mlflow-experiment", f"{urls['mlflow']}/#/experiments/{exp.experiment_id}/runs",
                      [parent.info.run_name]))
        pages.append(("mlflow-run", f"{urls['mlflow']}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}",
                      [parent.info.run_name]))
    return pages


def run_checks(urls: dict[str, str], out: Path) -> list[PageResult]:
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("chromium not found (Debian: apt-get install -y chromium)")
    browser = Browser(binary)
    try:
        return [browser.check(url, expect, out / f"{name}.png") for name, url, expect in pages_for_stack(urls)]
    finally:
        browser.close()


# The section headings every report page shows, in page order (the NCA section only where there is one).
REPORT_SECTIONS = ("Headline", "Evaluation", "Configuration", "Tracking: MLflow and Prefect", "Geometry",
                   "Notes on missing or bad data")


def check_report(page: Path, out: Path, expect: tuple[str, ...] = REPORT_SECTIONS,
                 full_page: bool = True) -> PageResult:
    """Open a report page from disk, check that every section heading is rendered and that nothing logs an
    error, and save a (full-page) screenshot to `out/<page stem>.png`."""
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("chromium not found (Debian: apt-get install -y chromium)")
    browser = Browser(binary)
    try:
        result = browser.check(page.resolve().as_uri(), list(expect), out / f"{page.stem}.png", settle=5.0,
                               full_page=full_page)
        result.missing += section_order_problems(browser, expect)
        return result
    finally:
        browser.close()


def section_order_problems(browser: Browser, expect: tuple[str, ...]) -> list[str]:
    """The rendered h2 headings must hold `expect` in that order (headline first, notes last)."""
    res = browser.call("Runtime.evaluate", returnByValue=True,
                       expression="Array.from(document.querySelectorAll('h2')).map(h => h.innerText)")
    headings = res.get("result", {}).get("value") or []
    positions = [next((i for i, h in enumerate(headings) if h.startswith(e)), None) for e in expect]
    problems = [f"section {e!r} (no such h2)" for e, p in zip(expect, positions) if p is None]
    found = [p for p in positions if p is not None]
    if found != sorted(found):
        problems.append(f"sections out of order: {headings}")
    return problems


def newest_report() -> Path | None:
    """The most recently written report.html under KOTODAMA_HOME's report artifacts, if any."""
    from kotodama_core.artifacts import kotodama_home

    pages = list((kotodama_home() / "artifacts" / "report").glob("*/report.html"))
    return max(pages, key=lambda p: p.stat().st_mtime) if pages else None


def print_results(results: list[PageResult]) -> None:
    for r in results:
        print(f"{'PASS' if r.ok else 'FAIL'} {r.url}  screenshot {r.screenshot}")
        for e in r.errors:
            print(f"    error: {e}")
        for m in r.missing:
            print(f"    not shown: {m!r}")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python bench/ui_check.py")
    parser.add_argument("--out", type=Path, default=Path("ui-check"))
    parser.add_argument("--report", type=Path, action="append", default=[],
                        help="check this report.html / compare.html page instead of the stack's UIs")
    args = parser.parse_args(argv)
    if args.report:
        t0 = time.monotonic()
        results = [check_report(p, args.out) for p in args.report]
        print_results(results)
        print(f"{sum(r.ok for r in results)}/{len(results)} pages pass in {time.monotonic() - t0:.1f}s")
        return 0 if all(r.ok for r in results) else 1

    from infra.stack import Stack, stack_env

    stack = Stack.from_env()
    urls = stack.urls()
    if not urls:
        print(f"error: the stack is not up (no {stack.env_file}); run python -m infra.stack up", file=sys.stderr)
        return 2
    os.environ.update({k: v for k, v in stack_env(stack, urls).items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"})
    t0 = time.monotonic()
    results = run_checks(urls, args.out)
    report = newest_report()
    if report is not None:  # the pipeline's own page, beside the UIs that link to it
        results.append(check_report(report, args.out))
    print_results(results)
    print(f"{sum(r.ok for r in results)}/{len(results)} pages pass in {time.monotonic() - t0:.1f}s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
