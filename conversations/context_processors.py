from conversations.upstream import demo_mode


def qwenweb(request) -> dict:
    return {"demo_mode": demo_mode()}
