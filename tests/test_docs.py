"""The README and docs/: short where they should be, links that lead somewhere, and every code
block that says it runs, run as it is."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from featcache import demo

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- (runs|sketch[^>]*) -->\n)?```python\n(.*?)```", re.S)


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 15 * 1024
    head = "\n".join(text.splitlines()[:30])
    assert "make demo" in head and "make test" in head


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_leads_to_a_file_and_heading_that_exist(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: {target}"


def test_every_python_block_says_whether_it_runs():
    for page in PAGES:
        for marker, _, code in BLOCK.findall(page.read_text()):
            assert marker, f"{page.name}: say <!-- runs --> or <!-- sketch: why --> before\n{code}"


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """A folder laid out like featcache-demo/ (data/train, data/test), with fewer images."""
    work = tmp_path_factory.mktemp("docs")
    for split, per_class in (("train", 8), ("test", 2)):
        for folder in sorted((demo.DATA / split).iterdir()):
            for image in sorted(folder.glob("*.png"))[:per_class]:
                (work / "data" / split / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(image, work / "data" / split / folder.name / image.name)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if "<!-- runs -->" in p.read_text()], ids=lambda p: p.name)
def test_the_blocks_that_say_they_run_do(page, demo_like, tmp_path):
    blocks = [code for marker, _, code in BLOCK.findall(page.read_text()) if marker == "<!-- runs -->\n"]
    work = tmp_path / "work"
    shutil.copytree(demo_like, work)
    script = "\n".join(blocks)
    env = {**os.environ, "FEATCACHE_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                         timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
