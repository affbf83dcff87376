"""Endpoint search: by endpoint id, user id or address.

Addresses are looked up in every spelling they may be stored in (as typed, E.164, lower-case
e-mail) with ``EndpointStore.find_endpoints``, which an index answers without a scan. A phone
number typed without ``+`` is read in ``DEFAULT_REGION``, as the mapping reads SMS numbers
(``phone.normalize``), and also as digits that begin with a country code. Endpoint ids are
compared case-insensitively by the store; user ids exactly, so the search tries the text as
typed and in lower case (the store has no case-insensitive user id lookup).
"""

from __future__ import annotations

import re

from optsync.engine.models import Endpoint
from optsync.engine.phone import PhonePolicy, normalize
from optsync.engine.store import EndpointStore
from optsync.errors import InvalidRequest, NotFound

__all__ = ("DEFAULT_REGION", "MAX_RESULTS", "address_forms", "find_endpoints")

MAX_RESULTS = 100
DEFAULT_REGION = "US"
"""Region of a phone number typed without a country code (the sample's numbers are +1)."""
_PHONE_LIKE = re.compile(r"\+?[\d\s().\-]{7,}")


def address_forms(query: str, default_region: str = DEFAULT_REGION) -> list[str]:
    """The spellings an address may be stored in: as typed, E.164, lower-case e-mail.

    A phone number gets its E.164 form read in ``default_region`` and, when typed without
    ``+``, the one whose first digits are its country code (``442071234567``).
    """
    forms = [query]
    if "@" in query:
        forms.append(query.lower())
    elif _PHONE_LIKE.fullmatch(query):
        readings = [normalize(query, PhonePolicy.POSSIBLE, default_region)]
        if not query.startswith("+"):
            readings.append(normalize("+" + re.sub(r"\D", "", query)))
        forms.extend(number.e164 for number in readings if number is not None)
    return list(dict.fromkeys(forms))


def _endpoints_at(store: EndpointStore, app_id: str, address: str) -> list[Endpoint]:
    return store.find_endpoints(app_id, address, MAX_RESULTS)


def find_endpoints(
    store: EndpointStore, app_id: str, query: str, default_region: str = DEFAULT_REGION
) -> list[Endpoint]:
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
    for user_id in dict.fromkeys((query, query.lower())):
        try:
            for endpoint in store.get_user_endpoints(app_id, user_id):
                found.setdefault(endpoint.id, endpoint)
        except NotFound:
            pass
    for address in address_forms(query, default_region):
        for endpoint in _endpoints_at(store, app_id, address):
            found.setdefault(endpoint.id, endpoint)
    return list(found.values())[:MAX_RESULTS]
