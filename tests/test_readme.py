"""The README's examples run as written: the library example, and the dataset of "Extending" from the
command line."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_library_use_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Library use", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert tuple(namespace["y"].shape) == (8, 128, 16, 16)
    assert namespace["model"].binarization == "real_downsample"


def test_extending_example_registers_a_dataset_that_trains_from_the_command_line(tmp_path: Path) -> None:
    """The README's dataset module, saved as my_data.py, and its command line (shortened: 2 steps)."""
    section = (ROOT / "README.md").read_text().split("## Extending", 1)[1].split("\n## ", 1)[0]
    (tmp_path / "my_data.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    command = next(line for line in section.splitlines() if line.startswith("python train.py imports="))
    args = shlex.split(command)[2:]
    assert "imports=[my_data.py]" in args and "data.name=bright_dark" in args
    run_dir = tmp_path / "run"
    short = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "logger=none", "trainer.kernels=eager",
             "trainer.checkpoint.save=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, *short], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 1 and results["global_step"] == 2 and results["params/binary"] > 0
    assert results["choices"]["data"] == "mnist5k" and "data.name=bright_dark" in results["overrides"]
