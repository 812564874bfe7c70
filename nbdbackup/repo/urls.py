"""Index URLs with their passwords kept out of messages and out of the repository."""

from __future__ import annotations


def masked_url(url: str) -> str:
    """*url* fit for messages and logs: the password shown as ***."""
    return _render(url, hide=True)


def url_without_password(url: str) -> str:
    """*url* with any password removed (what a repository may store)."""
    return _render(url, drop=True)


def _render(url: str, *, hide: bool = False, drop: bool = False) -> str:
    from sqlalchemy.engine import URL, make_url

    try:
        u = make_url(url)
    except Exception:   # unparseable: it has no password part we could find either
        return url
    if u.password is None:
        return url
    if drop:        # URL.set(password=None) means "unchanged": build it anew
        u = URL.create(u.drivername, username=u.username, host=u.host, port=u.port, database=u.database,
                       query=u.query)
    return u.render_as_string(hide_password=hide)
