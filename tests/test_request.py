"""Request rows as TorchServe's worker hands them to the handler: where the image is, and how parameters are read."""
import base64

import pytest

from tests.fixtures import encode, product_photo
from visual_search import request
from visual_search.errors import InputError
from visual_search.request import Limits, Parameter, parse_query

PHOTO = encode(product_photo("bags", 3, size=(40, 30)), "JPEG")
LIMITS = Limits(default_k=4, max_k=10)
NO_DUPLICATES = {"duplicates": False, "diverse": False, "duplicate_threshold": None}


def parse(row, headers=None):
    return parse_query(row, headers or {}, LIMITS, decode=lambda data: data)


def refused(row, headers=None):
    with pytest.raises(InputError) as info:
        parse(row, headers)
    return info.value


def test_the_image_comes_from_the_body_the_image_part_the_only_file_part_or_json():
    assert parse({"body": bytearray(PHOTO)}).image == PHOTO
    assert parse({"image": PHOTO, "k": b"2"}, {"image": {"content-type": ""}}).image == PHOTO
    assert parse({"photo": PHOTO}, {"photo": {"content-type": "image/jpeg"}}).image == PHOTO
    assert parse({"body": {"image": base64.b64encode(PHOTO).decode()}}).image == PHOTO


def test_parameters_from_header_form_and_json_the_later_overriding_the_earlier():
    assert parse({"body": PHOTO}).params == {"output": "similar", "k": 4, "category": (), "exclude": (),
                                             "listing": None, **NO_DUPLICATES}
    assert parse({"body": PHOTO}, {"X-Top-K": "2"}).k == 2
    assert parse({"body": PHOTO, "k": b"3"}, {"X-Top-K": "2"}).k == 3  # form field or query string
    json_body = {"image": base64.b64encode(PHOTO).decode(), "k": 5, "output": "similar"}
    assert parse({"body": json_body, "k": b"3"}, {"X-Top-K": "2"}).k == 5
    assert parse({"body": PHOTO}, {"x-output": "EMBEDDING"}).params == {"output": "embedding", "listing": None}


@pytest.mark.parametrize("row, headers, status, reason", [
    ({"body": {"image": "", "k": 2.9}}, {}, 400, "k must be an integer, not 2.9"),
    ({"body": {"image": "", "k": True}}, {}, 400, "k must be an integer, not True"),
    ({"body": {"image": "", "k": "3"}}, {}, 400, "k must be an integer, not '3'"),
    ({"body": PHOTO}, {"X-Top-K": "2.9"}, 400, "k must be an integer, not '2.9'"),
    ({"body": PHOTO}, {"X-Top-K": "11"}, 400, "k must be between 1 and 10, not 11"),
    ({"body": PHOTO, "output": b"both"}, {}, 400, "output must be one of similar, embedding"),
    ({"body": "some text"}, {"Content-Type": "text/plain"}, 415, "a text body (text/plain) is not an image"),
    ({"body": b"{not json"}, {"Content-Type": "application/json"}, 400, "not valid JSON"),
    ({"body": [1, 2]}, {}, 400, "a JSON body must be an object"),
    ({"body": {"image": "***"}}, {}, 400, "not valid base64"),
    ({"a": PHOTO, "b": PHOTO}, {"a": {"content-type": "image/jpeg"}, "b": {"content-type": "image/png"}}, 400,
     "2 files in one request (a, b)"),
    ({"k": b"3"}, {}, 400, "no image in the request"),
    ({"\x89PNG\r\n": b"\x1a\n"}, {"Content-Type": "application/x-www-form-urlencoded"}, 415, "form-encoded"),
    ({"body": PHOTO}, {"X-Listing": "sku-1"}, 400, "a photo or a listing id to search by, not both"),
    ({"body": {"listing": "sku-1", "output": "embedding"}}, {}, 400, "a listing can only be searched by"),
    ({"body": {"listing": 7}}, {}, 400, "listing must be a catalogue id"),
    ({"body": {"listing": "  "}}, {}, 400, "listing must be a catalogue id"),
    ({"body": PHOTO}, {"X-Category": " , "}, 400, "category must name 1 to 100 values"),
    ({"body": {"image": "", "category": ["shoes", 3]}}, {}, 400, "category must be a string or a list of strings"),
    ({"body": {"image": "", "exclude": {"id": 1}}}, {}, 400, "exclude must be a string or a list of strings"),
    ({"body": {"image": "", "exclude": [f"sku-{i}" for i in range(1001)]}}, {}, 400, "exclude must name 1 to 1000"),
    ({"body": {"k": 3}}, {}, 400, 'JSON body needs "image"'),
    ({"image": PHOTO, "extra": PHOTO},
     {"image": {"content-type": "image/jpeg"}, "extra": {"content-type": "image/png"}}, 400,
     "2 files in one request (extra, image)"),
    ({"body": PHOTO}, {"X-Top-K": "\uff15"}, 400, "k must be an integer"),
    ({"body": PHOTO}, {"X-Exclude": "a\x01b"}, 400, "exclude holds control characters"),
    ({"body": {"image": "", "listing": "sku\ud800"}}, {}, 400, "listing holds control characters or invalid text"),
    ({"body": PHOTO}, {"X-Exclude": "a%FFb"}, 400, "a %-escape that is not UTF-8"),
    ({"body": PHOTO}, {"X-Output": "\xff" * 300}, 400, "... (300 characters)"),
    ({"body": b""}, {"Content-Type": "image/jpeg"}, 400, "no image in the request"),
])
def test_bad_requests_are_refused_with_a_reason(row, headers, status, reason):
    error = refused(row, headers)
    assert error.status == status and reason in error.reason, error.reason


