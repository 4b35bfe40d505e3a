"""A real browser (Debian's headless Chromium, driven by Playwright) signs into the local Argilla UI and sees the
published dataset and its records, while a page of another origin, or of a DNS name pointed at 127.0.0.1, cannot
read them. Playwright's own browser download is never used: `executable_path` is Debian's.
"""

import shutil
import uuid

import pandas as pd
import pytest

from components.common import write_splits
from components.publish import load_frames, publish_to_argilla
from tests.components.test_publish import add_mining_columns, scored_frame
from tests.support.servers import StaticSite

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REBIND_NAME = "rebind.test"  # a web site's DNS name that resolves to 127.0.0.1 (DNS rebinding)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  f"--host-resolver-rules=MAP {REBIND_NAME} 127.0.0.1"]
# What a hostile page runs: read the records with the API key (as if it had learnt or guessed it).
FETCH_RECORDS = """async ([url, key]) => {
  try {
    const response = await fetch(url, {headers: {"X-Argilla-Api-Key": key}});
    return {read: true, status: response.status, body: await response.text()};
  } catch (error) {
    return {read: false, error: String(error)};
  }
}"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_dataset(browser, server, name: str, records: int):
    """Sign into the Argilla UI, open the dataset from the home page and wait for its record counter."""
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url)
    page.wait_for_url("**/sign-in**")
    page.locator("input[type=text]").fill(server.username)
    page.locator("input[type=password]").fill(server.password)
    page.locator("button[type=submit]").click()
    page.wait_for_url(lambda url: "sign-in" not in url)
    page.get_by_text(name).first.click()  # the dataset is listed on the home page
    page.wait_for_url("**/dataset/**")
    page.locator("body").get_by_text(f"of {records}").first.wait_for()  # the record counter
    return page


def test_browser_signs_in_and_sees_dataset_and_records(browser, argilla_server, tmp_path, kubeflow_docs):
    anchors = list(pd.read_parquet(kubeflow_docs / "train.parquet")["page_content"].iloc[[3, 10, 20]])
    test_anchors = list(pd.read_parquet(kubeflow_docs / "test.parquet")["page_content"].iloc[[0]])
    write_splits({"train": scored_frame(anchors, "train", 1), "test": scored_frame(test_anchors, "test", 2)},
                 tmp_path / "scored")
    name = f"browse-{uuid.uuid4().hex[:6]}"
    summary = publish_to_argilla(load_frames(tmp_path / "scored"), argilla_server.url, argilla_server.api_key, name)
    assert summary["records"] == 4

    page = open_dataset(browser, argilla_server, name, 4)  # both splits, 4 records
    body = page.locator("body")
    body.get_by_text("Find similar").first.wait_for()  # the anchor vector is there
    text = body.inner_text()
    assert name in text and "positive" in text and "negative" in text
    assert "SmolLM2-135M-Instruct test" in text  # the suggestions' agent
    assert any(f"How do I use part {i} of" in text for i in range(3))  # a suggestion of the record shown
    page.close()


def test_browser_shows_the_hard_negatives_rendered_for_review(browser, argilla_server, tmp_path, kubeflow_docs):
    anchors = list(pd.read_parquet(kubeflow_docs / "train.parquet")["page_content"].iloc[[3, 10, 20]])
    frame = add_mining_columns(scored_frame(anchors, "train", 1), ["kept", "dropped: roundtrip rank 14", "kept"],
                               [1, 14, 2])
    write_splits({"train": frame, "test": frame.iloc[:0]}, tmp_path / "mined")
    name = f"review-{uuid.uuid4().hex[:6]}"
    assert publish_to_argilla(load_frames(tmp_path / "mined"), argilla_server.url, argilla_server.api_key,
                              name)["records"] == 3

    page = open_dataset(browser, argilla_server, name, 3)
    body = page.locator("body")
    body.get_by_text("Mined hard negatives").first.wait_for()  # the field's title
    text = body.inner_text()
    shown = next(r for r in frame.to_dict("records") if r["positive"] and r["positive"] in text)
    assert shown["hard_negative_ids"][0] in text and "**1.**" not in text  # Markdown rendered, not shown raw
    first_line = next(line for line in shown["hard_negatives"][0].splitlines() if line.strip())
    assert first_line.lstrip("# ").strip()[:40] in text
    page.close()


def publish_three_records(server, tmp_path, kubeflow_docs) -> tuple[str, str]:
    """A dataset of three records; its id and one anchor's opening words."""
    import argilla as rg

    anchors = list(pd.read_parquet(kubeflow_docs / "train.parquet")["page_content"].iloc[[3, 10, 20]])
    write_splits({"train": scored_frame(anchors, "train", 1), "test": scored_frame(anchors, "test", 2).iloc[:0]},
                 tmp_path / "scored")
    name = f"private-{uuid.uuid4().hex[:6]}"
    assert publish_to_argilla(load_frames(tmp_path / "scored"), server.url, server.api_key, name)["records"] == 3
    dataset = rg.Argilla(api_url=server.url, api_key=server.api_key).datasets(name=name)
    return str(dataset.id), "How do I use part 0 of train?"


def test_a_page_of_another_origin_cannot_read_the_records(browser, argilla_server, tmp_path, kubeflow_docs):
    dataset_id, secret_text = publish_three_records(argilla_server, tmp_path, kubeflow_docs)
    records_url = f"{argilla_server.url}/api/v1/datasets/{dataset_id}/records?include=suggestions"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<html><body>another site</body></html>")
    site = StaticSite(tmp_path / "site").start()
    page = browser.new_page()
    try:
        page.goto(f"{site.url}/index.html")
        hostile = page.evaluate(FETCH_RECORDS, [records_url, argilla_server.api_key])
        assert hostile["read"] is False, hostile  # the browser refused: no Access-Control-Allow-Origin for it
        assert "Failed to fetch" in hostile["error"]

        page.goto(argilla_server.url)  # the same request from the server's own origin reads them: the key is good
        own = page.evaluate(FETCH_RECORDS, [records_url, argilla_server.api_key])
        assert own["read"] and own["status"] == 200 and secret_text in own["body"], own
    finally:
        page.close()
        site.stop()


def test_a_page_reaching_the_server_through_another_dns_name_gets_nothing(browser, argilla_server):
    rebound = argilla_server.url.replace("127.0.0.1", REBIND_NAME)
    page = browser.new_page()
    try:
        response = page.goto(rebound)  # same origin as the page, so CORS does not apply; the Host check does
        assert response.status == 400 and "Invalid host header" in page.content()
        hostile = page.evaluate(FETCH_RECORDS, [f"{rebound}/api/v1/me/datasets", argilla_server.api_key])
        assert hostile["read"] and hostile["status"] == 400 and hostile["body"] == "Invalid host header", hostile
    finally:
        page.close()
