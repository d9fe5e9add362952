"""The option handling shared by the library's frozen-dataclass method objects (solvers, inversion
methods, calibration methods): the list of options and the check that names a bad one."""

from __future__ import annotations

import dataclasses


class Options:
    """Mix into a frozen dataclass with a ``name``; ``_label`` prefixes its error messages."""

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []

    def _label(self) -> str:
        return self.name

    def _require(self, ok: bool, option: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{self._label()}: {option} = {getattr(self, option)!r} is invalid; allowed: {allowed}")
