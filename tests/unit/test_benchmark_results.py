"""Figures in the docs come from result files the benchmarks wrote.

A figure is cited as a Markdown link to its file and key, `[2.07](benchmarks/results/run.json#key)`
(paths relative to the citing file; the key is one of the file's `figures`, or a dotted path into
its other blocks, `phases.conversion.seconds`); this test checks that every such file exists with
its command, machine and date, that the key is there, and that the number shown is the file's, as
rounded in the text. And that the docs hold no other measured figure: every number with a unit
of measurement (or alone in a table cell) outside a citation and outside code is one of the few
listed in NOT_MEASURED, each a setting, a limit, a published figure, an estimate or arithmetic.
"""
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
CITATION = re.compile(r"\[([^\]]+)\]"  # [text]
                      r"\(((?:\.\./)*(?:benchmarks/)?results/[\w.-]+\.json)#([\w.-]+)\)")
CITING_FILES = [REPO / "README.md", REPO / "benchmarks" / "README.md",
                *sorted((REPO / "docs").glob("*.md"))]


def citations() -> list[tuple[Path, str, Path, str]]:
    """(citing file, shown text, result file, key) for every citation in the docs."""
    found = []
    for doc in CITING_FILES:
        for shown, target, key in CITATION.findall(doc.read_text()):
            found.append((doc, shown, (doc.parent / target).resolve(), key))
    return found


def figure(record: dict, key: str) -> float | None:
    """The number a citation's key names: one of `figures`, else a dotted path into the record
    (`phases.conversion.seconds`); None if there is none."""
    if key in record["figures"]:
        return record["figures"][key]
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def shown_number(text: str) -> tuple[float, int]:
    """The number in a citation's text and its decimals: '2.07x' -> (2.07, 2), '1,424' ->
    (1424, 0)."""
    match = re.search(r"-?\d[\d,]*(?:\.(\d+))?", text)
    assert match, f"no number in citation text {text!r}"
    return float(match.group(0).replace(",", "")), len(match.group(1) or "")


def test_every_result_file_says_how_where_and_when_it_was_made():
    files = sorted(RESULTS.glob("*.json"))
    assert files, "no benchmark results in benchmarks/results"
    for path in files:
        record = json.loads(path.read_text())
        # A benchmark script, or a documented rehearsal test that records what it measured.
        assert record["command"].startswith(("python -m benchmarks.", "python benchmarks/",
                                              "python -m pytest tests/")), \
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
        found = figure(json.loads(target.read_text()), key)
        assert found is not None, f"{where}: the file has no figure {key!r}"
        value, decimals = shown_number(shown)
        assert value == pytest.approx(round(found, decimals), abs=10 ** -decimals / 2), \
            f"{where}: the text says {value}, the file {found}"


def test_the_citation_check_catches_a_wrong_number():
    """Negative control of the comparison above."""
    value, decimals = shown_number("**2.07x**")
    assert (value, decimals) == (2.07, 2)
    assert value != pytest.approx(round(2.0849, decimals), abs=10 ** -decimals / 2)


# A number (or range) with a unit of measurement: a ratio only with decimals (`2.03x`; `8×` is a
# count), and not after a comparison (`>= 90%`, `< 1 s`: a goal or a bound, not a result).
MEASURE = re.compile(
    r"(?<![\w.$/<>=≤≥-])(?<![<>=≤≥] )[~≈]?\s?(?:\d[\d,]*\.\d+\s?[x×]|\d[\d,]*(?:\.\d+)?"
    r"(?:\s?(?:-|–|to)\s?\d[\d,]*(?:\.\d+)?)?\s?(?:%|s\b|ms\b|min\b|minutes?\b|seconds?\b|"
    r"hours?\b|h\b|img/s|images/s|[KMGT]i?B\b|Gbit/s))")
# A number alone in a table cell, with decimals or thousands (`| 6.67 |`, `| 11,044 |`; whole
# small numbers there are mostly settings: px, steps).
BARE_CELL = re.compile(r"(?<=\|)\s*\**\s*[~≈]?\s?"
                       r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)"  # 1,424 or 2.07
                       r"\s*\**\s*(?=\|)")
CODE_SPAN = re.compile(r"`[^`]*`")

