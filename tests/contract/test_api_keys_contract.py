"""Scoped API keys' contract (``optsync.engine.api_keys``), on every store backend."""

from __future__ import annotations

import pytest

from optsync.credentials import KEY_ID
from optsync.engine.store import EndpointStore
from optsync.errors import NotFound


def test_a_created_key_reads_back_whole(store: EndpointStore) -> None:
    a, b = store.create_app("a").id, store.create_app("b").id
    key = store.create_api_key([a, b, a], read_only=True)
    assert KEY_ID.fullmatch(key.key_id) and len(key.key_id) == 20
    assert len(key.secret) >= 40
    assert key.app_ids == (a, b)  # repeats dropped, order kept
    assert key.read_only and key.active
    assert store.get_api_key(key.key_id) == key


def test_keys_are_distinct_and_listed_oldest_first(store: EndpointStore) -> None:
    app = store.create_app("a").id
    made = [store.create_api_key([app], read_only=n % 2 == 0) for n in range(3)]
    assert len({k.key_id for k in made}) == len({k.secret for k in made}) == 3
    listed = store.list_api_keys()
    assert listed == sorted(made, key=lambda k: (k.created_at, k.key_id))


def test_a_key_for_a_missing_app_is_refused_and_not_stored(store: EndpointStore) -> None:
    app = store.create_app("a").id
    with pytest.raises(NotFound, match="nope"):
        store.create_api_key([app, "nope"], read_only=False)
    assert store.list_api_keys() == []


def test_revoke_keeps_the_row_and_its_first_time(store: EndpointStore) -> None:
    key = store.create_api_key([store.create_app("a").id], read_only=False)
    revoked = store.revoke_api_key(key.key_id)
    assert not revoked.active and revoked.revoked_at
    again = store.revoke_api_key(key.key_id)
    assert again.revoked_at == revoked.revoked_at
    stored = store.get_api_key(key.key_id)
    assert stored is not None and stored.revoked_at == revoked.revoked_at
    assert [k.key_id for k in store.list_api_keys()] == [key.key_id]


def test_unknown_keys(store: EndpointStore) -> None:
    assert store.get_api_key("OPTSYNCKNOSUCHKEY000") is None
    with pytest.raises(NotFound, match="optsync keys list"):
        store.revoke_api_key("OPTSYNCKNOSUCHKEY000")


def test_a_revoke_is_seen_by_the_next_lookup(store: EndpointStore) -> None:
    """What every API server of one engine relies on: no cache between the row and a lookup."""
    key = store.create_api_key([store.create_app("a").id], read_only=False)
    assert store.get_api_key(key.key_id) == key
    store.revoke_api_key(key.key_id)
    found = store.get_api_key(key.key_id)
    assert found is not None and not found.active
