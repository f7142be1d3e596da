import django.core.validators
import django.db.models.deletion
from django.db import migrations, models

import conversations.models


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0006_capabilities_and_settings"),
    ]

    operations = [
        migrations.AlterField(
            model_name="messageimage",
            name="url",
            field=models.URLField(
                blank=True,
                max_length=2000,
                validators=[django.core.validators.URLValidator(schemes=["http", "https"])],
                verbose_name="image URL",
            ),
        ),
        migrations.CreateModel(
            name="Upload",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "file",
                    models.FileField(
                        max_length=300,
                        upload_to=conversations.models._upload_path,
                        verbose_name="file",
                    ),
                ),
                ("content_type", models.CharField(max_length=50, verbose_name="content type")),
                ("size", models.PositiveIntegerField(verbose_name="size")),
                ("width", models.PositiveIntegerField(verbose_name="width")),
                ("height", models.PositiveIntegerField(verbose_name="height")),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "conversation",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="uploads",
                        to="conversations.conversation",
                    ),
                ),
            ],
            options={
                "verbose_name": "uploaded image",
                "verbose_name_plural": "uploaded images",
                "ordering": ["id"],
            },
        ),
        migrations.AddField(
            model_name="messageimage",
            name="upload",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="attachments",
                to="conversations.upload",
                verbose_name="uploaded image",
            ),
        ),
    ]
