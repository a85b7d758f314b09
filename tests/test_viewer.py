"""The run viewer (`minipipe generate --html`): its reconstruction of every stage's KV cache, and
the page itself in a real browser.

Oracles: the local runtime's real caches, read after every message each stage handles (the
page's KV panels must show exactly those cells); the tokens the command prints (the page's
committed text at the last step); the events of the run (cancellations, pruned nodes, runs in
flight). Browser tests use Debian's headless Chromium through selenium and chromedriver, and
skip, saying why, where either is missing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from minipipe.config import load_config
from minipipe.draft import DraftModel
from minipipe.engine import Engine
from minipipe.events import Cancelled, Stepped
from minipipe.model import load_stage
from minipipe.request import Request
from minipipe.runtime import LocalPipeline, load_stage_models, split_layers
from minipipe.runtime.cost import fixed
from minipipe.strategies import (PipeInferStrategy, PipelineStrategy, SpecPipeStrategy, SpeculativeStrategy,
                                 TreeStrategy)
from minipipe.trace import TracedPipeline, Tracer
from minipipe.viewer import KVModel, Recording, build, render

from .conftest import SHIPPED_MODELS

TARGET, DRAFT = SHIPPED_MODELS / "tinybard", SHIPPED_MODELS / "tinybard-draft"
PROMPT = [1, 1889, 28, 201]  # "ROMEO:\n"


def make(name: str):
    draft = DraftModel(load_stage(DRAFT))
    return {
        "pipeline": lambda: PipelineStrategy(),
        "speculative": lambda: SpeculativeStrategy(draft, k=3),
        "tree": lambda: TreeStrategy(draft, schedule=(1, 2, 1)),
        "pipeinfer": lambda: PipeInferStrategy(draft, p_accept=0.05, n_draft=3, branches=2, max_inflight=6),
        "specpipe": lambda: SpecPipeStrategy(draft, width=2),
    }[name]()


def record(name: str, n_stages: int, prompts=(PROMPT,), tokens: int = 10):
    """Serve `prompts` on the local runtime, recording for the viewer and reading every stage's
    real cache after every message it handles."""
    config = load_config(TARGET)
    strategy = make(name)
    tracer = Tracer()
    local = LocalPipeline(load_stage_models(TARGET, split_layers(config.n_layers, n_stages)),
                          n_seqs=Engine.n_seqs(strategy, len(prompts)),
                          cost=fixed(config, load_config(DRAFT)), tracer=tracer)
    real = [[] for _ in range(n_stages)]
    local.watchers.append(lambda i, msg, out, t: real[i].append(local.stages[i].cache.cells()))
    pipe = TracedPipeline(local, tracer)
    requests = [Request(str(k), p, tokens, (2,)) for k, p in enumerate(prompts)]
    rec = Recording(pipe, None, requests, decode=lambda t: f"<{t}>")
    engine = Engine(pipe, strategy, max_running=len(prompts), listeners=[pipe.observe, rec])
    for r in requests:
        engine.add(r)
    engine.run()
    local.drain()  # the last edits (freeing the requests' cells) reach every stage
    return rec, real, requests


CASES = [("pipeline", 3, 1), ("speculative", 2, 1), ("tree", 2, 1), ("pipeinfer", 3, 1), ("specpipe", 4, 1),
         ("pipeinfer", 3, 2), ("specpipe", 3, 2)]


@pytest.mark.parametrize("name, n_stages, n_requests", CASES)
def test_kv_panels_show_each_stages_real_cache(name, n_stages, n_requests):
    prompts = [PROMPT, [1, 1889, 28, 201, 1889]][:n_requests]
    rec, real, _ = record(name, n_stages, prompts)
    model = build(rec)
    for stage in range(n_stages):
        shown = [[(cell, pos, seqs) for cell, pos, _token, seqs in version] for version in model["versions"][stage]]
        assert shown[0] == [] and len(shown) == len(real[stage]) + 1, (stage, len(shown), len(real[stage]))
        for k, (mine, theirs) in enumerate(zip(shown[1:], real[stage])):
            assert mine == theirs, f"stage {stage}, message {k}: {mine} != {theirs}"
    # every step shows, for each stage, the version after the messages it has handled by then
    last = model["steps"][-1]["versions"]
    assert last == [len(v) - 1 for v in model["versions"]]


def test_the_replay_shows_what_happened():
    rec, _, requests = record("pipeinfer", 3)
    model = build(rec)
    tokens = requests[0].sink.tokens
    committed = [t for s in model["steps"] if "commit" in s for t in s["commit"][1]]
    assert committed == tokens
    cancelled = {k for _, e in rec.events if isinstance(e, Cancelled) for k in e.ids}
    assert cancelled, "this run cancels runs"
    assert {s["cancel"] for s in model["steps"] if "cancel" in s} >= cancelled
    kinds = {s["kind"] for s in model["slices"]}
    assert {"prefill", "plain", "speculative", "cancelled"} <= kinds, kinds
    times = [s["t"] for s in model["steps"]]
    assert times == sorted(times)
    # the tree's rows are the rows sent: each parent was sent before its child
    for row in model["rows"]:
        if row["parent"] is not None:
            parent = model["rows"][row["parent"]]
            assert parent["pos"] == row["pos"] - 1 and parent["sent"] <= row["sent"]


def test_specpipe_pruned_rows_are_marked():
    rec, _, _ = record("specpipe", 4, tokens=14)
    model = build(rec)
    pruned = sum(e.pruned for _, e in rec.events if isinstance(e, Stepped))
    assert pruned, "this run prunes nodes"
    assert any(s["placed"] < s["rows"] or s["kind"] == "cancelled" for s in model["slices"])


def test_kv_model_follows_the_cache_rules():
    m = KVModel()
    for pos in range(3):
        m.alloc(pos, (0,), 10 + pos, None)
    m.apply_message(__import__("minipipe.transport.messages", fromlist=["KVCopy"]).KVCopy(0, 1, 0, 2))
    m.alloc(2, (1,), 99, None)
    assert m.snapshot() == [(0, 0, 10, (0, 1)), (1, 1, 11, (0, 1)), (2, 2, 12, (0,)), (3, 2, 99, (1,))]
    from minipipe.transport.messages import KVRemove

    m.apply(KVRemove(0, 1, None))  # sequence 0 forgets positions 1..: cell 2 is free, cell 1 stays for seq 1
    m.alloc(5, (0,), 7, None)  # the lowest free cell
    assert m.snapshot() == [(0, 0, 10, (0, 1)), (1, 1, 11, (1,)), (2, 5, 7, (0,)), (3, 2, 99, (1,))]


def test_page_is_self_contained():
    rec, _, _ = record("pipeline", 2, tokens=3)
    page = render(build(rec))
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads nothing from outside"
    assert "<link" not in page and "@import" not in page
    data = page.split('<script id="data" type="application/json">', 1)[1].split("</script>", 1)[0]
    assert json.loads(data)["steps"]


# ------------------------------------------------------------------------------------------------
# in a real browser


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless Chromium here (Debian: apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[browser]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--disable-extensions", "--window-size=1300,1400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def cli_page(tmp_path, capsys, *args) -> tuple[Path, str]:
    from minipipe.cli import main

    page = tmp_path / "run.html"
    code = main(["generate", "ROMEO:", "--max-new-tokens", "10", "--quiet", "--html", str(page), *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return page, out[:-1] if out.endswith("\n") else out  # the command ends its text with a newline


def severe(driver) -> list:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.mark.slow  # a browser per module and a page per case: about 40 s
@pytest.mark.parametrize("args", [
    ["--strategy", "pipeinfer", "--stages", "3", "--runtime", "local", "--p-accept", "0.05", "--draft", "3",
     "--branches", "2"],
    ["--strategy", "specpipe", "--stages", "4", "--runtime", "local", "--width", "2"],
    ["--strategy", "tree", "--stages", "2", "--tree-schedule", "1,2,1"],  # the process runtime
], ids=["pipeinfer-local", "specpipe-local", "tree-process"])
def test_page_in_a_browser(browser, tmp_path, capsys, args):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page, text = cli_page(tmp_path, capsys, *args)
    browser.get(page.as_uri())
    assert severe(browser) == []
    n = int(browser.find_element(By.ID, "step-count").text)
    assert n > 20
    assert browser.find_element(By.ID, "step-index").text == "0"
    body = browser.find_element(By.TAG_NAME, "body")
    for _ in range(5):
        body.send_keys(Keys.ARROW_RIGHT)
    assert browser.find_element(By.ID, "step-index").text == "5"
    body.send_keys(Keys.ARROW_LEFT)
    assert browser.find_element(By.ID, "step-index").text == "4"
    browser.find_element(By.ID, "next").click()
    assert browser.find_element(By.ID, "step-index").text == "5"

    # walk every step: the KV panel shows what the recorded model says, the slider follows
    data = json.loads(browser.execute_script("return document.getElementById('data').textContent"))
    seen_tree = seen_cancel = seen_inflight = 0
    for i in range(0, n, max(1, n // 60)):
        browser.execute_script(f"window.minipipeViewer.go({i})")
        step = data["steps"][i]
        assert browser.find_element(By.ID, "step-text").text == step["text"]
        assert browser.find_element(By.ID, "slider").get_attribute("value") == str(i)
        for stage, version in enumerate(step["versions"]):
            cells = browser.find_element(By.ID, f"kv-stage-{stage}").get_attribute("data-cells")
            assert int(cells) == len(data["versions"][stage][version])
        seen_tree += int(browser.find_element(By.ID, "tree").get_attribute("data-count")) > 0
        seen_cancel += int(browser.find_element(By.ID, "cancels").get_attribute("data-count")) > 0
        seen_inflight += int(browser.find_element(By.ID, "inflight").get_attribute("data-count")) > 0
    assert seen_tree and seen_inflight
    if "pipeinfer" in args:
        assert seen_cancel
    body.send_keys(Keys.END)
    assert browser.find_element(By.ID, "step-index").text == str(n - 1)
    generated = browser.find_element(By.CSS_SELECTOR, "#committed .gen").get_attribute("textContent")
    assert generated == text
    assert browser.find_elements(By.CSS_SELECTOR, "#lanes rect.slice")
    assert browser.find_elements(By.CSS_SELECTOR, "#lanes path.hop")
    assert severe(browser) == []
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000
