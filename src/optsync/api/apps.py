"""Apps and channels: CreateApp, GetApp(s), DeleteApp, Update/Get/Delete{Sms,Email,Voice}Channel,
GetChannels."""

from __future__ import annotations

from typing import Any

from optsync.api.access import Access
from optsync.api.errors import ApiError
from optsync.api.routing import Call, Reply, Route
from optsync.api.wire import app_to_wire, channel_to_wire
from optsync.engine.models import App, ChannelType
from optsync.errors import NotFound

__all__ = ("ROUTES",)


def create_app(call: Call) -> Reply:
    body = call.json()
    if not isinstance(body, dict):
        raise ApiError.bad_request("CreateApplicationRequest must be a JSON object")
    name = body.get("Name")
    if not isinstance(name, str) or not name.strip():
        raise ApiError.bad_request("Name is required: give the app a name")
    tags = body.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise ApiError.bad_request("tags must be a map of strings")
    return Reply(201, app_to_wire(call.store.create_app(name, tags)))


def get_app(call: Call) -> Reply:
    return Reply(200, app_to_wire(call.store.get_app(call.params["app"])))


def get_apps(call: Call) -> Reply:
    size, token = call.page()
    access = call.context.get("access")
    if isinstance(access, Access) and access.app_ids is not None:
        return Reply(200, {"Item": [app_to_wire(a) for a in _scoped_apps(call, access)]})
    page = call.store.list_apps(size, token)
    out: dict[str, Any] = {"Item": [app_to_wire(a) for a in page.items]}
    if page.next_token:
        out["NextToken"] = page.next_token
    return Reply(200, out)


def _scoped_apps(call: Call, access: Access) -> list[App]:
    """A scoped key's apps that still exist, oldest first: one page (a key has a few apps)."""
    found: list[App] = []
    for app_id in access.app_ids or ():
        try:
            found.append(call.store.get_app(app_id))
        except NotFound:
            continue  # deleted since the key was made
    return sorted(found, key=lambda a: (a.creation_date, a.id))


def delete_app(call: Call) -> Reply:
    return Reply(200, app_to_wire(call.store.delete_app(call.params["app"])))


# Per channel: the request members it accepts (name -> expected JSON type) and those required.
_CHANNEL_FIELDS: dict[ChannelType, tuple[dict[str, type], frozenset[str]]] = {
    ChannelType.SMS: ({"Enabled": bool, "SenderId": str, "ShortCode": str}, frozenset()),
    ChannelType.EMAIL: (
        {
            "Enabled": bool,
            "ConfigurationSet": str,
            "FromAddress": str,
            "Identity": str,
            "RoleArn": str,
            "OrchestrationSendingRoleArn": str,
        },
        frozenset({"FromAddress", "Identity"}),
    ),
    ChannelType.VOICE: ({"Enabled": bool}, frozenset()),
}


def _update_channel(channel: ChannelType) -> Any:
    fields, required = _CHANNEL_FIELDS[channel]
    request_name = (
        f"{channel.value.title() if channel is not ChannelType.SMS else 'SMS'}ChannelRequest"
    )

    def handler(call: Call) -> Reply:
        body = call.json()
        if not isinstance(body, dict):
            raise ApiError.bad_request(f"{request_name} must be a JSON object")
        for key, value in body.items():
            expected = fields.get(key)
            if expected is None:
                raise ApiError.bad_request(
                    f"{key} is not a field of {request_name}; known: {', '.join(fields)}"
                )
            if not isinstance(value, expected):
                raise ApiError.bad_request(f"{key} must be a {expected.__name__}")
        missing = sorted(required - set(body))
        if missing:
            raise ApiError.bad_request(f"{request_name} needs {', '.join(missing)}")
        enabled = body.get("Enabled")
        settings = {k: v for k, v in body.items() if k != "Enabled"}
        updated = call.store.put_channel(call.params["app"], channel, enabled, settings)
        return Reply(200, channel_to_wire(updated))

    return handler


def _get_channel(channel: ChannelType) -> Any:
    def handler(call: Call) -> Reply:
        return Reply(200, channel_to_wire(call.store.get_channel(call.params["app"], channel)))

    return handler


def _delete_channel(channel: ChannelType) -> Any:
    def handler(call: Call) -> Reply:
        deleted = call.store.delete_channel(call.params["app"], channel)
        return Reply(200, channel_to_wire(deleted))

    return handler


def get_channels(call: Call) -> Reply:
    channels = call.store.list_channels(call.params["app"])
    return Reply(
        200,
        {
            "Channels": {
                c.channel_type.value: channel_to_wire(c, with_platform=False) for c in channels
            }
        },
    )


ROUTES = [
    Route("POST", "/v1/apps", create_app),
    Route("GET", "/v1/apps", get_apps),
    Route("GET", "/v1/apps/{app}", get_app),
    Route("DELETE", "/v1/apps/{app}", delete_app),
    Route("GET", "/v1/apps/{app}/channels", get_channels),
]
for _channel in _CHANNEL_FIELDS:
    _path = f"/v1/apps/{{app}}/channels/{_channel.value.lower()}"
    ROUTES += [
        Route("PUT", _path, _update_channel(_channel)),
        Route("GET", _path, _get_channel(_channel)),
        Route("DELETE", _path, _delete_channel(_channel)),
    ]
