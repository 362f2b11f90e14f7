"""The web console (/ui) in a real headless browser: Debian's chromium, driven by
selenium through Debian's chromedriver (installed here with apt-get when missing).

Load it, navigate nodes, actors and commitments, rotate a principal's signing
secret, re-drive a dead letter and watch it delivered, without a reload.
``TROTH_SCREENSHOTS=DIR`` saves the pictures the README shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Receiver, call, wait_until
from troth.node import Node

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.slow


def ensure_browser() -> None:
    """Debian's chromium and chromedriver, installed by the test setup on a fresh
    machine (never a downloaded browser)."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get as root)")
    install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        subprocess.run(install, env=env, check=True, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    ensure_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def accept_alert(browser: object) -> bool:
    """Accept the page's ``confirm()``, once it is up."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.remote.webdriver import WebDriver

    assert isinstance(browser, WebDriver)
    try:
        browser.switch_to.alert.accept()
    except NoAlertPresentException:
        return False
    return True


def test_console_navigates_and_redrives_a_dead_letter(
    browser: object, make_node: Callable[..., Node], receiver: Receiver
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import Select

    assert isinstance(browser, WebDriver)
    node = make_node("n1", serve=True)
    shots = os.environ.get("TROTH_SCREENSHOTS")

    def shot(name: str) -> None:
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(Path(shots) / f"console-{name}.png"))

    def text() -> str:
        return str(browser.find_element(By.ID, "view").text)

    def act(do: Callable[[], object]) -> None:
        """Do something to the page; the page re-renders itself every 2 s, so an
        element found just before may be replaced, or not laid out yet: find it
        again and retry."""
        from selenium.common.exceptions import (
            ElementClickInterceptedException,
            ElementNotInteractableException,
            StaleElementReferenceException,
        )

        for _ in range(50):
            try:
                do()
                return
            except (
                StaleElementReferenceException,
                ElementNotInteractableException,
                ElementClickInterceptedException,
            ):
                time.sleep(0.1)
        raise AssertionError("the page kept changing under the test")

    with httpx.Client(base_url=node.url, timeout=15) as api:
        for i in range(3):
            call(api, f"counter/c{i}", "increment")
        call(api, "probe/alice-p", "set", {"note": "hello"})
        # A commitment whose only delivery attempt fails: a dead letter.
        receiver.script = [500]
        made = api.post(
            "/v1/commitments",
            json={
                "trigger": {"type": "time_after", "delay_seconds": 0},
                "obligation": {"target": receiver.url + "/hook", "payload": {"order": 17}},
                "retry_policy": {"max_attempts": 1},
                "dedup_key": "order-17",
                "metadata": {"customer": "c-9"},
            },
        ).json()
        cid = made["id"]
        wait_until(lambda: api.get(f"/v1/commitments/{cid}").json()["status"] == "failed")

    # Nodes: the node, its shards' leases.
    browser.get(f"{node.url}/ui")
    # (a shard counts as served once its owner's heartbeat says so)
    wait_until(lambda: "n1 (this node)" in text() and "64/64 served" in text(), timeout=15)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".grid div")) == 64
    shot("nodes")

    # Actors by type, then one actor's checkpoint.
    act(lambda: browser.find_element(By.ID, "nav-actors").click())
    wait_until(lambda: "counter/c2" in text(), timeout=10)
    act(lambda: Select(browser.find_element(By.ID, "actor-type")).select_by_value("probe"))
    wait_until(lambda: "probe/alice-p" in text() and "counter/c0" not in text(), timeout=10)
    act(lambda: browser.find_element(By.LINK_TEXT, "probe/alice-p").click())
    wait_until(lambda: '"note": "hello"' in text(), timeout=10)
    shot("actor")

    # Commitments: found by dedup_key, by metadata.
    submit = "form.filters button[type=submit]"
    act(lambda: browser.find_element(By.ID, "nav-commitments").click())
    wait_until(lambda: cid in text(), timeout=10)
    act(lambda: browser.find_element(By.ID, "q").send_keys("order-17"))
    act(lambda: browser.find_element(By.CSS_SELECTOR, submit).click())
    wait_until(lambda: cid in text() and "failed" in text(), timeout=10)
    act(lambda: browser.find_element(By.ID, "q").clear())
    act(lambda: browser.find_element(By.ID, "meta").send_keys("customer=c-9"))
    act(lambda: browser.find_element(By.CSS_SELECTOR, submit).click())
    wait_until(lambda: cid in text(), timeout=10)
    shot("commitments")

    # The principal's signing secret: where it stands (never the secret), then rotated
    # at once, as after a leak (the button asks first).
    wait_until(lambda: "Signing secret of local" in text() and "never rotated" in text())
    rotate_now = "//button[contains(., 'stopping now')]"
    act(lambda: browser.find_element(By.XPATH, rotate_now).click())
    wait_until(lambda: accept_alert(browser), timeout=5)
    wait_until(lambda: "rotated at" in text(), timeout=10)
    with httpx.Client(base_url=node.url, timeout=15) as api:
        secret = api.get("/v1/commitments-secret").json()
    assert secret["rotated_at"] is not None and secret["secret"] not in text()

    # Dead letters: re-drive it; the page shows it delivered without a reload.
    act(lambda: browser.find_element(By.ID, "nav-dead").click())
    row = f"tr[data-commitment='{cid}']"
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, row), timeout=10)
    shot("dead-letters")
    browser.execute_script("window.notReloaded = true")
    act(lambda: browser.find_element(By.CSS_SELECTOR, f"{row} button").click())  # Re-drive
    wait_until(lambda: not browser.find_elements(By.CSS_SELECTOR, row), timeout=15)
    assert browser.execute_script("return window.notReloaded") is True
    assert receiver.count() == 2
    assert {r.headers["idempotency-key"] for r in receiver.requests} == {
        receiver.requests[0].headers["idempotency-key"]
    }
    browser.get(f"{node.url}/ui/#commitment/local/{cid}")
    # read in one step: the page re-renders every 2 s, so a found element may go stale
    status = "const e = document.getElementById('commitment-status'); return e && e.textContent"
    wait_until(lambda: browser.execute_script(status) == "fulfilled", timeout=20)
    assert "Delivery attempts" in text()
    shot("commitment")
