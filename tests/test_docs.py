"""The README's config reference is the typed config's, key for key."""

import re

from fastlm.config import REFERENCE_BEGIN, REFERENCE_END, config_reference, reference_markdown

from conftest import ROOT


def test_readme_config_reference_is_generated_from_the_typed_config():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(REFERENCE_BEGIN): readme.index(REFERENCE_END) + len(REFERENCE_END)]
    assert block == reference_markdown(), "README is stale: run python -m fastlm.config --reference"
    keys_in_readme = re.findall(r"^\| `([a-z_.]+)` \|", block, flags=re.M)
    assert keys_in_readme == [row[0] for row in config_reference()]
    assert len(keys_in_readme) == len(set(keys_in_readme)) > 50
