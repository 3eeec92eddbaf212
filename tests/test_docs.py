"""The docs stay inside the repository and true to the code: every link of README.md, CHANGELOG.md
and docs/*.md reaches a file (and heading) of the repository, nothing cites files outside it, the
API reference matches the docstrings, and LICENSE and CITATION.cff agree with pyproject."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = ("http://", "https://", "mailto:")
# Files that live beside the repository while it is developed, never in it.
OUTSIDE = re.compile(r"PAPER\.md|MODELS\.md|STYLE\.md|\.\./shared/(?!data\b)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks)."""
    found, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(anchor(line.lstrip("#")))
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each link of `page` that leaves `root`, names a missing file, or a heading the target lacks."""
    problems = []
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if target.startswith(EXTERNAL):
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{page.name}: {target} points outside the repository")
        elif not resolved.exists():
            problems.append(f"{page.name}: {target} does not exist")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{page.name}: {target} names no heading of {resolved.name}")
    return problems


def test_every_link_of_the_docs_reaches_a_file_of_the_repository():
    assert len(PAGES) > 8
    problems = [problem for page in PAGES for problem in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_link_check_catches_links_out_of_the_repository_to_missing_files_and_headings(tmp_path):
    (tmp_path / "repo" / "docs").mkdir(parents=True)
    (tmp_path / "PAPER.md").write_text("# Paper\n")
    page = tmp_path / "repo" / "docs" / "page.md"
    (tmp_path / "repo" / "docs" / "other.md").write_text("# 3. Tasks, prompts and splits\n")
    page.write_text(
        "[a](../../PAPER.md) [b](missing.md) [c](other.md#nowhere) [d](other.md#3-tasks-prompts-and-splits) "
        "[e](https://arxiv.org/abs/2406.03768)\n```\n[f](in-a-code-block.md)\n```\n"
    )
    problems = broken_links(page, tmp_path / "repo")
    assert [p.split(": ", 1)[1] for p in problems] == [
        "../../PAPER.md points outside the repository",
        "missing.md does not exist",
        "other.md#nowhere names no heading of other.md",
    ]


def test_nothing_cites_files_that_live_outside_the_repository():
    files = [*PAGES, *(ROOT / "examples").rglob("*"), *(ROOT / "svdicl").rglob("*.py"), *(ROOT / "svdicl").rglob("*.yaml")]
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        if path.is_file()
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "cite docs/paper.md (or another page in the repository) instead:\n" + "\n".join(hits)


def _api_script():
    spec = importlib.util.spec_from_file_location("docs_api", ROOT / "docs" / "api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_reference_is_generated_from_the_current_docstrings():
    import svdicl

    api = _api_script()
    text = api.render()
    for name in svdicl.__all__:
        assert f"### `svdicl.{name}`" in text
    assert svdicl.wrap.__doc__.splitlines()[0] in text
    assert api.PAGE.read_text(encoding="utf-8") == text, "docs/api.md is out of date; run: python docs/api.py"


def test_the_api_check_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    api = _api_script()
    monkeypatch.setattr(api, "PAGE", tmp_path / "api.md")
    api.PAGE.write_text(api.render().replace("svdicl.wrap", "svdicl.unwrap"))
    assert api.main(["--check"]) == 1 and "out of date" in capsys.readouterr().err
    assert api.main([]) == 0 and api.main(["--check"]) == 0


def test_license_and_citation_agree_with_pyproject():
    text = (ROOT / "pyproject.toml").read_text()  # read by pattern: tomllib is not in Python 3.10
    project = {"license": re.search(r'^license = \{ text = "(.+)" \}$', text, re.M)[1],
               "version": re.search(r'^version = "(.+)"$', text, re.M)[1]}  # fmt: skip
    assert project["license"] == "MIT"
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "svdicl developers" in license_text
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert {"cff-version", "message", "title", "authors"} <= set(cff)  # CFF 1.2.0's required keys
    assert cff["cff-version"] == "1.2.0" and cff["version"] == project["version"] and cff["license"] == "MIT"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", cff["date-released"])
    paper = cff["preferred-citation"]
    assert paper["type"] == "conference-paper" and paper["year"] == 2024
    assert [a["family-names"] for a in paper["authors"]][:2] == ["Yao", "Hu"]
    assert "SVD-Based Weight Pruning" in paper["title"] and "2406.03768" in paper["url"]


@pytest.mark.parametrize("heading, expected", [("## 3. Tasks, prompts and splits", "3-tasks-prompts-and-splits"),
                                               ("### `svdicl.ALIASES`", "svdiclaliases")])  # fmt: skip
def test_anchor_follows_github(heading, expected):
    assert anchor(heading.lstrip("#")) == expected


def test_the_readme_layout_lists_exactly_the_package_tree():
    """README's Layout block names every module and package directly in svdicl/ (each at the start of a line), and
    every module it names anywhere exists in the package."""
    block = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("```")[1]
    package = ROOT / "svdicl"
    top = set()
    for line in block.splitlines():
        found = re.match(r"^  ([a-z_][\w.]*(?:, [a-z_][\w.]*)*/?)(?::|\s)", line)
        if found:
            top |= set(found.group(1).split(", "))
    tree = {p.name + "/" for p in package.iterdir() if (p / "__init__.py").exists()}
    tree |= {p.name for p in package.glob("*.py")} - {"__init__.py", "__main__.py"}
    assert top == tree
    named = set(re.findall(r"\b([a-z_]+\.py)\b", block.split("benchmarks/")[0]))
    assert named <= {p.name for p in package.rglob("*.py")}
