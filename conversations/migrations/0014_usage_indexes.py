"""The usage page (issue 14): an index for the replies of a range of days, and the proxy
model `Usage` that gives the page its place in the admin and its permission
(conversations.view_usage)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0013_search_index"),
    ]

    operations = [
        migrations.CreateModel(
            name="Usage",
            fields=[],
            options={
                "verbose_name": "usage",
                "verbose_name_plural": "usage",
                "proxy": True,
                "default_permissions": ["view"],
                "indexes": [],
                "constraints": [],
            },
            bases=("conversations.message",),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(fields=["role", "created_at"], name="message_role_created_idx"),
        ),
    ]
