"""Show that each property test of the six rules fails against a deliberately wrong variant.

For every mutant: replace exact text in a rule file (each snippet must occur exactly once), run
the named test(s) with pytest, record whether they failed and the first assertion line, and
restore the file (always, also on Ctrl-C). Writes ``experiments/results/rules_mutation_checks.md``.

    PYTHONPATH=$PWD python experiments/rules_mutation_checks.py [--only fedsvd]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "results" / "rules_mutation_checks.md"


@dataclass(frozen=True)
class Mutant:
    rule: str
    wrong: str  # what the broken variant does
    path: str
    edits: tuple[tuple[str, str], ...]  # (exact original text, replacement)
    tests: tuple[str, ...]  # pytest node ids expected to fail


def t(rule: str, name: str) -> str:
    return f"tests/strategies/test_{rule}.py::{name}"


MUTANTS = [
    # ----------------------------------------------------------------- FedEx-LoRA
    Mutant(
        "fedex_lora",
        "unweighted means for Ā, B̄ (the authors' code)",
        "strategies/fedex_lora.py",
        (
            (
                "return weighted_sum(lora_as, weights), weighted_sum(lora_bs, weights)",
                "uniform = torch.full_like(weights, 1 / len(lora_as))\n    return weighted_sum(lora_as, uniform), weighted_sum(lora_bs, uniform)",
            ),
        ),
        (t("fedex_lora", "test_the_averages_are_fedit_weighted_by_examples"),),
    ),
    Mutant(
        "fedex_lora",
        "residual stack with unweighted blocks (1/K instead of p_k)",
        "strategies/fedex_lora.py",
        (
            (
                "a_blocks = [(p * scaling) * a.to(torch.float64)",
                "a_blocks = [(scaling / len(lora_as)) * a.to(torch.float64)",
            ),
        ),
        (
            t("fedex_lora", "test_the_global_model_after_a_round_is_w_prev_plus_the_weighted_products"),
            t("fedex_lora", "test_any_participation_pattern_and_any_skipped_rounds_land_on_the_same_model"),
        ),
    ),
    Mutant(
        "fedex_lora",
        "transposed residual (R.T, the authors' Conv1D habit)",
        "strategies/fedex_lora.py",
        (("    return a_stack, b_stack\n\n\ndef fedex_pair", "    return b_stack.T, a_stack.T\n\n\ndef fedex_pair"),),
        (
            t("fedex_lora", "test_a_square_layer_gets_the_residual_not_its_transpose"),
            t("fedex_lora", "test_the_global_model_after_a_round_is_w_prev_plus_the_weighted_products"),
        ),
    ),
    Mutant(
        "fedex_lora",
        "+sĀ instead of −sĀ in the last block",
        "strategies/fedex_lora.py",
        (("a_blocks.append(-scaling * lora_a", "a_blocks.append(scaling * lora_a"),),
        (
            t("fedex_lora", "test_the_global_model_after_a_round_is_w_prev_plus_the_weighted_products"),
            t("fedex_lora", "test_the_residual_travels_as_stacked_factors_of_rank_k_plus_one_times_r"),
        ),
    ),
    # ----------------------------------------------------------------- FlexLoRA
    Mutant(
        "flexlora",
        "QR core not transposed (R_P R_Q instead of R_P R_Qᵀ)",
        "strategies/flexlora.py",
        (("torch.linalg.svd(r_p @ r_q.T, full_matrices=False)", "torch.linalg.svd(r_p @ r_q, full_matrices=False)"),),
        (t("flexlora", "test_the_factored_svd_equals_the_dense_svd_and_its_truncation"),),
    ),
    Mutant(
        "flexlora",
        "wrong split of Σ (B = UΣ/s, A = Vᵀ: product right, factors unbalanced)",
        "strategies/flexlora.py",
        (
            (
                "lora_b[:, :k] = u[:, :k].to(torch.float64) * root",
                "lora_b[:, :k] = u[:, :k].to(torch.float64) * root * root",
            ),
            ("lora_a[:k] = root[:, None] * vh[:k].to(torch.float64)", "lora_a[:k] = vh[:k].to(torch.float64)"),
        ),
        (t("flexlora", "test_sigma_is_split_evenly_between_the_factors"),),
    ),
    Mutant(
        "flexlora",
        "client scaling s_k not divided out",
        "strategies/flexlora.py",
        ((".clamp_min(0).sqrt() / math.sqrt(scaling)", ".clamp_min(0).sqrt()"),),
        (
            t("flexlora", "test_a_clients_approximation_error_is_the_tail_of_the_spectrum"),
            t("flexlora", "test_a_client_whose_rank_reaches_rank_g_receives_g_exactly"),
        ),
    ),
    Mutant(
        "flexlora",
        "one component too few (k = min(rank, m) − 1)",
        "strategies/flexlora.py",
        (("k = min(rank, sigma.shape[0])", "k = max(min(rank, sigma.shape[0]) - 1, 0)"),),
        (
            t("flexlora", "test_a_client_whose_rank_reaches_rank_g_receives_g_exactly"),
            t("flexlora", "test_a_clients_approximation_error_is_the_tail_of_the_spectrum"),
        ),
    ),
    # ----------------------------------------------------------------- FedSA-LoRA
    Mutant(
        "fedsa_lora",
        "unweighted mean of A",
        "strategies/fedsa_lora.py",
        (
            (
                "return weighted_sum([resize_factor(a, rank, dim=0) for a in lora_as], weights)",
                "return weighted_sum([resize_factor(a, rank, dim=0) for a in lora_as], torch.full_like(weights, 1 / len(lora_as)))",
            ),
        ),
        (t("fedsa_lora", "test_a_bar_is_the_example_weighted_zero_padded_average"),),
    ),
    Mutant(
        "fedsa_lora",
        "personal accuracy averaged without example weights",
        "strategies/fedsa_lora.py",
        (("mean = float((weights * v).sum())", "mean = float(v.mean())"),),
        (t("fedsa_lora", "test_the_personal_summary_is_the_weighted_mean_and_spread"),),
    ),
    # ----------------------------------------------------------------- RoLoRA
    Mutant(
        "rolora",
        "alternation starts with A (parity flipped)",
        "strategies/rolora.py",
        (("return FACTORS[(server_round - 1) % 2]", "return FACTORS[server_round % 2]"),),
        (t("rolora", "test_odd_rounds_train_b_and_even_rounds_train_a"),),
    ),
    Mutant(
        "rolora",
        "unweighted mean of B in B-rounds",
        "strategies/rolora.py",
        (
            (
                "return weighted_sum([resize_factor(b, rank, dim=1) for b in trained], weights)",
                "return weighted_sum([resize_factor(b, rank, dim=1) for b in trained], torch.full_like(weights, 1 / len(trained)))",
            ),
        ),
        (t("rolora", "test_a_b_round_is_exact_with_the_shared_a"),),
    ),
    Mutant(
        "rolora",
        "A zero-padded at the front (components misaligned)",
        "strategies/rolora.py",
        (
            (
                "return weighted_sum([resize_factor(a, rank, dim=0) for a in trained], weights)",
                "return weighted_sum([resize_factor(a, rank, dim=0).roll(rank - a.shape[0], 0) for a in trained], weights)",
            ),
        ),
        (t("rolora", "test_an_a_round_is_exact_with_the_shared_b"),),
    ),
    # ----------------------------------------------------------------- FedSVD
    Mutant(
        "fedsvd",
        "B_new = U (Σ dropped)",
        "strategies/fedsvd.py",
        (("lora_b_new[:, :m] = u[:, :m] * sigma", "lora_b_new[:, :m] = u[:, :m]"),),
        (t("fedsvd", "test_the_refactored_product_is_b_bar_a_and_a_is_orthonormal"),),
    ),
    Mutant(
        "fedsvd",
        "Σ put into A (A = ΣVᵀ, B = U): product right, A not orthonormal",
        "strategies/fedsvd.py",
        (
            ("lora_b_new[:, :m] = u[:, :m] * sigma", "lora_b_new[:, :m] = u[:, :m]"),
            (
                "return wh @ q.T, lora_b_new",
                "return torch.cat([sigma, sigma.new_ones(r - m)])[:, None] * (wh @ q.T), lora_b_new",
            ),
        ),
        (t("fedsvd", "test_the_refactored_product_is_b_bar_a_and_a_is_orthonormal"),),
    ),
    Mutant(
        "fedsvd",
        "no QR of A (SVD of B̄ alone, A_new = WᵀA)",
        "strategies/fedsvd.py",
        (
            (
                "q, r_factor = torch.linalg.qr(lora_a.to(torch.float64).T)",
                "q, r_factor = lora_a.to(torch.float64).T, torch.eye(r, dtype=torch.float64)",
            ),
        ),
        (t("fedsvd", "test_the_refactored_product_is_b_bar_a_and_a_is_orthonormal"),),
    ),
    Mutant(
        "fedsvd",
        "unweighted mean of B",
        "strategies/fedsvd.py",
        (
            (
                "dim=1) for b in lora_bs], weights)",
                "dim=1) for b in lora_bs], torch.full_like(weights, 1 / len(lora_bs)))",
            ),
        ),
        (t("fedsvd", "test_the_refactored_product_is_b_bar_a_and_a_is_orthonormal"),),
    ),
    # ----------------------------------------------------------------- HetLoRA
    Mutant(
        "hetlora",
        "weights ∝ ‖ΔW_k‖ without n_k",
        "strategies/hetlora.py",
        (("    raw = n * v\n", "    raw = v\n"),),
        (t("hetlora", "test_sparsity_weights_sum_to_one_and_follow_examples_times_update_norm"),),
    ),
    Mutant(
        "hetlora",
        "weights not normalised",
        "strategies/hetlora.py",
        (("    return raw / raw.sum()\n", "    return raw\n"),),
        (t("hetlora", "test_sparsity_weights_sum_to_one_and_follow_examples_times_update_norm"),),
    ),
    Mutant(
        "hetlora",
        "norm as ‖B‖‖A‖ instead of ‖BA‖",
        "strategies/hetlora.py",
        (("return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0).sqrt())", "return float(b.norm() * a.norm())"),),
        (
            t("hetlora", "test_the_norm_from_factors_is_the_dense_frobenius_norm"),
            t("hetlora", "test_the_global_adapter_is_the_sparsity_weighted_zero_padded_average"),
        ),
    ),
    # ----------------------------------------------------------------- the strategy classes (plans, ledger, node state)
    Mutant(
        "fedex_lora",
        "residual not merged into the base (FedIT with a dropped residual)",
        "strategies/fedex_lora.py",
        (("        self.merge_into_base(stack)\n", "        pass\n"),),
        (
            t(
                "fedex_lora",
                "test_every_round_moves_the_global_model_by_exactly_the_weighted_products_under_partial_participation",
            ),
        ),
    ),
    Mutant(
        "flexlora",
        "global model kept at r_max instead of full rank Σ r_k",
        "strategies/flexlora.py",
        (
            (
                "full_a, full_b = rank_approximation(u, sigma, vh, rank=full_rank, scaling=self.scaling)",
                "full_a, full_b = rank_approximation(u, sigma, vh, rank=self.max_rank, scaling=self.scaling); full_rank = self.max_rank",
            ),
        ),
        (t("flexlora", "test_each_client_starts_from_the_best_rank_r_k_fit_of_the_last_global_update"),),
    ),
    Mutant(
        "fedsa_lora",
        "B uploaded (and still kept)",
        "strategies/fedsa_lora.py",
        (
            (
                "source=Source.NODE, fallback=Source.ZERO, upload=False, keep=True)",
                "source=Source.NODE, fallback=Source.ZERO, upload=True, keep=True)",
            ),
        ),
        (
            t("fedsa_lora", "test_b_stays_on_the_node_and_never_travels"),
            "tests/strategies/test_rules_fakegrid.py::test_fedsa_lora_keeps_each_b_on_its_node_bit_for_bit_across_rounds_and_a_resume",
        ),
    ),
    Mutant(
        "fedsa_lora",
        "B not kept on the node (restarts from zero every round)",
        "strategies/fedsa_lora.py",
        (
            (
                "source=Source.NODE, fallback=Source.ZERO, upload=False, keep=True)",
                "source=Source.ZERO, upload=False, keep=False)",
            ),
        ),
        (
            "tests/strategies/test_rules_fakegrid.py::test_fedsa_lora_keeps_each_b_on_its_node_bit_for_bit_across_rounds_and_a_resume",
        ),
    ),
    Mutant(
        "rolora",
        "the frozen factor trains too (and is not uploaded)",
        "strategies/rolora.py",
        (
            (
                "GroupPlan(roles={frozen}, source=Source.MESSAGE, train=False, upload=False)",
                "GroupPlan(roles={frozen}, source=Source.MESSAGE, train=True, upload=False)",
            ),
        ),
        (
            t("rolora", "test_each_round_uploads_exactly_one_factor_and_sends_the_other_identically_to_all"),
            "tests/strategies/test_rules_fakegrid.py::test_rolora_alternates_the_trained_factor_and_keeps_the_frozen_one_identical_everywhere",
        ),
    ),
    Mutant(
        "fedsvd",
        "A trained on the clients",
        "strategies/fedsvd.py",
        (
            (
                "frozen = GroupPlan(roles={LORA_A}, source=Source.MESSAGE, train=False, upload=False)",
                "frozen = GroupPlan(roles={LORA_A}, source=Source.MESSAGE, train=True, upload=False)",
            ),
        ),
        (t("fedsvd", "test_a_is_seeded_then_the_svd_basis_and_never_trained_nor_uploaded"),),
    ),
    Mutant(
        "hetlora",
        "data weights instead of sparsity weights in the strategy",
        "strategies/hetlora.py",
        (
            (
                "self.adapter, sparsity = hetlora(states, [u.num_examples for u in updates], scaling=self.scaling, rank=self.max_rank)",
                "self.adapter, sparsity = hetlora(states, [u.num_examples for u in updates], scaling=0.0, rank=self.max_rank)",
            ),
        ),
        (t("hetlora", "test_aggregate_train_uses_the_sparsity_weights_and_each_client_gets_its_prefix"),),
    ),
]


def first_failure(output: str) -> str:
    """The first ``E   `` line of pytest's report (the assertion or exception), shortened."""
    for line in output.splitlines():
        if line.startswith("E ") and line[1:].strip():
            text = re.sub(r"\s+", " ", line[1:].strip())
            return text if len(text) <= 140 else text[:137] + "..."
    errors = [line.strip() for line in output.splitlines() if "Error" in line]
    return errors[-1][:140] if errors else "(no E line)"


