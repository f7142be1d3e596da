"""A chat's settings: what a user may choose for one conversation, checked against what its
model can do, and how each choice is sent to DashScope.

Saved on the conversation (Conversation.settings: only what was set; the rest is the model's
default) and applied from the next message. `SettingsForm` cleans a post to
`/c/<uuid>/settings/`; a field left out of the post is left as it is, so a script may set one
value (the panel posts them all, each checkbox after a hidden "off"). `parameters()` turns the
settings into the request's parameters, which the client sends under `parameters` (native) or
at the top level (OpenAI-compatible).
"""

from __future__ import annotations

import math

from django import forms
from django.core.exceptions import ValidationError
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from conversations.models import ModelProfile, Preferences, SystemPrompt
from conversations.replies import quotas, rules

# The docs' scenarios (../shared/reference/product-notes.md): sampling per task.
PRESETS = {
    "creative": (gettext_lazy("Creative writing"), {"temperature": 0.9, "top_p": 0.95}),
    "code": (gettext_lazy("Code"), {"temperature": 0.2, "top_p": 0.8}),
    "factual": (gettext_lazy("Factual Q&A"), {"temperature": 0.1, "top_p": 0.7}),
    "translation": (gettext_lazy("Translation"), {"temperature": 0.3, "top_p": 0.8}),
}
SAMPLING = (
    "temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "presence_penalty",
    "repetition_penalty",
)  # fmt: skip
SWITCHES = ("enable_search", "enable_thinking", "json_output")
SETTINGS = (*SAMPLING, *SWITCHES, "thinking_budget")
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 100
MAX_SEED = 2**31 - 1  # the range every DashScope page accepts (one page allows up to 2**63-1)
MAX_THINKING_BUDGET = 81920  # the largest any model of the reference takes (Qwen3-VL)
TRUE = {"on", "1", "true", "yes"}
FALSE = {"off", "0", "false", "no", ""}


class Switch(forms.Field):
    """A checkbox: on/1/true/yes or off/0/false/no/empty. Of several values (a hidden "off"
    before the checkbox), the last counts."""

    def to_python(self, value):
        if value is None or isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        raise ValidationError(_("Use on or off."))


class Number(forms.FloatField):
    """A decimal that must be finite (a float field takes "nan" and "inf")."""

    def validate(self, value):
        super().validate(value)
        if value is not None and not math.isfinite(value):
            raise ValidationError(_("Enter a number."))