# Numbers with a unit that are not this project's measurements, by file: the phrase around each
# (the check skips a number inside one of these phrases on its line). Add one only for a setting,
# a limit, a hardware spec, a published or estimated figure, or arithmetic on cited ones; a figure
# this project measured gets a result file and a citation instead.
NOT_MEASURED = {
    "README.md": [
        "73.8% to 78.4% top-1, each file cites", "EMA (80.858%)",  # published, cited in recipes
        "over 25 MB", "finish within 40 minutes",  # a limit; the suite's budget
    ],
    "benchmarks/README.md": [
        "the 2-core, 24 GiB development VM",  # the machine
        "| 1.00 |",  # the baseline's ratio to itself
        "members over 4 MB", "reading 11 MB through", "than a 30 ms request",  # design thresholds
        "every 30 minutes) that is far below 1%",  # the default cadence; one step per epoch
        "85.77% top-1", "results (73.8% at 16", "epochs to 78.4% at 88)",  # published
        "photos, ~30 MB)", "within a 510 s budget", "estimated ~7 min",  # data; a limit; estimate
        # the GPU step's projections (labelled so), NVIDIA's and the H100's published figures,
        # and arithmetic on cited ones
        "| 2-4% with EMA on (~1.5-3 ms of launch-bound time in a ~65 ms step) |",
        "~2 ms a step of copy (38.5 MB of uint8 at ~20 GB/s)", "| 2-3% |", "| 5-10% (",
        "compiled step +15-30% over", "+8% job throughput", "reaches ~2,470 images/s",
        "~1.5x an A100 (3.35 vs 2.0 TB/s)", "~2.0 s an epoch on 10 workers, ~7% of a 26.7 s epoch",
        "(~0.4 s at 11 workers", "At 6,000 images/s a step of 256 has ~43 ms",
    ],
    "docs/aws.md": [
        "8 vCPU, 32 GiB", "8× A100 40 GB", "1× A10G 24 GB", "32 vCPU, 64 GiB",  # EC2 specs
        "8× H100 80 GB",
        "A100 **80 GB**", "has A100 40 GB",
        "every 15 minutes", "every 5 s", "every 5 minutes", "(60 s)",  # settings
        "(1200 s in the GPU",
        "~5 min):", "2-5 minutes to start the spot nodes",  # AWS estimates
        # the cold node's minutes: assumed or estimated, as the table says, beside cited ones
        "| 1-2 min | 1-2 min |", "| — | 1-2 min |", "assumed 60-120 MB/s", "| 3-5 min | 0.5 min |",
        "apt-get (~0.5 min)", "assumed 30-50 MB/s", "about 1-3 minutes less per cold node",
        "estimate: 3-5 minutes of setup", "estimates above, 1-3 minutes less", "| + ~1 min |",
        "every 30 s", "`scaling.start_check_s` (30 s)", "(1200 s) from when", "(900 s) on spot",
        "(1200 s) otherwise", "delays each spot A10G one by 45 s", "(up to 15 minutes of them",
        "~148 MB class tar", "in 32 MB requests",  # ImageNet's tars; a read size
        # AWS's stated figures and the arithmetic on them and on cited ones (result file's
        # `projection`)
        "latency 30 ms", "one S3 stream 90 MB/s, 12.5 Gbit/s", "requests × 30 ms",
        "147.9 GB / (4 × 1.56 GB/s)", "128 tasks × 1.67 s", "6.74 GB / 90 MB/s", "25 s network",
        "**390 s =",
        # the cost table: published throughput, list prices, an estimate, arithmetic on them
        "a 60 % spot discount", "| 16,621 |", "8× A100 80 GB", "| 77 s |", "| 0.47 |",
        "| 0.19 |", "1.9 h,", "2,470 img/s", "(600 / 2,039 GB/s)", "| 29 min |", "| 1.212 |",
        "| 0.59 |", "| 0.24 |", "44 h,", "| 0.384 |", "≈ 23,000 img/s", "the 80 % recipes",
        # the p5 row: benchmarks/README.md's H100 projection (labelled so), a list price and
        # arithmetic on them; the loader arithmetic beside it
        "| ≈ 30,000 |", "~3,500-4,000 img/s per H100", "| 43 s |", "| 55.04 |", "| 0.65 |",
        "| 0.26 |", "1.1 h,", "≈ 51,000 img/s",
    ],
    "docs/fault-tolerance.md": [
        "back-off (2-30 s", "back-off 2-30 s", "back 15 s later", "every 5 min",
        "AWS's 120 s (or 0 s)",
        "(120 s in all", "watcher poll 1 s", "up to 10 minutes",  # settings
        # the spot notice's time budget: settings and estimates, an upper bound by design
        "| 5 s |", "~0.07 s a step: 1,024 images at ~16,000 images/s) | 1 s |",
        "~200 MB; off the training thread) | ~2 s |",
        "| ~5 s |", "**~19 s**, leaving ~100 s", "under ~60 s",
    ],
}


