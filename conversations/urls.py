from django.urls import path

from conversations import views

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("settings/", views.user_settings, name="user_settings"),
    path("search/", views.search, name="search"),
    path("c/new/", views.conversation_new, name="conversation_new"),
    path("c/", views.conversation_list, name="conversation_list"),
    path("c/<uuid:conversation_id>/", views.conversation_detail, name="conversation"),
    path(
        "c/<uuid:conversation_id>/messages/",
        views.conversation_messages,
        name="conversation_messages",
    ),
    path(
        "c/<uuid:conversation_id>/messages/<int:message_id>/version/",
        views.conversation_version,
        name="conversation_version",
    ),
    path(
        "c/<uuid:conversation_id>/images/",
        views.conversation_images,
        name="conversation_images",
    ),
    path(
        "c/<uuid:conversation_id>/images/<int:upload_id>/",
        views.conversation_image,
        name="conversation_image",
    ),
    path(
        "c/<uuid:conversation_id>/messages/<int:message_id>/images/<int:index>/",
        views.message_image,
        name="message_image",
    ),
    path(
        "c/<uuid:conversation_id>/messages/<int:message_id>/markdown/",
        views.message_markdown,
        name="message_markdown",
    ),
    path(
        "c/<uuid:conversation_id>/messages/<int:message_id>/rating/",
        views.message_rating,
        name="message_rating",
    ),
    path("c/<uuid:conversation_id>/share/", views.conversation_share, name="conversation_share"),
    path("s/<str:token>/", views.shared, name="shared"),
    path("invite/<str:token>/", views.invitation, name="invitation"),
    path("c/<uuid:conversation_id>/rename/", views.conversation_rename, name="conversation_rename"),
    path("c/<uuid:conversation_id>/delete/", views.conversation_delete, name="conversation_delete"),
    path(
        "c/<uuid:conversation_id>/settings/",
        views.conversation_settings,
        name="conversation_settings",
    ),
    path(
        "c/<uuid:conversation_id>/export.json",
        views.conversation_export_json,
        name="conversation_export_json",
    ),
    path(
        "c/<uuid:conversation_id>/export.md",
        views.conversation_export_md,
        name="conversation_export_md",
    ),
]
