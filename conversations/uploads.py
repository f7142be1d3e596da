"""Images users upload into their chats.

An upload (`POST /c/<uuid>/images/`, field `image`) is opened with Pillow and kept only if its
content is a PNG, JPEG, WebP or GIF image of at most QWENWEB_MAX_UPLOAD_BYTES, whatever its
name or declared type says; it is stored under MEDIA_ROOT with a name of the app's own, and
answered with its id and the URL it is served from. The socket's send names it in
`image_ids`, which attaches it to the message; DashScope receives it inline, as a
`data:image/…;base64,` URL (the reference allows those), so it never has to reach this server.
It is served (`GET /c/<uuid>/images/<id>/`) only to the chat's owner and to reviewers, with its
checked type, `nosniff` and a CSP that allows nothing. One not sent yet can be removed
(`DELETE` on that URL: the composer's ×); a user holds at most MAX_PENDING unsent, and one
left unsent for PENDING_FOR is removed by the user's next upload.
"""

from __future__ import annotations

import base64
import logging
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import models, transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver
from django.utils import timezone
from django.utils.translation import gettext as _
from PIL import Image, UnidentifiedImageError

from conversations.models import Conversation, Upload

logger = logging.getLogger(__name__)

# Pillow's format name -> the type it is stored and served as, and its file extension.
FORMATS = {
    "PNG": ("image/png", ".png"),
    "JPEG": ("image/jpeg", ".jpg"),
    "WEBP": ("image/webp", ".webp"),
    "GIF": ("image/gif", ".gif"),
}
# Larger than any photo a phone takes; a small file that claims more is a decompression bomb.
MAX_PIXELS = 50_000_000
# Uploads a user may hold, over all their chats, that no message has taken yet (a composer's
# worth, many times over), and how long one is kept unsent: together they bound what a user
# can leave on the disk without sending it.
MAX_PENDING = 20
PENDING_FOR = timedelta(days=1)


class UploadRefused(Exception):
    """An upload that is not kept; the text is a sentence for the user."""


def unsent(owner) -> models.QuerySet[Upload]:
    """The user's uploads, in all their chats, that no message has taken."""
    return Upload.objects.filter(conversation__owner=owner, attachments__isnull=True)


def save_upload(conversation: Conversation, file) -> Upload:
    """Check `file` (an UploadedFile) and keep it as one of the chat's uploads, if its owner
    holds fewer than MAX_PENDING unsent ones (those older than PENDING_FOR are removed first)."""
    content_type, extension, width, height = check_image(file)
    owner = conversation.owner
    with transaction.atomic():
        # The owner's row, locked: two uploads at once (in two processes) are counted in turn.
        get_user_model().objects.select_for_update().filter(pk=owner.pk).exists()
        for stale in unsent(owner).filter(created_at__lt=timezone.now() - PENDING_FOR):
            stale.delete()
        if unsent(owner).count() >= MAX_PENDING:
            raise UploadRefused(
                _("You have %(count)s images added to chats but not sent. Send them, or remove "
                  "some with their × first; an image not sent is removed after a day.")
                % {"count": MAX_PENDING}
            )  # fmt: skip
        upload = Upload(
            conversation=conversation,
            content_type=content_type,
            size=file.size,
            width=width,
            height=height,
        )
        # The name is the app's own: nothing of the uploaded file's name reaches the disk.
        upload.file.save(f"image{extension}", file, save=False)
        upload.save()
    return upload


def remove_unsent(conversation: Conversation, upload_id: int) -> bool:
    """Remove one of the chat's uploads that no message has taken (the composer's ×): False
    if there is none such (a sent image stays with its message)."""
    upload = conversation.uploads.filter(pk=upload_id, attachments__isnull=True).first()
    if upload is None:
        return False
    upload.delete()
    return True


def check_image(file) -> tuple[str, str, int, int]:
    """The content type, extension, width and height of an image file, read from its content;
    UploadRefused for anything else."""
    limit = settings.QWENWEB_MAX_UPLOAD_BYTES
    if file.size > limit:
        raise UploadRefused(
            _("That image is %(size)s MB; images can be at most %(limit)s MB.")
            % {"size": round(file.size / 2**20, 1), "limit": limit // 2**20}
        )
    not_an_image = UploadRefused(_("That file is not a PNG, JPEG, WebP or GIF image."))
    try:
        file.seek(0)
        with Image.open(file) as image:
            kind, (width, height) = image.format, image.size
            # Every frame of an animation is decoded by whoever shows it.
            if width * height * getattr(image, "n_frames", 1) > MAX_PIXELS:
                raise UploadRefused(_("That image has too many pixels."))
            image.verify()  # a PNG's chunks and checksums; other formats check little here
        file.seek(0)
        with Image.open(file) as image:
            # Decoded in full (a JPEG at an eighth of its size, which reads all its data), so
            # a file cut short or corrupt is refused here rather than shown broken.
            image.draft("RGB", (max(width // 8, 1), max(height // 8, 1)))
            image.load()
    except UploadRefused:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise not_an_image from None
    finally:
        file.seek(0)
    if kind not in FORMATS:
        raise not_an_image
    content_type, extension = FORMATS[kind]
    return content_type, extension, width, height


def data_url(upload: Upload) -> str:
    """The image as DashScope takes it inline."""
    with upload.file.open("rb") as file:
        encoded = base64.b64encode(file.read()).decode("ascii")
    return f"data:{upload.content_type};base64,{encoded}"


def attach(conversation: Conversation, ids: list[int]) -> list[Upload]:
    """The chat's uploads named by a send, in the order named; UploadRefused for an id that
    is not one of this chat's."""
    if not ids:
        return []
    uploads = {upload.pk: upload for upload in conversation.uploads.filter(pk__in=ids)}
    missing = [pk for pk in ids if pk not in uploads]
    if missing:
        raise UploadRefused(_("An image you added is gone. Add it again, then send."))
    return [uploads[pk] for pk in ids]


@receiver(post_delete, sender=Upload, dispatch_uid="conversations.upload_file_deleted")
def _delete_file(sender, instance: Upload, **kwargs) -> None:
    """A deleted upload (its chat deleted, removed unsent) takes its file with it."""
    try:
        instance.file.delete(save=False)
    except OSError:
        logger.warning("Deleting %s failed", instance.file.name, exc_info=True)
