"""The "Mesh migration" page (issue 17, item 1), as an operator sees it: behind Airflow's own login, inside the Airflow
UI, each service of a wave that ran shows the state and the reason of its outcome record, with the run's chart."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as until
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import chromium
from tests.e2e.conftest import ROOT, Stack

pytestmark = pytest.mark.e2e

GATES = "meshwave_e2e_gates_gates"  # an EARLY run: three services, three different outcomes
ARTIFACTS = Path(os.environ.get("MESHWAVE_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def latest_real_emergency(stack: Stack) -> str | None:
    """Its latest run that was not a dry run, or whose `confirm` a person answered with apply."""
    runs = stack.airflow.api("GET", "/dags/mesh_emergency_rollback/dagRuns?order_by=-run_after&limit=50")["dag_runs"]

    def real(run: dict) -> bool:
        conf = run.get("conf") or {}
        if conf.get("confirm"):
            try:
                answer = stack.airflow.xcom("mesh_emergency_rollback", run["dag_run_id"], "confirm")
            except urllib.error.HTTPError:  # confirm has not answered (or not run)
                return False
            return bool((answer or {}).get("applied"))
        return conf.get("dry_run") is False

    return next((r["dag_run_id"] for r in runs if real(r)), None)


def test_the_page_and_its_files_need_a_token(stack: Stack) -> None:
    base = f"{stack.airflow.url}/meshwave"
    for path in ("/", "/api/fleet", f"/reports/{GATES}/run.png"):
        assert status(base + path) == 401, path
        assert status(base + path, token="not-a-jwt") == 403, path  # Airflow's answer to a token it cannot read
    assert status(base + "/api/fleet", stack.airflow.token()) == 200


def test_each_service_shows_the_state_and_reason_of_its_record(stack: Stack) -> None:
    run_id, _ = stack.early_run("meshwave_e2e_gates_gates")
    records = {r["service"]: r for r in stack.records(GATES, run_id).values()}
    assert {r["outcome"] for r in records.values()} >= {"permissive", "rolled_back"}, records

    with chromium() as browser:
        wait = WebDriverWait(browser, 90)
        browser.get(f"{stack.airflow.url}/plugin/mesh-migration")  # the UI's own route to the plugin's entry
        wait.until(until.presence_of_element_located((By.NAME, "username"))).send_keys("admin")
        browser.find_element(By.NAME, "password").send_keys(stack.airflow.password)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        # after the login, the Airflow UI shows the page in its frame; the frame's requests carry the UI's cookie
        wait.until(until.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
        section = wait.until(until.presence_of_element_located(
            (By.CSS_SELECTOR, f"section[data-dag-id='{GATES}']")))
        assert run_id in section.find_element(By.CSS_SELECTOR, "p").text
        # the emergency rollback writes no service records: the page names its latest real run (test_emergency.py's,
        # in a whole session) above the records it may have overtaken, and shows no such note when there is none
        banner = browser.find_elements(By.ID, "emergency")
        if (real := latest_real_emergency(stack)) is None:
            assert not banner, banner[0].text
        else:
            assert real in banner[0].text, banner[0].text
        shown = {}
        for row in section.find_elements(By.CSS_SELECTOR, "tr[data-service]"):
            cells = row.find_elements(By.TAG_NAME, "td")
            link = row.find_element(By.LINK_TEXT, "open").get_attribute("href")
            shown[row.get_attribute("data-service")] = (cells[3].text, cells[7].text, link)
        assert set(shown) == set(records)
        for service, record in records.items():
            state, reason, link = shown[service]
            assert (state, reason) == (record["outcome"], record["reason"]), service
            assert "/tasks/batch_1.outcome/mapped/" in link, link
        # the run's chart, served behind the same login, loaded in the page
        chart = section.find_element(By.CSS_SELECTOR, "img.chart")
        browser.execute_script("arguments[0].scrollIntoView()", chart)
        wait.until(lambda _: browser.execute_script("return arguments[0].complete", chart))
        assert browser.execute_script("return arguments[0].naturalWidth", chart) > 400
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.execute_script("arguments[0].scrollIntoView()", section)
        browser.save_screenshot(str(ARTIFACTS / "mesh-migration-wave.png"))  # the gates wave, its chart
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(ARTIFACTS / "mesh-migration-page.png"))  # the fleet and its waves
