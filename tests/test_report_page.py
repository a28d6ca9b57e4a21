"""report.html: one self-contained page per run (no script, no file or font from elsewhere), rebuilt by train, export,
eval and `qtune report`, and looked at in headless Chromium as a person would see it."""

import json
import re
import shutil

import pytest
from browser import chromium, visit


@pytest.fixture(scope="module")
def page_run(llama_run, tmp_path_factory):
    """A finished run, exported and evaluated: every section of its page has something to show."""
    from qtune.cli import main

    run = tmp_path_factory.mktemp("page") / "run"
    shutil.copytree(llama_run, run)
    assert "No exports yet" in (run / "report.html").read_text()  # written at the end of `qtune train`
    assert main(["export", str(run), "--format", "merged_fp16", "--format", "gguf_q8_0", "--eval-samples", "4"]) == 0
    assert main(["eval", str(run), "--samples", "4"]) == 0
    return run


def test_a_finished_run_has_a_self_contained_report_page(page_run, run_cli):
    run = page_run
    page = run / "report.html"
    text = page.read_text()
    for section in (
        "Recipe",
        "Data",
        "Training",
        "Generations before and after",
        "Exports",
        "Evaluation",
        "Environment",
    ):
        assert f">{section}</h2>" in text, section
    # self-contained: nothing fetched from anywhere, no script; links only inside the page
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", text, re.IGNORECASE)
    references = re.findall(r'(?:src|href)="([^"]*)"', text)  # the contents links, and the SVGs' own markers
    assert references and all(r.startswith("#") for r in references), [r for r in references if not r.startswith("#")]
    assert {f"#{s}" for s in re.findall(r'<h2 id="([^"]+)"', text)} <= set(references)
    assert all(u.startswith("#") for u in re.findall(r"url\(([^)]*)\)", text)) and "@import" not in text
    assert 20_000 < page.stat().st_size < 400_000  # KB, not MB
    # the charts: length histogram, loss, learning rate, size against KL
    assert text.count("<svg") == 4 and text.count("<figcaption>") == 4
    # the settings the recipe changed are highlighted (lora.r 8 against the default 16)
    assert '<tr class="changed"><td>lora.r</td><td class="text">8</td>' in text
    assert '<tr class=""><td>quant.type</td>' in text
    # generations before and after: validation prompts, the base's and the fine-tuned answers, the reference
    generations = json.loads((run / "generations.json").read_text())["samples"]
    assert len(generations) == 3 and all(g["prompt"] and g["reference"] for g in generations)
    assert any(g["base"] != g["fine_tuned"] for g in generations)
    assert all(g["reference"].replace("&", "&amp;") in text for g in generations)
    # the export and eval tables, with the plan's prediction beside the measured peak
    assert ">gguf_q8_0</td>" in text and ">base (4-bit)</td>" in text and "the plan predicted" in text
    code, out, err = run_cli("report", run)
    assert code == 0 and out.strip() == str(page), err


def test_report_on_a_folder_that_is_no_run_is_one_line(tmp_path, run_cli):
    code, out, err = run_cli("report", tmp_path)
    assert code == 5 and err.startswith("qtune: error: not a qtune run folder") and err.count("\n") == 1


@pytest.mark.skipif(
    chromium() is None, reason="no Chromium here (Debian: apt-get install chromium; .ci/run installs it)"
)
def test_the_page_as_a_person_sees_it_in_a_headless_browser(page_run, tmp_path):
    """Opened from a file:// URL in headless Chromium: it asks for nothing but itself, logs no error, draws every chart
    and fills the generations table; the screenshot is kept beside the test's files."""
    from PIL import Image

    shot = tmp_path / "report.png"
    seen = visit(
        page_run / "report.html",
        shot,
        expressions={
            "charts": "document.querySelectorAll('figure svg').length",
            "drawn": "[...document.querySelectorAll('figure svg')].every(s => s.getBoundingClientRect().height > 100)",
            "generations": "document.querySelectorAll('#generations-before-and-after ~ table')[0].rows.length",
            "sections": "[...document.querySelectorAll('h2')].map(h => h.textContent)",
        },
    )
    assert seen.requests == [(page_run / "report.html").resolve().as_uri()]
    assert seen.errors == []
    assert seen.values["charts"] == 4 and seen.values["drawn"] is True
    assert seen.values["generations"] == 4  # a header and 3 prompts
    assert seen.values["sections"] == [
        "Recipe", "Data", "Training", "Generations before and after", "Exports", "Evaluation", "Environment"
    ]  # fmt: skip
    image = Image.open(shot).convert("L")
    assert image.size[0] == 1200 and image.size[1] >= seen.height > 2500
    ink = sum(1 for value in image.resize((120, image.size[1] // 10)).getdata() if value < 200)
    assert ink > 0.005 * 120 * (image.size[1] // 10)  # text, tables and charts (1.7% measured), not a blank page
