"""End to end, a person before STRICT (issue 18 item 1): the waves of tests/e2e/plans/approval.yaml on the lab and a
real Prometheus, run EARLY.

- Wave `asked`: ap-yes (critical) and ap-no (high) pass their STRICT gates; the batch's approval task asks once for
  both, with their evidence. The approver (a thread beside the run, in headless Chromium on the task's Required
  Action page) approves ap-yes alone: ap-yes ends STRICT, ap-no PERMISSIVE "not approved", each with the approver in
  its record and the report. The chat webhook (a loopback server) was told a person is needed.
- Wave `unanswered`: ap-late's approval times out after 20 s: PERMISSIVE, "not approved", timed out.
Every record's sidecar and mTLS mode are the lab's data plane's.
"""

from __future__ import annotations

import csv
import os
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from meshwave.approval import NONE
from tests.e2e.conftest import EARLY, ROOT, Early, Stack
from tests.e2e.test_mtls import assert_records_match_the_data_plane, pa

pytestmark = pytest.mark.e2e

ASKED, UNANSWERED = "meshwave_e2e_approval_asked", "meshwave_e2e_approval_unanswered"
ARTIFACTS = Path(os.environ.get("MESHWAVE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
TASK = "approve_batch_1"
YES, NO, LATE = "lab/approve/ap-yes", "lab/approve/ap-no", "lab/approve/ap-late"


def _path(run_id: str) -> str:
    return f"/dags/{ASKED}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{TASK}"


def approve_ap_yes_only(stack: Stack, run_id: str) -> dict[str, Any]:
    """The approver: waits until the batch's approval task asks, then answers in the Airflow UI as a person does."""
    deadline = time.monotonic() + 600
    while True:
        try:
            state = stack.airflow.api("GET", _path(run_id))["state"]
        except urllib.error.HTTPError as exc:  # not created yet
            if exc.code != 404:
                raise
            state = None
        if state == "awaiting_input":
            break
        if state in ("success", "failed", "skipped", "upstream_failed") or time.monotonic() > deadline:
            raise AssertionError(f"{TASK} is {state}: it never asked")
        time.sleep(2)
    asked = stack.airflow.api("GET", f"{_path(run_id)}/-1/hitlDetails")
    seen = answer_in_the_ui(stack, run_id, "ap-yes")
    return {"asked": asked, "answer": stack.airflow.api("GET", f"{_path(run_id)}/-1/hitlDetails"), "seen": seen}


def answer_in_the_ui(stack: Stack, run_id: str, service: str) -> str:
    """Headless Chromium on the task's Required Action: sign in, read the request, take out the option the form
    pre-selects (the default, `none of them`), choose `service`, press Respond. Returns the text the person read;
    screenshots before and after are kept."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import chromium

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium() as browser:
        # the UI re-renders as it loads: an element read a moment ago may be gone
        wait = WebDriverWait(browser, 120, ignored_exceptions=[StaleElementReferenceException])
        browser.get(f"{stack.airflow.url}/dags/{ASKED}/runs/{urllib.parse.quote(run_id, safe='')}/tasks/{TASK}"
                    "/required_actions")
        wait.until(until.presence_of_element_located((By.NAME, "username"))).send_keys("admin")
        browser.find_element(By.NAME, "password").send_keys(stack.airflow.password)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        options = wait.until(until.presence_of_element_located(
            (By.CSS_SELECTOR, "input[role=combobox][aria-label='Select one or multiple values']")))
        read = browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(ARTIFACTS / "approval-asked.png"))
        options.send_keys(Keys.BACKSPACE)  # the pre-selected default
        options.send_keys(service)
        wait.until(lambda b: b.find_elements(By.XPATH, f"//*[@role='option'][contains(., '{service}')]"))
        options.send_keys(Keys.ENTER)
        chosen = [e.get_attribute("value") for e in browser.find_elements(By.NAME, "element_chosen_options")]
        assert chosen == [f"lab/approve/{service}"], chosen
        browser.find_element(By.XPATH, "//button[normalize-space()='Respond']").click()
        wait.until(lambda b: "Response received" in b.find_element(By.TAG_NAME, "body").text)
        browser.save_screenshot(str(ARTIFACTS / "approval-answered.png"))
        return read


EARLY[ASKED] = Early(ASKED, {}, during=approve_ap_yes_only)
EARLY[UNANSWERED] = Early(UNANSWERED, {})


def report_rows(stack: Stack, dag_id: str, run_id: str) -> dict[str, dict[str, str]]:
    path = Path(stack.airflow.xcom(dag_id, run_id, "report")["report"])
    with path.open() as f:
        return {row["service"]: row for row in csv.DictReader(f)}


def test_the_approver_chooses_which_services_go_strict(stack: Stack) -> None:
    run_id, state = stack.early_run(ASKED, timeout=900)
    approver = stack.during[ASKED].result(timeout=60)
    asked = approver["asked"]
    assert asked["options"] == [YES, NO, NONE], asked
    assert asked["defaults"] == [NONE] and asked["multiple"] is True, asked
    for service in (YES, NO):  # the evidence each is offered with
        line = next(line for line in asked["body"].splitlines() if service in line)
        assert "all " in line and "inbound is mutual TLS, no plaintext caller" in line, line
        assert "success 1.000 -> 1.000" in line and "(baseline -> soak)" in line, line
    assert approver["answer"]["chosen_options"] == [YES], approver
    assert approver["answer"]["responded_by_user"]["name"] == "admin", approver
    seen = approver["seen"]  # what the person read on the page
    assert "batch_1: approve STRICT for 2 service(s)" in seen and "ap-no (high): all " in seen, seen

    records = stack.records(ASKED, run_id)
    summary = {w: (r["outcome"], r["mtls"], r["reason"]) for w, r in records.items()}
    yes, no = records["ap-yes"], records["ap-no"]
    assert (yes["outcome"], yes["mtls"]) == ("strict", "STRICT"), summary
    assert yes["approval"]["approved"] is True and yes["approval"]["by"] == "admin", yes["approval"]
    assert yes["decisions"]["after_approval"].startswith("approved by admin at "), yes["decisions"]
    assert "the STRICT gate still held at the flip" in yes["decisions"]["after_approval"], yes["decisions"]
    assert pa(stack, "approve", "meshwave-ap-yes")["spec"]["mtls"]["mode"] == "STRICT"

    assert (no["outcome"], no["mtls"], no["sidecar"]) == ("permissive", "PERMISSIVE", True), summary
    assert no["reason"] == "not approved: admin did not choose it", summary
    assert no["approval"] == {"approved": False, "by": "admin", "at": no["approval"]["at"], "timed_out": False,
                              "why": no["reason"]}, no["approval"]
    assert pa(stack, "approve", "meshwave-ap-no") is None, "no STRICT policy was written"

    told = [t for t in stack.notified.texts() if t.startswith(f"meshwave: {ASKED}: approval needed before STRICT")]
    assert len(told) == 1 and f"batch_1: {YES}, {NO} ready for STRICT, waiting for a person" in told[0], told

    rows = report_rows(stack, ASKED, run_id)
    assert (rows[YES]["approval"], rows[NO]["approval"]) == ("approved by admin", "refused by admin"), rows
    assert state == "success", summary
    assert_records_match_the_data_plane(stack, records)


def test_nobody_answering_is_not_approved(stack: Stack) -> None:
    run_id, state = stack.early_run(UNANSWERED, timeout=900)
    records = stack.records(UNANSWERED, run_id)
    late = records["ap-late"]
    assert (late["outcome"], late["mtls"], late["sidecar"]) == ("permissive", "PERMISSIVE", True), late["reason"]
    assert late["reason"] == "not approved: nobody answered the approval in time", late["reason"]
    assert late["approval"]["timed_out"] is True and late["approval"]["by"] is None, late["approval"]
    assert pa(stack, "approve", "meshwave-ap-late") is None, "no STRICT policy was written"
    path = f"/dags/{UNANSWERED}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{TASK}/-1/hitlDetails"
    detail = stack.airflow.api("GET", path)
    assert detail["chosen_options"] == [NONE] and detail["responded_by_user"] is None, detail
    assert report_rows(stack, UNANSWERED, run_id)[LATE]["approval"] == "timed out"
    assert state == "success"
    assert_records_match_the_data_plane(stack, records)