def test_k_is_not_read_for_an_embedding():
    assert parse({"body": PHOTO}, {"X-Output": "embedding", "X-Top-K": "0"}).params == {"output": "embedding",
                                                                                         "listing": None}
    assert parse({"body": {"image": "", "output": "embedding", "k": 2.9}}).k is None


def test_text_fields_are_not_files_and_unknown_ones_are_ignored():
    query = parse({"image": PHOTO, "note": b"hi", "k": b"2"},
                  {"image": {"content-type": "image/jpeg"}, "note": {"content-type": ""}, "k": {"content-type": ""}})
    assert query.image == PHOTO and query.k == 2


def test_a_form_with_parameters_only_is_not_a_mangled_image():
    error = refused({"k": b"3"}, {"Content-Type": "application/x-www-form-urlencoded"})
    assert error.status == 400 and "no image" in error.reason


def test_a_new_parameter_is_one_table_entry(monkeypatch):
    def read_colour(value, limits, text):
        return value.lower()

    monkeypatch.setitem(request.PARAMETERS, "colour", Parameter("X-Colour", read_colour, lambda limits: None))
    assert parse({"body": PHOTO}, {"X-Colour": "Red"}).params["colour"] == "red"
    assert parse({"body": PHOTO, "colour": b"Blue"}).params["colour"] == "blue"
    assert parse({"body": {"image": "", "colour": "GREEN"}}).params["colour"] == "green"
    assert parse({"body": PHOTO}).params["colour"] is None


def test_filters_and_listing_come_from_any_channel():
    assert parse({"body": PHOTO}, {"X-Category": "shoes, bags,shoes", "X-Exclude": "sku-1"}).params == {
        "output": "similar", "k": 4, "category": ("shoes", "bags"), "exclude": ("sku-1",), "listing": None,
        **NO_DUPLICATES}
    form = parse({"image": PHOTO, "category": b"phones", "exclude": b"a,b"},
                 {"image": {"content-type": "image/jpeg"}, "category": {"content-type": ""},
                  "exclude": {"content-type": ""}})
    assert form.categories == ("phones",) and form.exclude == ("a", "b")
    by_json = parse({"body": {"listing": "sku-7", "category": "shoes", "exclude": ["sku-8"], "k": 2}})
    assert by_json.image is None and by_json.listing == "sku-7" and by_json.k == 2
    assert by_json.categories == ("shoes",) and by_json.exclude == ("sku-8",)
    by_header = parse({"body": b""}, {"X-Listing": " sku-7 ", "Content-Type": "application/octet-stream"})
    assert by_header.image is None and by_header.listing == "sku-7"
    assert parse({"listing": b"sku-9"}, {"Content-Type": "application/x-www-form-urlencoded"}).listing == "sku-9"


def test_header_values_are_read_as_the_utf8_the_client_sent():
    latin1_view = "électroménager".encode("utf-8").decode("latin-1")  # what TorchServe hands over
    assert parse({"body": PHOTO}, {"X-Category": latin1_view}).categories == ("électroménager",)
    assert parse({"body": PHOTO}, {"X-Category": "caf\xe9"}).categories == ("caf\xe9",)  # not UTF-8: as it came


def test_names_with_commas_or_percent_signs_are_escaped_in_text():
    query = parse({"body": PHOTO}, {"X-Exclude": "a%2Cb,100%25,c"})
    assert query.exclude == ("a,b", "100%", "c")
    assert parse({"body": {"image": "", "exclude": ["a,b", "100%"]}}).exclude == ("a,b", "100%")  # JSON: as is


