import pytest

from optsync.api.app import ROUTER
from optsync.api.errors import ApiError


def test_percent_encoded_slash_stays_in_the_endpoint_id() -> None:
    route, params = ROUTER.match("GET", "/v1/apps/app1/endpoints/ep%201%2Fx")
    assert route.template == "/v1/apps/{app}/endpoints/{endpoint}"
    assert params == {"app": "app1", "endpoint": "ep 1/x"}


def test_plus_and_extension_routes() -> None:
    route, params = ROUTER.match("GET", "/v1/apps/a/endpoints/user1_%2B12341111111/consent-history")
    assert route.template.endswith("/consent-history")
    assert params["endpoint"] == "user1_+12341111111"
    route, _ = ROUTER.match("GET", "/v1/apps/a/segments/s/estimate")
    assert route.template.endswith("/estimate")


def test_wrong_method_is_405_and_unknown_path_is_404() -> None:
    with pytest.raises(ApiError) as info:
        ROUTER.match("POST", "/v1/apps/a/endpoints/x")
    assert info.value.status == 405
    assert info.value.code == "MethodNotAllowedException"
    assert "PUT" in info.value.message
    with pytest.raises(ApiError) as info:
        ROUTER.match("GET", "/v1/apps/a/campaigns")
    assert info.value.status == 404


def test_empty_label_does_not_match() -> None:
    with pytest.raises(ApiError) as info:
        ROUTER.match("GET", "/v1/apps//endpoints/x")
    assert info.value.status == 404
