"""A failure as one line: fedpeft's own errors by their message, Flower's and Ray's by their cause,
Hydra's composition errors by what is wrong and what to do."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fedpeft.cli.configs import CONF_MODULE, register_configs


def one_line(err: BaseException) -> str:
    """An error as one line: fedpeft's own errors by their message, anything else with its type."""
    text = " ".join(str(err).split()) or type(err).__name__
    ours = type(err).__module__.split(".")[0] in ("fedpeft", "__main__")  # __main__: fedpeft.run run with -m
    if ours or type(err) is ValueError:  # fedpeft's checks raise its own errors and plain ValueErrors
        return text
    return f"{type(err).__name__}: {text}"


def composition_error(argv: list[str]) -> str | None:
    """Hydra's own error for these command-line overrides (a misspelled key or option), as one line.

    ``python -m fedpeft.run`` composes the config once before Hydra does, so that a typo costs one
    line instead of Hydra's seven. ``None`` when the overrides compose, and for command lines with
    Hydra flags (``-m``, ``--cfg`` ...), which Hydra itself reports.
    """
    if any(arg.startswith("-") for arg in argv):
        return None
    register_configs()
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return hydra_one_line(err)
    return None


def hydra_one_line(err: BaseException) -> str:
    """A Hydra / OmegaConf composition error as one line: what is wrong first, then the advice."""
    skip = ("full_key:", "object_type=", "reference_type=", "provider=", "Config search path", "See https://")

    def lines(e: BaseException) -> list[str]:
        return [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(skip)]

    own, cause = lines(err), lines(err.__cause__) if err.__cause__ else []
    if own and own[0].startswith("In '") and "Could not find" in own[0]:  # a missing group option
        group = [ln for ln in own[1:] if ln.startswith("Available options")]
        options = [ln for ln in own[1:] if not ln.startswith("Available options") and not ln.endswith("_schema")]
        where = group[0].rstrip(":").replace("Available options", "options") if group else "options"
        return f"c{own[0].split(': ', 1)[-1][1:]}; {where}: {', '.join(options)}"
    text = "; ".join([*cause, *(ln.rstrip(".") for ln in own)])
    return text[:1].lower() + text[1:] if text else type(err).__name__
