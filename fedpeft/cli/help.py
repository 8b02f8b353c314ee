"""``python -m fedpeft.run --help``: the config groups, and every key with its value and help."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedpeft.cli.configs import CONF_DIR, compose_config
from fedpeft.cli.errors import one_line
from fedpeft.config.schema import Config


def help_text(overrides: list[str]) -> str:
    """The help of ``python -m fedpeft.run [overrides] --help``.

    Keys and help come from the typed schema (:mod:`fedpeft.config.schema`), values from the config that
    ``overrides`` compose (so ``+exp=flora_hetero --help`` shows that experiment's values).
    """
    try:
        cfg: Any = compose_config(overrides)
        note = f" (with {' '.join(overrides)})" if overrides else ""
    except Exception as err:
        cfg, note = Config(), f" (defaults; {' '.join(overrides)} did not compose: {one_line(err)})"
    lines = [
        "usage: python -m fedpeft.run [+exp=<experiment>] [group=option ...] [key=value ...]",
        "       python -m fedpeft.run -m key=a,b ...   (a sweep: Hydra multirun)",
        "",
        "Config groups (group=option):",
    ]
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        options = sorted(f.stem for f in group.glob("*.yaml") if f.stem != "schema")
        prefix = "+exp" if group.name == "exp" else group.name
        lines.append(f"  {prefix + '=':<10} {' | '.join(options)}")
    lines += ["", f"Keys, their current values{note}, and what they do:"]

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
                continue
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            help_ = f.metadata.get("help", "")
            lines.append(f"  {key}={shown}" + (f"\n      {help_}" if help_ else ""))

    walk(cfg, "")
    lines += ["", "Hydra's own options: python -m fedpeft.run --hydra-help"]
    return "\n".join(lines)
