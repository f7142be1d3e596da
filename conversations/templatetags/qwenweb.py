from django import template
from django.utils.safestring import mark_safe

from conversations.rendering import render_markdown

register = template.Library()


@register.filter
def markdown(text: str) -> str:
    """Untrusted markdown → sanitized HTML (see conversations.rendering)."""
    return mark_safe(render_markdown(text or ""))  # noqa: S308 - sanitized by nh3
