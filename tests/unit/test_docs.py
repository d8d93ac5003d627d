"""The docs cannot drift: generated reference parts match the code, the README stays short and links every page."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
reference = runpy.run_path(str(ROOT / "scripts" / "docs_reference.py"))


def test_generated_reference_parts_match_the_code():
    from trl_guided.train import make_parser

    make_parser()  # HfArgumentParser rewrites dataclass field types in place; the reference must not depend on it
    for path, content in reference["generated_files"]().items():
        assert path.read_text() == content, f"{path.relative_to(ROOT)} is stale: run python scripts/docs_reference.py"


def test_configuration_reference_lists_every_added_field_with_its_default():
    import dataclasses

    from trl import GRPOConfig

    from trl_guided import GuidedGRPOConfig

    page = (ROOT / "docs" / "configuration.md").read_text()
    inherited = {field.name for field in dataclasses.fields(GRPOConfig)}
    for field in dataclasses.fields(GuidedGRPOConfig):
        if field.name not in inherited:
            assert re.search(rf"^\| `{field.name}` \|", page, re.M), f"{field.name} missing from docs/configuration.md"
    assert "| `min_guide_tokens` | `int` | `2` |" in page


def test_recipe_and_reward_tables_cover_the_registry_and_the_recipes():
    from trl_guided.rewards import REWARD_FUNCS

    page = (ROOT / "docs" / "recipes.md").read_text()
    for name in REWARD_FUNCS:
        assert f"| `{name}` |" in page
    for recipe in (ROOT / "recipes").glob("*/*.yaml"):
        if recipe.parent.name != "accelerate":
            assert f"`{recipe.relative_to(ROOT / 'recipes')}`" in page


def test_readme_fits_on_a_couple_of_screens_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).exists(), f"README.md links {link}, which does not exist"


def test_config_docstring_documents_every_added_field_in_its_group():
    import dataclasses

    from trl import GRPOConfig

    from trl_guided import GuidedGRPOConfig

    groups = reference["CONFIG_GROUPS"]
    doc = GuidedGRPOConfig.__doc__
    inherited = {field.name for field in dataclasses.fields(GRPOConfig)}
    for field in dataclasses.fields(GuidedGRPOConfig):
        if field.name in inherited:
            continue
        entry = re.search(rf"^        {field.name} \(`[^`]+`(?: or `None`)?, defaults to `(.+)`\):$", doc, re.M)
        assert entry, f"GuidedGRPOConfig's docstring does not document {field.name} in TRL's Parameters format"
        titles = list(groups)
        group = next(title for title, names in groups.items() if field.name in names)
        start = doc.index(f"{group}:")
        following = [doc.index(f"{title}:") for title in titles[titles.index(group) + 1 :]]
        assert start < entry.start() < min(following, default=len(doc)), f"{field.name} is not under '{group}'"
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if not isinstance(default, list):
            assert entry.group(1) == (f'"{default}"' if isinstance(default, str) else str(default)), field.name


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "GPU.md"]


def _doc_text() -> dict[str, str]:
    return {str(page.relative_to(ROOT)): page.read_text() for page in DOC_PAGES}


def test_every_recipe_path_the_docs_name_exists():
    for page, text in _doc_text().items():
        for path in re.findall(r"recipes/[\w./-]+?\.yaml", text):
            if re.search(r"[A-Z]{3,}|/my[-_]", path):  # a placeholder: recipes/MODEL/NAME_cpu.yaml, recipes/my-model/
                continue
            assert (ROOT / path).exists(), f"{page} names {path}, which does not exist"


def _known_flags() -> set[str]:
    """Every flag a documented command can take: `trl-guided train`'s fields, the other subcommands' options (both
    spellings), and `accelerate launch`'s."""
    import argparse

    from accelerate.commands.launch import launch_command_parser

    from trl_guided.cli import build_parser
    from trl_guided.train import make_parser

    fields = [name for parser_class in make_parser().dataclass_types for name in parser_class.__dataclass_fields__]
    flags = {f"--{name}" for name in fields}
    parsers = [launch_command_parser()]
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for parser in parsers:
        for action in parser._actions:
            for option in action.option_strings:
                flags |= {option, option.replace("-", "_").replace("__", "--", 1)}
    return flags


def test_every_flag_the_docs_show_exists():
    known = _known_flags()
    for page, text in _doc_text().items():
        for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b", text))):
            assert flag in known, f"{page} shows {flag}, which no trl-guided or accelerate command takes"


def test_every_default_the_docs_state_is_the_code_default():
    import dataclasses

    from trl_guided import GuidedGRPOConfig

    defaults = {
        field.name: field.default
        for field in dataclasses.fields(GuidedGRPOConfig)
        if field.default is not dataclasses.MISSING
    }
    values = {str(value) for value in defaults.values()}
    for page, text in _doc_text().items():
        # `field` (default 8 ...) and `field: value` (default)
        for name, value in re.findall(r"`(\w+)` \(default ([^;),\s]+)", text) + re.findall(
            r"`(\w+): ([^`]+)` \((?:the )?default\)", text
        ):
            if name in defaults:
                assert str(defaults[name]) == value, f"{page}: `{name}` defaults to {defaults[name]!r}, not {value}"
        # `value` (default) / (the default): some field of GuidedGRPOConfig must default to it
        for value in re.findall(r"`([\w.+-]+)` \((?:the )?default\)", text):
            assert value in values, f"{page} calls `{value}` the default, but no GuidedGRPOConfig field defaults to it"