def run_tests(tests: tuple[str, ...]) -> tuple[bool, str, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0", *tests]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
    return proc.returncode == 0, summary, first_failure(proc.stdout)


def check(mutant: Mutant) -> dict:
    path = REPO / mutant.path
    original = path.read_text()
    mutated = original
    for old, new in mutant.edits:
        if mutated.count(old) != 1:
            raise SystemExit(f"{mutant.path}: the text to mutate occurs {mutated.count(old)} times, not once: {old!r}")
        mutated = mutated.replace(old, new)
    try:
        path.write_text(mutated)
        passed, summary, failure = run_tests(mutant.tests)
    finally:
        path.write_text(original)
    return {"passed": passed, "summary": summary, "failure": failure}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="rules to check (default: all)")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.rule in args.only]
    start = time.time()
    clean_ok, clean_summary, _ = run_tests(tuple(sorted({x for m in mutants for x in m.tests})))
    if not clean_ok:
        raise SystemExit(f"the tests fail on the unmodified code: {clean_summary}")
    rows = []
    for m in mutants:
        result = check(m)
        verdict = "FAILED (caught)" if not result["passed"] else "passed (NOT caught)"
        print(f"{m.rule:11s} {verdict:20s} {m.wrong}: {result['summary']}", flush=True)
        rows.append((m, result, verdict))
    lines = [
        "# Mutation checks of the six new rules",
        "",
        "Each row breaks one rule file on purpose (exact text replaced, file restored afterwards) and",
        "runs the named property tests (`--hypothesis-seed=0`); every one must fail. Regenerate with",
        "",
        "    python experiments/rules_mutation_checks.py",
        "",
        f"Unmodified code first: {clean_summary}. Whole check: {time.time() - start:.0f} s.",
        "",
        "| rule | wrong variant | test(s) run | result | first failure |",
        "|---|---|---|---|---|",
    ]
    for m, result, verdict in rows:
        names = "<br>".join(x.split("::")[1] for x in m.tests)
        failure = result["failure"].replace("|", "\\|")
        lines.append(f"| {m.rule} | {m.wrong} | {names} | {verdict}: {result['summary']} | `{failure}` |")
    if not args.only:
        OUT.write_text("\n".join(lines) + "\n")
        print(f"wrote {OUT}")
    if any(r["passed"] for _, r, _ in rows):
        raise SystemExit("some mutants were not caught")


if __name__ == "__main__":
    main()
