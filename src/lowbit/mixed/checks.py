"""Refusals of an `auto:` run before any calibration: options the --format cannot store, and budgets no plan meets.

Every option must be storable on its own (the same preflight a uniform run of it gets), because the knapsack may
give any linear any option; GPTQ v1 keeps one scheme per model, so its options must agree; GGUF types are chosen by
llama.cpp mixes (gguf:q4_k_m, ...), not by these options.
"""

from __future__ import annotations

from torch import nn

from lowbit.arch import ArchSpec
from lowbit.errors import LowbitError
from lowbit.export.preflight import preflight_export
from lowbit.export.stored import STORED_FORMATS
from lowbit.mixed.plan import check_budget
from lowbit.scheme import QuantScheme

AUTO_FORMAT = "auto"


def check_mixed_format(scheme: QuantScheme, fmt: str) -> None:
    """The format-level refusals, which need no model: GGUF, and GPTQ with options that differ."""
    budget = scheme.mixed
    assert budget is not None
    if fmt not in (*STORED_FORMATS, AUTO_FORMAT):
        raise LowbitError(
            f"--format {fmt} cannot store the options of {scheme.name}: use --format compressed-tensors (one config "
            "group per scheme) or fake; for GGUF use a llama.cpp mix such as gguf:q4_k_m"
        )
    if fmt == "gptq":
        kinds = {(o.bits, o.group_size, o.kind in ("sym", "sym_full")) for o in budget.options}
        if len(kinds) > 1:
            raise LowbitError(
                f"GPTQ v1 holds one scheme per model, but {scheme.name} has {len(kinds)} options that store "
                "differently: use --format compressed-tensors (one config group per scheme) or fake"
            )


def preflight_mixed(
    model: nn.Module,
    arch: ArchSpec,
    scheme: QuantScheme,
    fmt: str,
    target: str = "any",
    tp: int = 1,
    ct_packing: str | None = None,
    act_order_groups: bool = False,
) -> None:
    """Each option through the format's preflight, then the budget against the cheapest plan."""
    check_mixed_format(scheme, fmt)
    budget = scheme.mixed
    assert budget is not None
    if fmt != AUTO_FORMAT:
        for option in budget.options:
            try:
                preflight_export(model, arch, option, fmt, target, tp, ct_packing, act_order_groups)
            except LowbitError as error:
                raise LowbitError(f"option {option.name} of {scheme.name}: {error}") from None
    check_budget(model, arch, scheme, fmt, ct_packing)
