"""Endpoints: UpdateEndpoint, UpdateEndpointsBatch, Get/DeleteEndpoint, Get/DeleteUserEndpoints,
and the consent-history extension route."""

from __future__ import annotations

from optsync.api.errors import ApiError
from optsync.api.routing import Call, Reply, Route
from optsync.api.wire import consent_to_wire, endpoint_patch_from_wire, endpoint_to_wire
from optsync.engine.endpoints import validate_batch, validate_patch
from optsync.engine.models import Cause, CauseKind

__all__ = ("ROUTES",)


def _cause(call: Call) -> Cause:
    key_id = call.context.get("key_id")
    return Cause(CauseKind.API, call.request_id, f"key {key_id}" if key_id else "")


def _accepted(call: Call) -> Reply:
    return Reply(202, {"Message": "Accepted", "RequestID": call.request_id})


def update_endpoint(call: Call) -> Reply:
    patch = endpoint_patch_from_wire(call.json(), call.params["endpoint"])
    validate_patch(patch)
    call.store.write_endpoints(call.params["app"], [patch], _cause(call))
    return _accepted(call)


def update_endpoints_batch(call: Call) -> Reply:
    body = call.json()
    items = body.get("Item") if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise ApiError.bad_request("Item is required: a list of EndpointBatchItem (at most 100)")
    patches = []
    for i, item in enumerate(items):
        where = f"Item[{i}]."
        endpoint_id = item.get("Id") if isinstance(item, dict) else None
        if not isinstance(endpoint_id, str) or not endpoint_id:
            raise ApiError.bad_request(
                f"{where}Id is required: every batch item names its endpoint"
            )
        patches.append(endpoint_patch_from_wire(item, endpoint_id, where))
    validate_batch(patches)
    call.store.write_endpoints(call.params["app"], patches, _cause(call))
    return _accepted(call)


def get_endpoint(call: Call) -> Reply:
    endpoint = call.store.get_endpoint(call.params["app"], call.params["endpoint"])
    return Reply(200, endpoint_to_wire(endpoint))


def delete_endpoint(call: Call) -> Reply:
    deleted = call.store.delete_endpoint(call.params["app"], call.params["endpoint"], _cause(call))
    return Reply(202, endpoint_to_wire(deleted))


def get_user_endpoints(call: Call) -> Reply:
    found = call.store.get_user_endpoints(call.params["app"], call.params["user"])
    return Reply(200, {"Item": [endpoint_to_wire(e) for e in found]})


def delete_user_endpoints(call: Call) -> Reply:
    deleted = call.store.delete_user_endpoints(
        call.params["app"], call.params["user"], _cause(call)
    )
    return Reply(202, {"Item": [endpoint_to_wire(e) for e in deleted]})


def consent_history(call: Call) -> Reply:
    """Extension: every OptOut change of an endpoint, oldest first."""
    changes = call.store.consent_history(call.params["app"], call.params["endpoint"])
    return Reply(
        200,
        {
            "ApplicationId": call.params["app"],
            "EndpointId": changes[-1].endpoint_id,
            "Item": [consent_to_wire(c) for c in changes],
        },
    )


ROUTES = [
    Route("PUT", "/v1/apps/{app}/endpoints", update_endpoints_batch),
    Route("PUT", "/v1/apps/{app}/endpoints/{endpoint}", update_endpoint),
    Route("GET", "/v1/apps/{app}/endpoints/{endpoint}", get_endpoint),
    Route("DELETE", "/v1/apps/{app}/endpoints/{endpoint}", delete_endpoint),
    Route("GET", "/v1/apps/{app}/endpoints/{endpoint}/consent-history", consent_history),
    Route("GET", "/v1/apps/{app}/users/{user}", get_user_endpoints),
    Route("DELETE", "/v1/apps/{app}/users/{user}", delete_user_endpoints),
]
