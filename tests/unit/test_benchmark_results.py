"""Figures in the docs come from result files the benchmarks wrote.

A figure is cited as a Markdown link to its file and key, `[2.07](benchmarks/results/run.json#key)`
(paths relative to the citing file); this test checks that every such file exists with its
command, machine and date, that the key is there, and that the number shown is the file's, as
rounded in the text.
"""
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
CITATION = re.compile(r"\[([^\]]+)\]\(((?:\.\./)*(?:benchmarks/)?results/[\w.-]+\.json)#([\w.-]+)\)")
CITING_FILES = [REPO / "README.md", REPO / "benchmarks" / "README.md",
                *sorted((REPO / "docs").glob("*.md"))]


def citations() -> list[tuple[Path, str, Path, str]]:
    """(citing file, shown text, result file, key) for every citation in the docs."""
    found = []
    for doc in CITING_FILES:
        for shown, target, key in CITATION.findall(doc.read_text()):
            found.append((doc, shown, (doc.parent / target).resolve(), key))
    return found


def shown_number(text: str) -> tuple[float, int]:
    """The number in a citation's text and its decimals: '2.07x' -> (2.07, 2), '1,424' -> (1424, 0)."""
    match = re.search(r"-?\d[\d,]*(?:\.(\d+))?", text)
    assert match, f"no number in citation text {text!r}"
    return float(match.group(0).replace(",", "")), len(match.group(1) or "")


def test_every_result_file_says_how_where_and_when_it_was_made():
    files = sorted(RESULTS.glob("*.json"))
    assert files, "no benchmark results in benchmarks/results"
    for path in files:
        record = json.loads(path.read_text())
        # A benchmark script, or a documented rehearsal test that records what it measured.
        assert record["command"].startswith(("python benchmarks/", "python -m pytest tests/")), \
            path.name
        assert record["machine"]["cpus"] >= 1 and record["machine"]["cpu"], path.name
        assert re.match(r"\d{4}-\d\d-\d\dT", record["date"]), path.name
        assert record["figures"], path.name


def test_the_docs_cite_figures_from_existing_result_files():
    cited = citations()
    assert len(cited) >= 5, "the docs cite (almost) no measured figure"
    for doc, shown, target, key in cited:
        where = f"{doc.relative_to(REPO)}: [{shown}]({target.name}#{key})"
        assert target.is_file(), f"{where}: no such result file"
        figures = json.loads(target.read_text())["figures"]
        assert key in figures, f"{where}: the file has no figure {key!r}"
        value, decimals = shown_number(shown)
        assert value == pytest.approx(round(figures[key], decimals), abs=10 ** -decimals / 2), \
            f"{where}: the text says {value}, the file {figures[key]}"


def test_the_citation_check_catches_a_wrong_number():
    """Negative control of the comparison above."""
    value, decimals = shown_number("**2.07x**")
    assert (value, decimals) == (2.07, 2)
    assert value != pytest.approx(round(2.0849, decimals), abs=10 ** -decimals / 2)
