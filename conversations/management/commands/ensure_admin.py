import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create an admin account with a generated password if no user exists yet."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")

    def handle(self, *args, username: str, **options) -> None:
        User = get_user_model()
        if User.objects.exists():
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        line = "=" * 64
        self.stdout.write(
            f"{line}\n"
            f"  Created the first account. Sign in at /accounts/login/ with\n"
            f"    username: {username}\n"
            f"    password: {password}\n"
            f"  (shown once; change it in the admin under Users)\n"
            f"{line}"
        )
