"""The README's library example runs as written."""

from __future__ import annotations

import re

from conftest import ROOT


def test_library_use_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Library use", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert tuple(namespace["y"].shape) == (8, 128, 16, 16)
    assert namespace["model"].binarization == "real_downsample"