def uncited_in(text: str, allowed: list[str]) -> list[tuple[int, str]]:
    """(line, figure) for every number with a unit (or alone in a table cell) in `text` outside
    citations, code and the `allowed` phrases."""
    found, in_block = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            continue
        covered = [m.span() for pattern in (CITATION, CODE_SPAN) for m in pattern.finditer(line)]
        covered += [(m.start(), m.end()) for phrase in allowed
                    for m in re.finditer(re.escape(phrase), line)]
        hits = [m.span() for m in MEASURE.finditer(line)]
        hits += [m.span(1) for m in BARE_CELL.finditer(line)]
        for start, end in sorted(hits):
            start += len(line[start:end]) - len(line[start:end].lstrip())
            if not any(a <= start and end <= b for a, b in covered):
                found.append((number, line[start:end]))
    return found


def test_the_docs_state_no_measured_figure_without_its_result_file():
    uncited = [f"{doc.relative_to(REPO)}:{line}: {figure!r}" for doc in CITING_FILES
               for line, figure in uncited_in(doc.read_text(),
                                              NOT_MEASURED.get(str(doc.relative_to(REPO)), []))]
    assert not uncited, ("figures in the docs that cite no result file (cite one, reword, or if "
                         "it is no measurement, add its phrase to NOT_MEASURED):\n"
                         + "\n".join(uncited))
    stale = [f"{name}: {phrase!r}" for name, phrases in NOT_MEASURED.items()
             for phrase in phrases if phrase not in (REPO / name).read_text()]
    assert not stale, f"NOT_MEASURED phrases the docs no longer hold: {stale}"


def test_the_prose_check_catches_hand_typed_figures():
    """Negative control of the check above, on figures it made the docs drop; cited figures,
    code, code blocks, bounds and listed phrases pass."""
    text = ("notice (13.4 s when the watcher still shelled out), 2.05x in the run before\n"
            "| listing, val (1,000) | 0.66 | 23 |\n"
            "ran [4.4](../benchmarks/results/spot_notice.json#x) s, `timeout 30 s`, >= 90%\n"
            "```\nsleep 5 s\n```\n"
            "retries with back-off (2-30 s)\n")
    assert uncited_in(text, []) == [(1, "13.4 s"), (1, "2.05x"), (2, "0.66"), (7, "2-30 s")]
    assert uncited_in(text, ["back-off (2-30 s"])[-1] == (2, "0.66")


def test_the_chaos_results_headline_figures_are_the_counts_of_its_own_logs():
    """benchmarks/results/chaos.json (benchmarks/chaos.py): the figures docs/fault-tolerance.md
    cites are the counts of the file's own fault and resume logs, not numbers typed beside them."""
    record = json.loads((RESULTS / "chaos.json").read_text())
    figures, faults, resumes = record["figures"], record["fault_log"], record["resume_log"]
    assert figures["faults"] == len(faults)
    assert figures["fault_kinds"] == len({fault["kind"] for fault in faults})
    regained = [fault for fault in faults if fault["time_lost_s"] is not None]
    assert figures["faults_survived"] == (len(regained) if record["finished"] else 0)
    assert figures["time_lost_s"] == round(sum(f["time_lost_s"] for f in regained), 1)
    assert figures["resumes"] == len(resumes)
    assert figures["resumes_from_verified_checkpoints"] == sum(r["checkpoint_verified"]
                                                              for r in resumes)
    assert figures["steps_lost"] >= len(record["steps_never_trained"])
    assert figures["epochs_logged_once"] == int(
        record["epochs_logged"] == list(range(figures["epochs"])))
