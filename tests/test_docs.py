"""The docs site builds with ``mkdocs build --strict`` and the README's links land on it.

``mkdocs.yml`` makes a broken link, a missing anchor and a page of ``docs/`` left out of
the nav warnings, and ``--strict`` makes a warning fail the build; these tests run that
build (as ``make docs`` does) and show that it does fail on each. The README is not part of
the site, so its links are checked here: every relative link names a file that exists, a
link into ``docs/`` names a page of the nav, and an anchor names a heading of its page.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from markdown.extensions.toc import slugify

README = REPO / "README.md"
# [text](target) outside code; images and reference-style links are not used in the README.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def build(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``project``'s mkdocs.yml into ``site`` (cwd: project,
    where the snippets' base path points)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = build(REPO, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def nav_pages() -> list[str]:
    """Every page file the nav of mkdocs.yml names."""
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    pages: list[str] = []

    def walk(item: object) -> None:
        if isinstance(item, str):
            pages.append(item)
        elif isinstance(item, list):
            for i in item:
                walk(i)
        elif isinstance(item, dict):
            for v in item.values():
                walk(v)

    walk(nav)
    return pages


def page_html(site: Path, page: str) -> str:
    return (site / page.replace(".md", ".html")).read_text()


def readme_links() -> list[str]:
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    return LINK.findall(text)


def test_the_site_builds_strict_with_every_page_of_the_nav(site: Path) -> None:
    pages = nav_pages()
    on_disk = sorted(str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").glob("*.md"))
    assert sorted(pages) == on_disk
    for page in pages:  # each page built, its first heading in it
        text = re.sub(r"<[^>]+>", "", html.unescape(page_html(site, page)))
        heading = re.search(r"^#+ (.*)$", (REPO / "docs" / page).read_text(), flags=re.M)
        if heading:
            assert heading.group(1).replace("`", "") in text, page
    # launching.md shows launch/README.md, read in place; the index shows the README's table.
    assert "When a node fails" in page_html(site, "launching.md")
    assert "expert parallel" in page_html(site, "index.md")


@pytest.mark.parametrize(
    ("page", "addition", "warning"),
    [
        ("models.md", "\n[x](no-such-page.md)\n", "not found among documentation files"),
        ("models.md", "\n[x](data.md#no-such-heading)\n", "does not contain an anchor"),
        ("unlisted.md", "# A page not in the nav\n", 'not included in the "nav"'),
    ],
    ids=["broken link", "missing anchor", "page not in the nav"],
)
def test_the_strict_build_fails_on(page: str, addition: str, warning: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "docs", project / "docs")
    shutil.copytree(REPO / "launch", project / "launch")
    target = project / "docs" / page
    target.write_text((target.read_text() if target.exists() else "") + addition)
    proc = build(project, tmp_path / "site")
    assert proc.returncode != 0
    assert warning in proc.stdout + proc.stderr


def test_readme_links_point_at_files_pages_and_headings_that_exist(site: Path) -> None:
    links = readme_links()
    assert sum(link.startswith("docs/") for link in links) >= 10  # the docs map is there
    pages = set(nav_pages())
    readme_anchors = {
        slugify(h, "-") for h in re.findall(r"^#+ (.*)$", README.read_text(), flags=re.M)
    }
    for link in links:
        if re.match(r"^[a-z]+:", link):
            continue  # an external address
        path, _, anchor = link.partition("#")
        if not path:
            assert anchor in readme_anchors, link
            continue
        assert (REPO / path).exists(), link
        if path.startswith("docs/"):
            page = path.removeprefix("docs/")
            assert page in pages, f"{link}: not in the nav of mkdocs.yml"
            if anchor:
                assert f'id="{anchor}"' in page_html(site, page), link


def test_readme_test_command_is_the_makefiles() -> None:
    """The README shows the command ``make test`` runs (CI runs ``make test``)."""
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n\t(.*)$", makefile, flags=re.M).group(1)
    command = recipe.replace("$(PY)", ".venv/bin/python").replace("$(ARGS)", "").strip()
    assert f"make test        # the default suite: {command}" in README.read_text()


def test_architecture_map_names_every_package() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    tree = text[text.index("```\nftlab/\n") :].split("```", 2)[1]
    named = set(re.findall(r"^  ([a-z_]+)/?\s", tree, flags=re.M))
    packages = {p.parent.name for p in (REPO / "ftlab").glob("*/__init__.py")}
    modules = {p.stem for p in (REPO / "ftlab").glob("*.py") if p.stem != "__init__"}
    assert named == packages | modules
