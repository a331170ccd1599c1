"""The README's copy-paste SDK examples, run as written against `ds2oai serve`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CLIENT_KEY, ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLES = dict(
    re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", README, flags=re.DOTALL)
)


def test_the_readme_has_its_examples() -> None:
    assert set(EXAMPLES) == {"chat", "responses"}


@pytest.mark.parametrize("name", ["chat", "responses"])
def test_readme_example_runs(name: str, served_gateway: str, tmp_path: Path) -> None:
    code = EXAMPLES[name].replace("http://127.0.0.1:8000", served_gateway)
    code = code.replace("your-client-key", CLIENT_KEY)
    script = tmp_path / f"{name}.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Hello! This is a mock DeepSeek stream." in result.stdout
