"""DP-SGD privacy accounting: the noise a target ε calls for, the ε a client has spent, its budget.

The privacy ledger is a list of ``(noise_multiplier, sample_rate, steps)`` — what Opacus'
accountants call ``history`` — kept in the node's state across rounds, so ε composes over every
round the client took part in. ε is Opacus' own accountant's (``client.dp.accountant``: one of
:data:`ACCOUNTANTS`); the DP-SGD step itself is the client's (:mod:`fedpeft.clients.dp`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

Ledger = list[tuple[float, float, int]]
ACCOUNTANTS = ("rdp", "prv", "gdp")
MAX_NOISE = 1e3


class DPError(ValueError):
    """A DP setting that cannot work (unreachable ε, bad δ, ...); the message says what can."""


class BudgetExhausted(RuntimeError):
    """Another round would push this client past its privacy budget."""


def compact(ledger: Sequence[Sequence[float]]) -> Ledger:
    """The ledger with consecutive entries of equal noise and sample rate merged, steps summed:
    the history Opacus' accountants keep when stepped one step at a time (``RDPAccountant.step``)."""
    out: Ledger = []
    for s, q, n in ledger:
        if out and out[-1][:2] == (float(s), float(q)):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(n))
        else:
            out.append((float(s), float(q), int(n)))
    return out


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> Any:
    """One step's RDP at every order of Opacus' RDP accountant (the costly part of its ε, ~0.1 s)."""
    # opacus (~0.5 s to import) only once DP is on: a deployed ClientApp process lives for one message
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    rdp = privacy_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    rdp.flags.writeable = False  # shared by every caller
    return rdp


def epsilon(ledger: Sequence[Sequence[float]], *, delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after every step in ``ledger``, from Opacus' own accountant.

    With the RDP accountant this is ``RDPAccountant.get_epsilon`` over the compacted ledger, each
    entry's per-step RDP computed once per process: ``compute_rdp(steps=n)`` is that vector times
    ``n``, so the result is Opacus' to the last bit, while a client's accounting no longer costs
    ~0.1 s per round it has taken part in, every round.
    """
    from opacus.accountants import RDPAccountant, create_accountant  # start-up: see _rdp_per_step
    from opacus.accountants.analysis import rdp as privacy_analysis

    if not ledger:
        return 0.0
    history = compact(ledger)
    if accountant != "rdp":
        acc = create_accountant(mechanism=accountant)
        acc.history = history
        return float(acc.get_epsilon(delta=delta))
    rdp = sum([_rdp_per_step(s, q) * n for s, q, n in history])
    eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def check_dp_args(*, target_epsilon: float | None, delta: float, sample_rate: float) -> None:
    """The arguments every accountant needs in range: ε > 0 (when targeted), δ in (0, 1), q in (0, 1]."""
    if target_epsilon is not None and target_epsilon <= 0:
        raise DPError(f"client.dp.target_epsilon must be > 0, got {target_epsilon}")
    if not 0.0 < delta < 1.0:
        raise DPError(f"client.dp.delta must be in (0, 1), got {delta}")
    if not 0.0 < sample_rate <= 1.0:
        raise DPError(f"sample rate batch_size / examples must be in (0, 1], got {sample_rate}")


@functools.lru_cache(maxsize=256)
def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = "rdp"
) -> float:
    """The noise multiplier that spends exactly ``target_epsilon`` over ``total_steps`` steps.

    Raises :class:`DPError` with the smallest reachable ε (at noise ``MAX_NOISE``) when the target
    is below it. A pure function of its arguments, so each process computes it once per client
    (Opacus' search takes 1-2 s), not once per client and round.
    """
    from opacus.accountants.utils import get_noise_multiplier  # start-up: see _rdp_per_step

    check_dp_args(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate)
    floor = epsilon([(MAX_NOISE, sample_rate, total_steps)], delta=delta, accountant=accountant)
    if target_epsilon <= floor:
        raise DPError(
            f"target ε={target_epsilon} at δ={delta} is unreachable for {total_steps} steps at sample rate {sample_rate:.4g}: "
            f"the smallest reachable ε is {floor:.4g} (noise multiplier {MAX_NOISE:g}); raise the target or δ, or train fewer steps"
        )
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=accountant,
            epsilon_tolerance=0.001,
        )
    )


def would_exceed(
    ledger: Ledger, step: tuple[float, float, int], *, delta: float, target_epsilon: float, accountant: str = "rdp"
) -> bool:
    """Whether one more round ``step`` = (noise, q, steps) would push ε past ``target_epsilon``."""
    return epsilon([*ledger, step], delta=delta, accountant=accountant) > target_epsilon * (1 + 1e-9)


def planned_steps(*, rounds: int, clients_per_round: int, num_clients: int, steps_per_round: int) -> int:
    """Steps a client expects over the whole run: expected participations × steps per round."""
    return math.ceil(rounds * clients_per_round / num_clients) * steps_per_round