class SettingsForm(forms.Form):
    """The settings posted for a conversation: `changes()` gives what the post sets (None:
    back to the model's default), checked together and against the model (the one posted, or
    the conversation's)."""

    model = forms.CharField(required=False)
    system_prompt = forms.CharField(required=False)
    preset = forms.ChoiceField(required=False, choices=[(key, key) for key in PRESETS])
    temperature = Number(required=False, min_value=0)
    top_p = Number(required=False)
    top_k = forms.IntegerField(required=False, min_value=0)
    max_tokens = forms.IntegerField(required=False, min_value=1)
    seed = forms.IntegerField(required=False, min_value=0, max_value=MAX_SEED)
    stop = forms.CharField(required=False, strip=False)
    presence_penalty = Number(required=False, min_value=-2, max_value=2)
    repetition_penalty = Number(required=False)
    enable_search = Switch(required=False)
    enable_thinking = Switch(required=False)
    thinking_budget = forms.IntegerField(required=False, min_value=1, max_value=MAX_THINKING_BUDGET)
    json_output = Switch(required=False)

    def __init__(self, data, *, conversation) -> None:
        super().__init__(data)
        self.conversation = conversation
        self.posted = {name for name in self.fields if name in data}

    def clean_temperature(self):
        value = self.cleaned_data.get("temperature")
        if value is not None and value >= 2:
            raise ValidationError(_("Use a temperature from 0 up to (not including) 2."))
        return value

    def clean_top_p(self):
        value = self.cleaned_data.get("top_p")
        if value is not None and not 0 < value <= 1:
            raise ValidationError(_("Use a top_p above 0, up to 1."))
        return value

    def clean_repetition_penalty(self):
        value = self.cleaned_data.get("repetition_penalty")
        if value is not None and value <= 0:
            raise ValidationError(_("Use a repetition penalty above 0 (1 is none)."))
        return value

    def clean_stop(self):
        text = self.cleaned_data.get("stop") or ""
        sequences = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValidationError(
                _("Use at most %(count)s stop sequences, one per line.")
                % {"count": MAX_STOP_SEQUENCES}
            )
        if any(len(sequence) > MAX_STOP_LENGTH for sequence in sequences):
            raise ValidationError(
                _("A stop sequence may be at most %(count)s characters long.")
                % {"count": MAX_STOP_LENGTH}
            )
        return sequences or None

    def clean_model(self) -> ModelProfile | None:
        value = (self.cleaned_data.get("model") or "").strip()
        if "model" not in self.posted:
            return None
        found = model_named(value)
        if found is None:
            raise ValidationError(_("Pick one of the models in the list."))
        owner = self.conversation.owner
        if not quotas.may_use_model(owner, found):
            raise ValidationError(rules.model_not_allowed(owner.pk, found))
        return found

    def clean_system_prompt(self):
        value = (self.cleaned_data.get("system_prompt") or "").strip()
        if "system_prompt" not in self.posted:
            return None
        prompts, none_allowed = quotas.allowed_prompts(self.conversation.owner)
        if not value and none_allowed:
            return None
        prompt = prompts.filter(pk=int(value)).first() if value.isdecimal() else None
        if prompt is None:
            raise ValidationError(_("Pick one of the system prompts in the list."))
        return prompt

    def clean(self):
        data = super().clean()
        model = data.get("model") or self.conversation.model
        merged = {**self.conversation.settings, **self.settings_posted(data)}
        for name, sentence in incompatible(merged, model):
            if name in self.posted:
                self.add_error(name, sentence)
        return data

    def settings_posted(self, data) -> dict:
        """The settings this post sets: a preset's values, but where a value is posted beside
        it."""
        found = {}
        preset = PRESETS[data["preset"]][1] if data.get("preset") else {}
        for name in SETTINGS:
            if name in self.posted and name in data:
                found[name] = data[name]
        for name, value in preset.items():
            if found.get(name) is None:  # the panel posts every field, most of them empty
                found[name] = value
        return found

    def changes(self) -> tuple[ModelProfile | None, SystemPrompt | None | bool, dict, list]:
        """After is_valid(): the model (None: unchanged), the system prompt (False:
        unchanged; None: none), the conversation's new settings, and sentences about the
        settings dropped because the new model cannot honour them."""
        model = self.cleaned_data.get("model")
        prompt = self.cleaned_data["system_prompt"] if "system_prompt" in self.posted else False
        merged = {**self.conversation.settings, **self.settings_posted(self.cleaned_data)}
        merged = {name: value for name, value in merged.items() if value is not None}
        dropped = []
        for name, sentence in incompatible(merged, model or self.conversation.model):
            merged.pop(name, None)
            dropped.append(sentence)
        return model, prompt, merged, dropped


def model_named(value: str) -> ModelProfile | None:
    """An enabled model by its DashScope name (`qwen3-vl-plus`) or its pk."""
    enabled = ModelProfile.objects.enabled()
    found = enabled.filter(name=value).first()
    if found is None and value.isdecimal() and len(value) < 19:
        found = enabled.filter(pk=int(value)).first()
    return found


def incompatible(settings: dict, model: ModelProfile) -> list[tuple[str, str]]:
    """The settings `model` cannot honour, each with a sentence saying why."""
    found = []
    label = model.label
    if settings.get("enable_search") and not model.web_search:
        found.append(("enable_search", _("%(model)s cannot search the web.") % {"model": label}))
    if settings.get("enable_thinking") and not model.can_think:
        found.append(("enable_thinking", _("%(model)s does not think.") % {"model": label}))
    if settings.get("enable_thinking") is False and model.thinking == model.Thinking.ALWAYS:
        found.append(
            ("enable_thinking", _("%(model)s always thinks: it cannot be turned off.")
             % {"model": label})
        )  # fmt: skip
    if settings.get("thinking_budget") and not model.can_think:
        found.append(("thinking_budget", _("%(model)s does not think.") % {"model": label}))
    if settings.get("json_output"):
        if not model.json_output:
            found.append(
                ("json_output", _("%(model)s cannot answer in JSON mode.") % {"model": label})
            )
        elif thinks(settings, model):
            found.append(
                ("json_output", _("JSON output does not work while the model thinks: turn "
                                  "Think off first."))
            )  # fmt: skip
    limit = model.max_output_tokens
    if settings.get("max_tokens") and limit and settings["max_tokens"] > limit:
        found.append(
            ("max_tokens", _("%(model)s writes at most %(count)s tokens.")
             % {"model": label, "count": limit})
        )  # fmt: skip
    return found


