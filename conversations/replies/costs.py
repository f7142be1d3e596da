"""What a reply cost: its tokens at its model's prices (ModelProfile), computed when its usage
is saved and kept with it (Message.cost, cost_currency), so a later price edit rewrites no
history.

A reply that called tools made a request per round: its tokens are the sum of the rounds, and
its cost that of the sum. A continued reply (Continue) keeps what its earlier part cost, at
the prices of its moment, and adds what the new part cost at the prices of now. Its cost is
unknown (None) when the earlier part used tokens but had no cost (its model had no prices
then) or was priced in another currency: adding it up would understate the cost or mix
currencies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal

from conversations.models import ModelProfile

logger = logging.getLogger(__name__)

NO_COST = {"cost": None, "cost_currency": ""}


@dataclass(frozen=True)
class Spend:
    """The tokens one generation of a reply used (every tool round of it), and, for a
    continued reply, what its earlier part had used and cost."""

    model: str  # the ModelProfile's name (Message.model)
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int = 0
    earlier_tokens: int = 0
    earlier_cost: Decimal | None = None
    earlier_currency: str = ""


def reply_cost(spend: Spend) -> dict:
    """The reply's `cost` and `cost_currency` fields, at the model's prices now. Never
    raises: a reply is saved without its cost rather than not at all."""
    try:
        profile = (
            ModelProfile.objects.filter(name=spend.model)
            .only(
                "input_price_per_million",
                "output_price_per_million",
                "reasoning_price_per_million",
                "currency",
            )  # fmt: skip
            .first()
        )
        if profile is None:  # renamed or deleted since the reply began
            return NO_COST
        cost = profile.cost_of(
            input_tokens=spend.input_tokens,
            output_tokens=spend.output_tokens,
            reasoning_tokens=spend.reasoning_tokens,
        )
        if cost is None:
            return NO_COST
        if spend.earlier_tokens:
            if spend.earlier_cost is None or spend.earlier_currency != profile.currency:
                return NO_COST
            cost += spend.earlier_cost
        return {"cost": cost, "cost_currency": profile.currency}
    except Exception:
        logger.warning("The cost of a reply of %s is unknown", spend.model, exc_info=True)
        return NO_COST
