"""The docs/ pages stay true to the code: every citation of a page names a page and a section that exist,
nothing refers to a document outside the repository, and the presets table is the code's."""

import re
from pathlib import Path

import pytest
import torch

from ltm import LTMConfig, LTMDecoder
from ltm.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TEXT_SUFFIXES = {".py", ".md", ".cpp", ".h", ".cu", ".sh", ".toml", ".txt", ".yaml", ".yml", ".cfg", ".clang-format"}
SKIP_DIRS = {".git", ".venv", "build", "__pycache__", ".pytest_cache", "results"}
# Citations in code and text: docs/<page>.md, '<Section>'; inside docs/: [page](page.md), "Section".
CITATION = re.compile(r"docs/(\w+\.md), '([^']+)'")
LINK_CITATION = re.compile(r"\]\((\w+\.md)\), \"([^\"]+)\"")
LINK = re.compile(r"\]\(([\w/.]+\.md)\)")


def repository_text_files():
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]) or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES or path.name in TEXT_SUFFIXES or parts[0] == ".ci":
            yield path


def headings(page: Path) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def test_the_docs_pages_exist():
    assert {"index.md", "model.md", "kernels.md", "backends.md", "targets.md"} <= {p.name for p in DOCS.glob("*.md")}


def test_every_citation_names_an_existing_page_and_section():
    cited, problems = 0, []
    for path in repository_text_files():
        text = path.read_text(errors="replace")
        found = [(m, DOCS / m.group(1)) for m in CITATION.finditer(text)]
        if path.parent == DOCS:
            found += [(m, DOCS / m.group(1)) for m in LINK_CITATION.finditer(text)]
        for match, page in found:
            cited += 1
            where = f"{path.relative_to(ROOT)}: {match.group(0)}"
            if not page.is_file():
                problems.append(f"{where}: no page {page.name}")
            elif match.group(2) not in headings(page):
                problems.append(f"{where}: {page.name} has no section {match.group(2)!r}")
    assert cited > 20, f"only {cited} citations found: is the pattern still the one the code uses?"
    assert not problems, "\n".join(problems)


def test_links_between_pages_resolve():
    broken = []
    for page in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        for match in LINK.finditer(page.read_text()):
            if not (page.parent / match.group(1)).is_file():
                broken.append(f"{page.relative_to(ROOT)}: {match.group(0)}")
    assert not broken, "\n".join(broken)


def test_no_file_refers_to_a_document_outside_the_repository():
    # Spelled in pieces so that this file does not match itself.
    outside = re.compile("|".join([r"DESIGN" + r"\.md", r"DESIGN" + r" section", r"shared project" + r" folder"]))
    hits = [
        f"{p.relative_to(ROOT)}: {m.group(0)}"
        for p in repository_text_files()
        for m in outside.finditer(p.read_text(errors="replace"))
    ]
    assert not hits, "\n".join(hits)


def _preset_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (DOCS / "model.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in PRESETS:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_presets_table_is_the_code(name):
    rows = _preset_rows()
    assert name in rows, f"docs/model.md, 'Presets' has no row for {name}"
    cfg = LTMConfig.from_name(name)
    with torch.device("meta"):  # sizes only: no memory, no init
        params = LTMDecoder(cfg, backend="eager").n_params
    expected = [
        cfg.n_layer,
        cfg.d_model,
        cfg.n_head,
        cfg.n_z,
        cfg.max_seq_len,
        cfg.window_size,
        cfg.t_fast,
        cfg.vocab_size,
        f"{params:,}",
    ]
    assert rows[name] == [str(v) for v in expected]
