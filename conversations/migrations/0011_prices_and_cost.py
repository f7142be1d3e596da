"""Prices per million tokens on each model (none seeded: DashScope's price list differs by
region and changes), and each reply's reasoning tokens and cost, kept as computed when its
usage was saved. Replies saved before this have no cost (null)."""

from decimal import Decimal

import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0010_search_trigram_index"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="cost",
            field=models.DecimalField(
                blank=True, decimal_places=10, max_digits=20, null=True, verbose_name="cost"
            ),
        ),
        migrations.AddField(
            model_name="message",
            name="cost_currency",
            field=models.CharField(blank=True, max_length=3, verbose_name="cost currency"),
        ),
        migrations.AddField(
            model_name="message",
            name="reasoning_tokens",
            field=models.PositiveIntegerField(
                blank=True, null=True, verbose_name="reasoning tokens"
            ),
        ),
        migrations.AddField(
            model_name="modelprofile",
            name="currency",
            field=models.CharField(
                default="CNY",
                help_text="The prices' currency, as an ISO 4217 code: CNY, USD…",
                max_length=3,
                validators=[
                    django.core.validators.RegexValidator(
                        "^[A-Z]{3}$", "Three capital letters, e.g. CNY or USD."
                    )
                ],
                verbose_name="currency",
            ),
        ),
        migrations.AddField(
            model_name="modelprofile",
            name="input_price_per_million",
            field=models.DecimalField(
                blank=True,
                decimal_places=6,
                help_text="What a million input tokens cost. Leave blank: replies show no cost.",
                max_digits=12,
                null=True,
                validators=[django.core.validators.MinValueValidator(Decimal("0"))],
                verbose_name="input price per million tokens",
            ),
        ),
        migrations.AddField(
            model_name="modelprofile",
            name="output_price_per_million",
            field=models.DecimalField(
                blank=True,
                decimal_places=6,
                help_text="What a million output tokens cost. Leave blank: replies show no cost.",
                max_digits=12,
                null=True,
                validators=[django.core.validators.MinValueValidator(Decimal("0"))],
                verbose_name="output price per million tokens",
            ),
        ),
        migrations.AddField(
            model_name="modelprofile",
            name="reasoning_price_per_million",
            field=models.DecimalField(
                blank=True,
                decimal_places=6,
                help_text=(
                    "For a model whose thinking is priced apart. Leave blank: reasoning tokens "
                    "are billed as output."
                ),
                max_digits=12,
                null=True,
                validators=[django.core.validators.MinValueValidator(Decimal("0"))],
                verbose_name="reasoning price per million tokens",
            ),
        ),
    ]
