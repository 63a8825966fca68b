"""The README documents every setting Carnet reads, exactly as portal.core.config describes it."""

from portal.core.config import ROOT, settings_table


def test_readme_configuration_table_is_current():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- settings -->")[1].split("<!-- /settings -->")[0].strip()
    assert block == settings_table(), "run: make readme"
