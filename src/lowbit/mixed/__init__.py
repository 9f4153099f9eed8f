"""Budgeted mixed precision (`--scheme auto:<bits>`): sensitivities, the exact knapsack and the plan it yields."""

from lowbit.mixed.plan import PLAN_FILE, SchemePlan

__all__ = ["PLAN_FILE", "SchemePlan"]
