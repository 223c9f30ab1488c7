"""The ``sweep/`` presets as the config group ``sweep`` (``python train.py +sweep=binarization``), without a
link under ``conf/``: a Hydra config source for the scheme ``xnorpp-sweep://DIR``, which serves ``DIR`` (a
path, relative ones to the repository's top level) as the group ``sweep`` and nothing else.

``conf/train.yaml`` puts ``xnorpp-sweep://sweep`` on ``hydra.searchpath``; :func:`register` must run
before Hydra composes (``train.py`` calls it, so do the tests' fixtures; call it before Hydra's compose
API in your own code). Only Hydra and the standard library are imported here, so ``train.py`` loads this
file before importing the package.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from omegaconf import OmegaConf

__all__ = ["GROUP", "SCHEME", "SweepConfigSource", "register"]

SCHEME = "xnorpp-sweep"
GROUP = "sweep"
ROOT = Path(__file__).resolve().parents[1]  # the repository's top level (beside conf/ and sweep/)


class SweepConfigSource(ConfigSource):
    """Serves one directory as the config group :data:`GROUP` (its subfolders as subgroups)."""

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self.directory = (ROOT / self.path).resolve()

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _local(self, config_path: str) -> Path | None:
        """Where ``config_path`` (``sweep/NAME``, ...) lies in the directory; ``None`` outside the group."""
        parts = Path(config_path).parts
        if not parts or parts[0] != GROUP:
            return None
        return self.directory.joinpath(*parts[1:])

    def available(self) -> bool:
        return self.directory.is_dir()

    def is_group(self, config_path: str) -> bool:
        if config_path in ("", "/"):
            return True
        local = self._local(config_path)
        return local is not None and local.is_dir()

    def is_config(self, config_path: str) -> bool:
        local = self._local(self._normalize_file_name(config_path))
        return local is not None and local.is_file()

    def load_config(self, config_path: str) -> ConfigResult:
        local = self._local(self._normalize_file_name(config_path))
        if local is None or not local.is_file():
            raise ConfigLoadError(f"Config not found : {config_path} (in {self.directory})")
        text = local.read_text(encoding="utf-8")
        return ConfigResult(
            config=OmegaConf.create(OmegaConf.load(local)),
            path=f"{self.scheme()}://{self.path}",
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        files: list[str] = []
        if config_path in ("", "/"):
            if results_filter in (None, ObjectType.GROUP) and self.available():
                files.append(GROUP)
            return files
        local = self._local(config_path)
        if local is None or not local.is_dir():
            return files
        for name in os.listdir(local):
            self._list_add_result(files, os.path.join(config_path, name), name, results_filter)
        return sorted(set(files))


def register() -> None:
    """Make the ``xnorpp-sweep://`` scheme known to Hydra (idempotent)."""
    Plugins.instance().register(SweepConfigSource)
