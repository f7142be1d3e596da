"""Catalog upkeep: the models the DashScope account may call that the catalog lacks.

The admin's "Sync from DashScope" (conversations/admin.py) calls `catalog_sync`: it reads the
account's model list through the project's client (the native models endpoint, every page)
and adds each missing model, disabled, for an admin to describe, price and enable.
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction
from django.db.models import Max

from conversations.dashscope import DashScopeClient
from conversations.models import ModelProfile
from conversations.upstream import get_config

# DashScope serves vision models on the multimodal endpoint only; their ids say so.
_VISION_MARKS = ("-vl", "vl-", "qvq", "omni")


async def _listed_models() -> list[str]:
    # A client of its own, closed after: the admin's thread has no long-lived event loop.
    async with DashScopeClient(get_config(), engine=settings.DASHSCOPE_HTTP_ENGINE) as client:
        return await client.list_models()


def catalog_sync() -> list[ModelProfile]:
    """Add every model DashScope lists that the catalog lacks, disabled, after the others;
    returns those added (none when the catalog has them all). Raises DashScopeError when
    the list cannot be read."""
    names = async_to_sync(_listed_models)()
    with transaction.atomic():
        known = set(ModelProfile.objects.values_list("name", flat=True))
        missing = [name for name in names if name not in known]
        last = ModelProfile.objects.aggregate(last=Max("sort_order"))["last"] or 0
        added = [
            ModelProfile(
                name=name,
                label=name,
                enabled=False,
                endpoint=(
                    ModelProfile.Endpoint.MULTIMODAL
                    if any(mark in name.lower() for mark in _VISION_MARKS)
                    else ModelProfile.Endpoint.TEXT
                ),
                sort_order=last + 10 * (position + 1),
            )
            for position, name in enumerate(missing)
        ]
        ModelProfile.objects.bulk_create(added)
    return added
