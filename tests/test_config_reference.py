"""docs/configuration.md is what scripts/config_reference.py writes from the schemas as they are now."""

import importlib.util

from helpers.data import REPO


def test_configuration_reference_is_current():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == generator.render(), (
        "docs/configuration.md is out of date: run `python scripts/config_reference.py`"
    )
