"""Seed the model catalog with the models the DashScope reference lists, and a default
system prompt. Admins change or disable them in the admin afterwards."""

from django.db import migrations

# name, label, endpoint, context limit, max output, enabled
MODELS = [
    ("qwen-plus", "Qwen-Plus", "text", 1_000_000, 32_768, True),
    ("qwen3-max", "Qwen3-Max", "text", 262_144, 65_536, True),
    ("qwen-max", "Qwen-Max", "text", 131_072, 8_192, True),
    ("qwen-flash", "Qwen-Flash", "text", 1_000_000, 32_768, True),
    ("qwen-turbo", "Qwen-Turbo", "text", 1_000_000, 16_384, False),
    ("qwen3.5-plus", "Qwen3.5-Plus (vision)", "multimodal", 1_000_000, 65_536, True),
    ("qwen3-vl-plus", "Qwen3-VL-Plus (vision)", "multimodal", 262_144, 32_768, True),
    ("qwen3-vl-flash", "Qwen3-VL-Flash (vision)", "multimodal", 262_144, 32_768, False),
    ("qwen-vl-max", "Qwen-VL-Max (vision)", "multimodal", 131_072, 8_192, False),
    ("qwen-vl-plus", "Qwen-VL-Plus (vision)", "multimodal", 131_072, 8_192, False),
    ("qvq-max", "QVQ-Max (visual reasoning)", "multimodal", 131_072, 8_192, False),
    ("qwq-plus", "QwQ-Plus (reasoning)", "text", 131_072, 8_192, False),
    ("qwen3-32b", "Qwen3-32B (open source)", "text", 131_072, 16_384, False),
    ("deepseek-v3", "DeepSeek-V3", "text", 65_536, 8_192, True),
    ("deepseek-r1", "DeepSeek-R1 (reasoning)", "text", 131_072, 16_384, True),
    ("kimi-k2.5", "Kimi K2.5 (vision)", "multimodal", 262_144, 32_768, False),
]


def seed(apps, schema_editor):
    ModelProfile = apps.get_model("conversations", "ModelProfile")
    SystemPrompt = apps.get_model("conversations", "SystemPrompt")
    for order, (name, label, endpoint, context, output, enabled) in enumerate(MODELS):
        ModelProfile.objects.get_or_create(
            name=name,
            defaults={
                "label": label,
                "endpoint": endpoint,
                "context_limit": context,
                "max_output_tokens": output,
                "enabled": enabled,
                "is_default": name == "qwen-plus",
                "sort_order": order * 10,
            },
        )
    SystemPrompt.objects.get_or_create(
        name="Helpful assistant",
        defaults={"text": "You are a helpful assistant.", "is_default": True},
    )


class Migration(migrations.Migration):
    dependencies = [("conversations", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
