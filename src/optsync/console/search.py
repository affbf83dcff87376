"""Endpoint search: by endpoint id, user id or address.

Addresses are looked up in every spelling they may be stored in (as typed, E.164, lower-case
e-mail) with ``EndpointStore.find_endpoints``, which an index answers without a scan.
"""

from __future__ import annotations

import re

from optsync.engine.models import Endpoint
from optsync.engine.phone import normalize
from optsync.engine.store import EndpointStore
from optsync.errors import InvalidRequest, NotFound

__all__ = ("MAX_RESULTS", "address_forms", "find_endpoints")

MAX_RESULTS = 100
_PHONE_LIKE = re.compile(r"\+?[\d\s().\-]{7,}")


def address_forms(query: str) -> list[str]:
    """The spellings an address may be stored in: as typed, E.164, lower-case e-mail."""
    forms = [query]
    if "@" in query:
        forms.append(query.lower())
    elif _PHONE_LIKE.fullmatch(query):
        digits = re.sub(r"\D", "", query)
        for text in (query, "+" + digits):
            number = normalize(text)
            if number is not None:
                forms.append(number.e164)
    return list(dict.fromkeys(forms))


def _endpoints_at(store: EndpointStore, app_id: str, address: str) -> list[Endpoint]:
    return store.find_endpoints(app_id, address, MAX_RESULTS)


def find_endpoints(store: EndpointStore, app_id: str, query: str) -> list[Endpoint]:
    """Endpoints whose id, user id or address is ``query`` (blocking: run it in a thread)."""
    query = query.strip()
    if not query:
        return []
    found: dict[str, Endpoint] = {}
    try:
        endpoint = store.get_endpoint(app_id, query)
        found[endpoint.id] = endpoint
    except (NotFound, InvalidRequest):
        pass
    try:
        for endpoint in store.get_user_endpoints(app_id, query):
            found.setdefault(endpoint.id, endpoint)
    except NotFound:
        pass
    for address in address_forms(query):
        for endpoint in _endpoints_at(store, app_id, address):
            found.setdefault(endpoint.id, endpoint)
    return list(found.values())[:MAX_RESULTS]
