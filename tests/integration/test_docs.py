"""The README is a front page and docs/ holds the rest: the tables in docs/ that restate
code are what `megaseek docs --write` generates from it now, every link between the pages
lands on a page and heading that exist, and `megaseek --help` names the commands
docs/cli.md describes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from integration import cli, docs
from tests.helpers import paths

ROOT = paths.REPO
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_no_generated_region_is_stale():
    stale = docs.stale()
    assert not stale, (f"generated regions out of date with the code: {', '.join(stale)}; "
                       f"run `{docs.COMMAND}`")


def _copy_pages(to):
    """The pages holding generated regions: docs/ and the README."""
    shutil.copytree(ROOT / "docs", to / "docs")
    shutil.copy(ROOT / "README.md", to / "README.md")


def test_a_changed_table_is_found_stale_and_rewritten(tmp_path):
    _copy_pages(tmp_path)
    page = tmp_path / "docs" / "plugins" / "moe.md"
    region = next(r for r in docs.regions() if r.name == "moe refusals")
    text = page.read_text()
    rows = region.make().splitlines(keepends=True)
    del rows[2]  # the first refusal: as if the code had gained it since the last --write
    page.write_text(docs.render(text, region, body="".join(rows)))

    assert docs.stale(tmp_path) == ["docs/plugins/moe.md: moe refusals"]
    assert docs.write(tmp_path) == ["docs/plugins/moe.md"]
    assert docs.stale(tmp_path) == []
    assert page.read_text() == text


def test_a_page_without_a_regions_markers_is_refused_naming_them(tmp_path):
    _copy_pages(tmp_path)
    page = tmp_path / "docs" / "design.md"
    page.write_text(page.read_text().replace("<!-- end of generated upstream fixes -->", ""))
    with pytest.raises(ValueError, match="<!-- end of generated upstream fixes -->"):
        docs.stale(tmp_path)


def test_megaseek_docs_says_whether_a_region_is_stale(capsys):
    cli.main(["docs"])
    assert f"{len(docs.regions())} generated regions, none stale" in capsys.readouterr().out


def test_the_refusal_tables_name_every_refused_flag():
    from plugins.moe.plugin import REFUSED

    table = docs.moe_refusals()
    assert all(f"`{flag}`" in table for _dest, flag, _honoured, _why in REFUSED)
    assert "| `--moe-router-dtype` | any value but `fp32` |" in table
    assert "| `--moe-grouped-gemm` | on |" in table


def test_the_readme_is_a_front_page_starting_with_the_demo_and_the_tests():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    first_block = lines[lines.index("```sh") + 1:]
    assert first_block[0].startswith("make demo ")
    assert first_block[1].startswith("make test ")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in page.read_text().splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_lands_on_a_page_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.is_file()
                                   and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_megaseek_help_names_the_commands_docs_cli_describes(capsys):
    described = re.findall(r"^\| `megaseek ([a-z-]+)", (ROOT / "docs" / "cli.md").read_text(),
                           re.MULTILINE)
    cli.main(["--help"])
    helped = re.findall(r"^    megaseek ([a-z-]+)", capsys.readouterr().out, re.MULTILINE)
    assert set(described) == set(helped)


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_readme_tour_names_real_flags_and_every_plugin_flag():
    import argparse

    import integration  # noqa: F401  (megatron.training on Python 3.11)
    from megatron.training.arguments import add_megatron_arguments

    from plugins import builtin_plugins, default_registry

    parser = default_registry().add_arguments(
        add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    known = {option for action in parser._actions for option in action.option_strings}
    tour = _readme_section("The plugins")
    named = set(re.findall(r"(--[a-z][a-z0-9-]*)", tour))
    assert named - known == set()
    for plugin in builtin_plugins():
        assert f"docs/plugins/{plugin.name}.md" in tour
        for action in docs.declared_flags(plugin.name):
            assert action.option_strings[0] in tour, (plugin.name, action.option_strings[0])


def test_every_file_the_pages_name_exists():
    """Paths in code spans (`plugins/moe/plugin.py`); placeholders are in capitals."""
    path = re.compile(r"(?<![\w/.])((?:plugins|integration|upstream|tests|bench|scripts|"
                      r"ci-examples|docs)/[\w/.-]*\w)")
    missing = [f"{page.relative_to(ROOT)}: {named}" for page in PAGES
               for span in re.findall(r"`([^`\n]+)`", page.read_text())
               for named in path.findall(span)
               if not re.search(r"[A-Z]{3}", named) and not (ROOT / named).exists()]
    assert not missing
