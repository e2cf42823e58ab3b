"""Every figure the docs quote from a stored result equals that result (docs cannot drift from data).

Convention: right after a measured number in README.md or docs/*.md, an HTML comment names the stored
result it comes from, ``<!--fig FILE KEY.PATH-->`` (FILE under docs/results/; KEY.PATH into its
JSON: dict keys (``_`` for a space), list indices, or ``field=value[&field=value]`` to pick the one
list element that matches), optionally with a scale, ``<!--fig FILE KEY.PATH x100-->`` (percent) or ``x1e-9`` (bytes to
GB). The number is the last one before the comment on the same line; it must equal the stored value
rounded to the decimals the doc shows. A line whose percentages or times are settings, not measurements
(``50% sparsity``), says so with ``<!--setting-->``. Each cited result must record the ``command`` that produced it
and the ``machine`` it ran on, and the doc that cites it must show that command.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!--\s*fig\s+(\S+)\s+(\S+)(?:\s+x(\S+))?\s*-->")
NUMBER = re.compile(r"[-+\u2212]?\d+(?:\.\d+)?")
# A line that quotes a measurement: a number with a unit of time, size, speed-up or share.
MEASURED = re.compile(r"\d(?:\.\d+)?\s?(?:s|min|GB|MB|GiB|×|%)(?![\w-])")


def lookup(data, path: str):
    cur = data
    for part in path.split("."):
        if isinstance(cur, list) and "=" in part:
            want = dict(kv.split("=", 1) for kv in part.split("&"))
            hits = [e for e in cur if all(str(e.get(k)) == v for k, v in want.items())]
            assert len(hits) == 1, f"{path}: {part!r} matches {len(hits)} elements"
            cur = hits[0]
        elif isinstance(cur, list):
            cur = cur[int(part)]
        elif part not in cur and part.replace("_", " ") in cur:  # keys with spaces: "nf4_(fp32)" for "nf4 (fp32)"
            cur = cur[part.replace("_", " ")]
        else:
            cur = cur[part]
    return cur


def markers():
    out = []
    for doc in DOCS:
        for lineno, line in enumerate(doc.read_text().splitlines(), 1):
            for m in MARK.finditer(line):
                before = MARK.sub(" ", line[:m.start()])
                nums = NUMBER.findall(before)
                out.append((doc.relative_to(ROOT), lineno, nums[-1] if nums else None, *m.groups()))
    return out


MARKERS = markers()


def test_the_docs_cite_stored_results():
    cited = {m[3] for m in MARKERS}
    assert {"stream-bench.json", "eep-bench-fp32.json", "demo-learned-easy-ep.json"} <= cited, cited


@pytest.mark.parametrize("doc,lineno,shown,file,path,scale", MARKERS, ids=[f"{m[0]}:{m[1]}:{m[4]}" for m in MARKERS])
def test_figure_equals_its_stored_result(doc, lineno, shown, file, path, scale):
    assert shown is not None, f"{doc}:{lineno}: no number before the marker"
    data = json.loads((RESULTS / file).read_text())
    value = float(lookup(data, path)) * (float(scale) if scale else 1.0)
    shown_f = float(shown.replace("\u2212", "-"))
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    assert math.isclose(value, shown_f, abs_tol=0.5 * 10 ** -decimals + 1e-9), \
        f"{doc}:{lineno}: the doc says {shown}, {file} {path} is {value}"


@pytest.mark.parametrize("file", sorted({m[3] for m in MARKERS}))
def test_cited_result_records_command_and_machine(file):
    data = json.loads((RESULTS / file).read_text())
    assert isinstance(data.get("command"), str) and data["command"].split()[0] in ("python", "lowmoe"), file
    assert isinstance(data.get("machine"), dict) and {"cpus", "gpu"} <= set(data["machine"]), file
    for doc in {m[0] for m in MARKERS if m[3] == file}:
        text = (ROOT / doc).read_text()
        assert data["command"] in text, f"{doc} cites {file} but does not show its command: {data['command']}"


def test_readme_quotes_no_measurement_without_its_result():
    """README: every line outside code blocks that quotes a measured figure cites its stored result."""
    bare, in_code = [], False
    for lineno, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code and MEASURED.search(MARK.sub(" ", line)) and not MARK.search(line) and "<!--setting-->" not in line:
            bare.append(f"{lineno}: {line.strip()}")
    assert not bare, "figures without a stored result:\n" + "\n".join(bare)


def test_marker_parser_catches_a_drifted_figure(tmp_path):
    """The check itself: a figure that differs from its data in the shown decimals fails."""
    data = {"a": {"runs": [{"d": "x", "v": 0.957}]}}
    assert lookup(data, "a.runs.d=x.v") == 0.957
    line = "sort keeps 0.96<!--fig r.json a.runs.d=x.v-->, was 0.95<!--fig r.json a.runs.d=x.v-->"
    got = [(NUMBER.findall(MARK.sub(" ", line[:m.start()]))[-1]) for m in MARK.finditer(line)]
    assert got == ["0.96", "0.95"]
    ok = [math.isclose(0.957, float(s), abs_tol=0.5 * 10 ** -len(s.split(".")[1]) + 1e-9) for s in got]
    assert ok == [True, False]