def thinks(settings: dict, model: ModelProfile) -> bool:
    """Whether the model will think on a reply with these settings."""
    if model.thinking == model.Thinking.ALWAYS:
        return True
    if model.thinking == model.Thinking.NONE:
        return False
    chosen = settings.get("enable_thinking")
    if chosen is None:
        return bool((model.parameters or {}).get("enable_thinking"))
    return chosen


def json_mode(settings: dict, model: ModelProfile) -> bool:
    """Whether a reply with these settings is written in JSON mode."""
    return "response_format" in parameters(settings, model)


def in_effect(settings: dict, model: ModelProfile) -> list[tuple[str, str]]:
    """What a reply in this chat will be written with, beyond the model's defaults, as (key,
    label) pairs for the chat's header."""
    found = []
    preset = preset_of(settings)
    if preset:
        found.append(("preset", _("Preset: %(name)s") % {"name": PRESETS[preset][0]}))
    if model.thinking == model.Thinking.SWITCHABLE and thinks(settings, model):
        found.append(("thinking", _("Think: on")))
    if settings.get("enable_search") and model.web_search:
        found.append(("search", _("Search: on")))
    if json_mode(settings, model):
        found.append(("json", _("JSON output: mention JSON in your message")))
    return found


def preset_of(settings: dict) -> str | None:
    """The preset whose values the settings have, if any."""
    for key, (_label, values) in PRESETS.items():
        if all(settings.get(name) == value for name, value in values.items()):
            return key
    return None


def parameters(settings: dict, model: ModelProfile) -> dict:
    """The request parameters for a reply: the admin's for the model, then the chat's own, as
    the reference names them. Capabilities the model lacks are never sent (an admin may have
    changed the model since the chat chose them)."""
    found = {name: settings[name] for name in SAMPLING if settings.get(name) is not None}
    if model.max_output_tokens and found.get("max_tokens", 0) > model.max_output_tokens:
        found["max_tokens"] = model.max_output_tokens
    if settings.get("enable_search") and model.web_search:
        found["enable_search"] = True
        found["search_options"] = {"enable_source": True}
    if model.thinking == model.Thinking.SWITCHABLE and settings.get("enable_thinking") is not None:
        found["enable_thinking"] = settings["enable_thinking"]
    if settings.get("thinking_budget") and thinks(settings, model):
        found["thinking_budget"] = settings["thinking_budget"]
    if settings.get("json_output") and model.json_output and not thinks(settings, model):
        found["response_format"] = {"type": "json_object"}
    return found


class PreferencesForm(forms.ModelForm):
    """A user's defaults for new chats: model, system prompt, preset (the /settings/ page)."""

    class Meta:
        model = Preferences
        fields = ["default_model", "default_system_prompt", "default_preset"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Only what the user may use (their groups may restrict it: quotas.py); a value
        # posted from outside the list is an error beside its field.
        user = self.instance.user
        self.fields["default_model"].queryset = quotas.allowed_models(user)
        self.fields["default_model"].empty_label = _("The catalog's default")
        self.fields["default_system_prompt"].queryset = quotas.allowed_prompts(user)[0]
        self.fields["default_system_prompt"].empty_label = _("The library's default")
        self.fields["default_preset"] = forms.ChoiceField(
            label=_("Default preset"),
            required=False,
            choices=[("", _("None: the model's defaults"))]
            + [(key, label) for key, (label, _values) in PRESETS.items()],
        )
