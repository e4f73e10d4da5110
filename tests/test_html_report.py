"""report.html: the study's tables, plots and outputs on one self-contained page, checked in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from adl_llm.html_report import write_html_report
from tests.conftest import EVAL_FILE, read_json, run_entrypoint, tiny_overrides

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory):
    """Four jobs of the tiny model: perplexity and decoding, zero-shot and 3-shot."""
    folder = tmp_path_factory.mktemp("sweep") / "study"
    args = tiny_overrides(tiny_model_dir, "gen=greedy", "gen.max_new_tokens=6")
    result = run_entrypoint("-m", *args, "task=eval,generate", "prompt=zero_shot,few_shot", f"hydra.sweep.dir={folder}")
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them where it can)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(flag)
    for flag in ("--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _slice_counts() -> dict[str, int]:
    from adl_llm.data import load_records, slice_names
    from tests.conftest import compose_config

    names = slice_names(load_records(str(EVAL_FILE), need_outputs=True), compose_config().data.slices)
    return {name: names.count(name) for name in set(names)}


@pytest.mark.slow
def test_every_multirun_writes_a_self_contained_page(sweep):
    page = (sweep / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched: works offline from disk
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert len(data["records"]) == 12 and {j["label"] for j in data["gen_jobs"]} == {
        "task=generate prompt=zero_shot",
        "task=generate prompt=few_shot",
    }
    for job in (p for p in sweep.iterdir() if (p / "predictions.json").is_file()):  # every output, by its record
        shown = {r["id"]: r["output"][job.name] for r in data["records"]}
        assert shown == {p["id"]: p["output"] for p in read_json(job / "predictions.json")}
    assert set(data["slices"]) == set(_slice_counts())


@pytest.mark.slow
def test_the_page_shows_filters_and_sorts_the_outputs(sweep, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get((sweep / "report.html").as_uri())
    rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#browser tbody tr")  # noqa: E731
    assert len(rows()) == 12
    summary = browser.find_element(By.ID, "sections").text
    assert "task=eval prompt=zero_shot" in summary and "ok" in summary  # the sweep's table
    generate_job = next(p for p in sweep.iterdir() if (p / "predictions.json").is_file())
    first = read_json(generate_job / "predictions.json")[0]
    if first["output"]:
        assert first["output"] in browser.find_element(By.ID, "browser").text  # an output, beside its record

    record = json.loads(EVAL_FILE.read_text(encoding="utf-8"))[0]
    assert record["instruction"].splitlines()[0] in browser.find_element(By.ID, "browser").text  # Chinese, as text

    counts = _slice_counts()
    name = min(counts, key=counts.get)
    Select(browser.find_element(By.ID, "slice-filter")).select_by_value(name)
    assert len(rows()) == counts[name]
    assert all(row.find_elements(By.TAG_NAME, "td")[1].text == name for row in rows())
    Select(browser.find_element(By.ID, "slice-filter")).select_by_value("")

    header = browser.find_element(By.CSS_SELECTOR, '#browser th[data-col^="ppl:"]')
    column = [th.get_attribute("data-col") for th in browser.find_elements(By.CSS_SELECTOR, "#browser th")].index(
        header.get_attribute("data-col")
    )
    header.click()  # ascending
    values = [float(r.find_elements(By.TAG_NAME, "td")[column].text) for r in rows()]
    assert values == sorted(values)
    browser.find_element(By.CSS_SELECTOR, '#browser th[data-col^="ppl:"]').click()  # descending
    values = [float(r.find_elements(By.TAG_NAME, "td")[column].text) for r in rows()]
    assert values == sorted(values, reverse=True)

    record = read_json(sweep / "0" / "metrics.json")["eval/ids"][3]
    browser.find_element(By.ID, "search").send_keys(record)
    assert [r.get_attribute("data-id") for r in rows()] == [record]


@pytest.mark.slow
def test_a_study_sized_page_renders_in_under_a_second(sweep, browser, tmp_path):
    """250 records and 8 decoding jobs, as the study's page holds: the whole table rendered in under a second."""
    big = tmp_path / "big"
    records = json.loads(EVAL_FILE.read_text(encoding="utf-8"))
    rows = [{**records[i % len(records)], "id": f"r{i}"} for i in range(250)]
    (tmp_path / "eval.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    for job in range(8):
        folder = big / str(job)
        shutil.copytree(sweep / "1", folder)
        run = read_json(folder / "run.json")
        run["config"]["data"]["eval_file"], run["config"]["data"]["n_eval"] = str(tmp_path / "eval.json"), None
        (folder / "run.json").write_text(json.dumps(run))
        (folder / ".hydra" / "overrides.yaml").write_text(f"- gen.beams={job + 1}\n")
        (folder / "predictions.json").write_text(
            json.dumps([{"id": r["id"], "output": r["output"][::-1]} for r in rows])
        )
        (folder / "metrics.json").write_text(json.dumps({"gen/chrf": 1.0}))
    write_html_report(big, [big], "250 x 8")
    started = time.monotonic()
    browser.get((big / "report.html").as_uri())
    assert time.monotonic() - started < 5  # the page with its data (a few MB), loaded from disk
    assert browser.find_element("id", "count").text == "showing 250 of 250 records"
    assert int(browser.execute_script("return Number(document.body.dataset.renderMs)")) < 1000