@pytest.mark.parametrize("text, value", [("true", True), (" TRUE ", True), ("1", True), ("yes", True), ("on", True),
                                         ("false", False), ("0", False), ("No", False), ("off", False)])
def test_duplicates_and_diverse_come_from_every_channel_as_text(text, value):
    for name, header in (("duplicates", "X-Duplicates"), ("diverse", "X-Diverse")):
        assert parse({"body": PHOTO}, {header: text}).params[name] is value
        form = parse({"image": PHOTO, name: text.encode()}, {"image": {"content-type": "image/jpeg"},
                                                             name: {"content-type": ""}})
        assert form.params[name] is value
        assert parse({"body": PHOTO, name: text.encode()}).params[name] is value  # a query string on /invoke
        listing = parse({"listing": b"sku-9", name: text.encode()},
                        {"Content-Type": "application/x-www-form-urlencoded"})
        assert listing.listing == "sku-9" and listing.params[name] is value


def test_duplicates_diverse_and_threshold_in_json_and_the_later_channel_wins():
    body = {"image": base64.b64encode(PHOTO).decode(), "duplicates": True, "diverse": False,
            "duplicate_threshold": 0.05}
    params = parse({"body": body}, {"X-Diverse": "true", "X-Duplicate-Threshold": "0.5"}).params
    assert params["duplicates"] is True and params["diverse"] is False and params["duplicate_threshold"] == 0.05
    assert parse({"body": {"listing": "sku-7", "duplicates": True}}).params["duplicates"] is True
    assert parse({"body": PHOTO}, {"X-Duplicate-Threshold": " 4 "}).params["duplicate_threshold"] == 4.0
    assert parse({"body": PHOTO, "duplicate_threshold": b".025"}).params["duplicate_threshold"] == 0.025
    assert parse({"body": PHOTO}, {"X-Duplicate-Threshold": "2.5e-2"}).params["duplicate_threshold"] == 0.025
    assert parse({"body": {"image": "", "duplicate_threshold": 1}}).params["duplicate_threshold"] == 1.0


def test_duplicates_parameters_are_not_read_for_an_embedding():
    params = parse({"body": PHOTO}, {"X-Output": "embedding", "X-Duplicates": "maybe",
                                     "X-Duplicate-Threshold": "-1"}).params
    assert params == {"output": "embedding", "listing": None}


@pytest.mark.parametrize("row, headers, reason", [
    ({"body": PHOTO}, {"X-Duplicates": "maybe"}, "duplicates must be true or false, not 'maybe'"),
    ({"body": PHOTO}, {"X-Diverse": ""}, "diverse must be true or false, not ''"),
    ({"body": PHOTO, "diverse": b"2"}, {}, "diverse must be true or false, not '2'"),
    ({"body": {"image": "", "duplicates": "true"}}, {}, "duplicates must be true or false, not 'true'"),
    ({"body": {"image": "", "duplicates": 1}}, {}, "duplicates must be true or false, not 1"),
    ({"body": {"image": "", "diverse": None}}, {}, None),  # JSON null: the default, as if not sent
    ({"body": PHOTO}, {"X-Duplicate-Threshold": "0"}, "duplicate_threshold must be a squared L2 distance above 0"),
    ({"body": PHOTO}, {"X-Duplicate-Threshold": "-0.1"}, "at most 4, not -0.1"),
    ({"body": PHOTO}, {"X-Duplicate-Threshold": "4.5"}, "at most 4, not 4.5"),
    ({"body": PHOTO}, {"X-Duplicate-Threshold": "near"}, "duplicate_threshold must be a number, not 'near'"),
    ({"body": PHOTO}, {"X-Duplicate-Threshold": "nan"}, "duplicate_threshold must be a number, not 'nan'"),
    ({"body": PHOTO, "duplicate_threshold": b"1e999"}, {}, "at most 4, not inf"),
    ({"body": {"image": "", "duplicate_threshold": "0.1"}}, {}, "duplicate_threshold must be a number, not '0.1'"),
    ({"body": {"image": "", "duplicate_threshold": True}}, {}, "duplicate_threshold must be a number, not True"),
    ({"body": {"image": "", "duplicate_threshold": float("nan")}}, {}, "at most 4, not nan"),
    ({"body": PHOTO}, {"X-Duplicates": "tr\x00ue"}, "duplicates holds control characters"),
])
def test_bad_duplicates_parameters_are_refused_with_a_reason(row, headers, reason):
    if reason is None:
        assert parse(row, headers).params["diverse"] is False
        return
    error = refused(row, headers)
    assert error.status == 400 and reason in error.reason, error.reason
