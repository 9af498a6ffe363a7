"""--config given something that is not a YAML config file: one line naming it (train.py, eval.py and the
scripts all read it through load_config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, load_config


@pytest.mark.parametrize(("case", "expected"), [
    ("missing", "config file not found"),
    ("directory", "is a directory, not a YAML config file"),
    ("binary", "not a YAML config file (not UTF-8 text)"),
    ("invalid", "is not valid YAML"),
    ("not_a_mapping", "expected a mapping of config keys"),
])
def test_a_config_that_is_not_one_is_a_one_line_error(tmp_path: Path, case: str, expected: str) -> None:
    path = tmp_path / "run.yaml"
    if case == "directory":
        path.mkdir()
    elif case == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    elif case == "invalid":
        path.write_text("model: [lip_resnet50\n")
    elif case == "not_a_mapping":
        path.write_text("just a sentence\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, require_data=False)
    assert str(path) in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)
