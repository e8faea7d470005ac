"""EventBridge pattern language: AWS documentation examples and AWS's documented edge cases.

The examples follow the Amazon EventBridge user guide ("Event patterns", "Content filtering",
"Comparison operators", "Arrays", "Null and empty values"); the conformance suite in
tests/conformance runs the 156 cases recorded against AWS.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paypost import patterns
from paypost.events import AuthorizationApproved, new_event
from paypost.patterns import InvalidPattern, compile, matches

EC2_EVENT: dict[str, Any] = {
    "version": "0",
    "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
    "detail-type": "EC2 Instance State-change Notification",
    "source": "aws.ec2",
    "account": "111122223333",
    "time": "2017-12-22T18:43:48Z",
    "region": "us-west-1",
    "resources": ["arn:aws:ec2:us-west-1:123456789012:instance/i-1234567890abcdef0"],
    "detail": {"instance-id": "i-1234567890abcdef0", "state": "terminated"},
}


def detail(**fields: Any) -> dict[str, Any]:
    return {"source": "test", "detail": fields}


def reason_of(pattern: Any) -> str:
    with pytest.raises(InvalidPattern) as info:
        compile(pattern)
    return info.value.reason


# ------------------------------------------------------------------------------ basics


def test_docs_ec2_termination_pattern() -> None:
    pattern = compile(
        {
            "source": ["aws.ec2"],
            "detail-type": ["EC2 Instance State-change Notification"],
            "detail": {"state": ["terminated"]},
        }
    )
    assert pattern.matches(EC2_EVENT)
    running = {**EC2_EVENT, "detail": {**EC2_EVENT["detail"], "state": "running"}}
    assert not pattern.matches(running)
    assert pattern.source["source"] == ["aws.ec2"]


def test_fields_absent_from_pattern_are_ignored_and_keys_are_case_sensitive() -> None:
    assert matches({"source": ["aws.ec2"]}, EC2_EVENT)
    assert not matches({"Source": ["aws.ec2"]}, EC2_EVENT)
    assert not matches({"source": ["AWS.EC2"]}, EC2_EVENT)


def test_json_text_and_dict_compile_to_the_same_pattern() -> None:
    text = '{"detail": {"state": ["terminated", "stopped"]}}'
    assert compile(text).matches(EC2_EVENT)
    assert compile(text).source == json.loads(text)


def test_compiled_pattern_pickles_as_its_source() -> None:
    import pickle

    pattern = compile({"detail": {"state": ["terminated"]}})
    copy = pickle.loads(pickle.dumps(pattern))
    assert copy.source == pattern.source
    assert copy.matches(EC2_EVENT)


def test_event_that_is_not_an_object_never_matches() -> None:
    pattern = compile({"source": ["x"]})
    assert not pattern.matches([{"source": "x"}])  # type: ignore[arg-type]
    assert not pattern.matches("x")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ values


def test_numbers_match_numerically_and_booleans_are_not_numbers() -> None:
    assert matches({"n": [300]}, {"n": 300.0})
    assert matches({"n": [3.0]}, {"n": 3})
    assert matches({"n": [1e2]}, {"n": 100})
    assert not matches({"n": [300]}, {"n": "300"})
    assert not matches({"n": ["300"]}, {"n": 300})
    assert not matches({"n": [1]}, {"n": True})
    assert not matches({"b": [True]}, {"b": 1})
    assert matches({"b": [True]}, {"b": True})


def test_numbers_outside_the_numeric_domain_match_only_literally() -> None:
    # An AWS account id in a pattern: too large for numeric matching, but still a literal.
    assert matches({"account": [123456789012]}, {"account": 123456789012})
    assert not matches({"account": [123456789012]}, {"account": 123456789013})


def test_null_and_empty_string_are_distinct() -> None:
    # "Null values and empty strings" in the AWS guide.
    event = detail(eventVersion="", responseElements=None)
    assert matches({"detail": {"responseElements": [None]}}, event)
    assert not matches({"detail": {"eventVersion": [None]}}, event)
    assert matches({"detail": {"eventVersion": [""]}}, event)
    assert not matches({"detail": {"responseElements": [""]}}, event)
    assert not matches({"detail": {"missing": [None]}}, event)


# ------------------------------------------------------------------------------ arrays


def test_event_array_matches_when_intersection_is_non_empty() -> None:
    pattern = {
        "resources": [
            "arn:aws:ec2:us-east-1:123456789012:instance/i-b188560f",
            "arn:aws:ec2:us-east-1:111122223333:instance/i-b188560f",
        ]
    }
    event = {
        "resources": [
            "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:x",
            "arn:aws:ec2:us-east-1:123456789012:instance/i-b188560f",
        ]
    }
    assert matches(pattern, event)
    assert not matches(pattern, {"resources": event["resources"][:1]})
    assert not matches(pattern, {"resources": []})


def test_fields_inside_an_array_of_objects_come_from_the_same_element() -> None:
    pattern = {"detail": {"items": {"sku": ["A"], "qty": [{"numeric": [">", 5]}]}}}
    same = detail(items=[{"sku": "B", "qty": 10}, {"sku": "A", "qty": 7}])
    mixed = detail(items=[{"sku": "A", "qty": 1}, {"sku": "B", "qty": 10}])
    assert matches(pattern, same)
    assert not matches(pattern, mixed)


def test_nested_arrays_and_arrays_of_scalars_inside_objects() -> None:
    pattern = {"detail": {"tags": {"k": ["env"]}}}
    assert matches(pattern, detail(tags=[[{"k": "x"}], [{"k": "env"}]]))
    assert matches({"detail": {"codes": [42]}}, detail(codes=[1, [42]]))


def test_exists_false_inside_arrays_is_per_element() -> None:
    pattern = {"detail": {"legs": {"amount": [{"exists": True}], "fee": [{"exists": False}]}}}
    assert matches(pattern, detail(legs=[{"amount": 1, "fee": 2}, {"amount": 3}]))
    assert not matches(pattern, detail(legs=[{"amount": 1, "fee": 2}]))


# ------------------------------------------------------------------------------ dotted keys


def test_dotted_keys_name_the_same_field_as_nesting() -> None:
    assert matches({"detail": {"state.status": ["running"]}}, detail(state={"status": "running"}))
    assert matches(
        {"detail": {"state": {"status": ["running"]}}}, detail(**{"state.status": "running"})
    )
    assert not matches({"detail": {"state": {"status": ["running"]}}}, detail(state="running"))


def test_dotted_event_key_is_found_even_when_the_nested_path_fails() -> None:
    event = detail(**{"a": {"b": "no"}, "a.b": "yes"})
    assert matches({"detail": {"a": {"b": ["yes"]}}}, event)
    assert matches({"detail": {"a": {"b": ["no"]}}}, event)
    assert not matches({"detail": {"a": {"b": [{"exists": False}]}}}, event)


# ------------------------------------------------------------------------------ operators


def test_prefix_and_suffix_with_and_without_case() -> None:
    assert matches({"time": [{"prefix": "2017-12-22"}]}, EC2_EVENT)
    assert not matches({"time": [{"prefix": "2017-10-02"}]}, EC2_EVENT)
    png = {"FileName": "image.PNG"}
    assert not matches({"FileName": [{"suffix": ".png"}]}, png)
    assert matches({"FileName": [{"suffix": {"equals-ignore-case": ".png"}}]}, png)
    svc = {"service": "EVENTBRIDGE"}
    assert matches({"service": [{"prefix": {"equals-ignore-case": "eventb"}}]}, svc)
    assert matches({"service": [{"suffix": {"equals-ignore-case": "tBridge"}}]}, svc)
    # String operators never match numbers or null.
    assert not matches({"n": [{"prefix": "1"}]}, {"n": 12})
    assert not matches({"n": [{"prefix": ""}]}, {"n": None})


def test_equals_ignore_case() -> None:
    assert matches({"name": [{"equals-ignore-case": "alice"}]}, {"name": "ALICE"})
    assert not matches({"name": [{"equals-ignore-case": "alice"}]}, {"name": "alicia"})


def test_anything_but_forms() -> None:
    assert matches({"detail": {"state": [{"anything-but": "initializing"}]}}, detail(state="x"))
    assert not matches(
        {"detail": {"state": [{"anything-but": ["stopped", "overloaded"]}]}},
        detail(state="stopped"),
    )
    assert matches({"detail": {"x-limit": [{"anything-but": 123}]}}, detail(**{"x-limit": "123"}))
    assert not matches(
        {"detail": {"x-limit": [{"anything-but": 123}]}}, detail(**{"x-limit": 123.0})
    )
    region = {"anything-but": {"prefix": "us-"}}
    assert matches({"Region": [region]}, {"Region": "eu-west-1"})
    assert not matches({"Region": [region]}, {"Region": "us-east-1"})
    assert not matches({"FileName": [{"anything-but": {"suffix": ".png"}}]}, {"FileName": "a.png"})
    assert not matches(
        {"state": [{"anything-but": {"equals-ignore-case": ["stopped", "x"]}}]},
        {"state": "STOPPED"},
    )
    lib = {"anything-but": {"wildcard": "*/lib/*"}}
    assert not matches({"FilePath": [lib]}, {"FilePath": "/usr/lib/x"})
    assert matches({"FilePath": [lib]}, {"FilePath": "/usr/bin/x"})
    # anything-but needs the field to be present; null counts as present.
    assert not matches({"detail": {"state": [{"anything-but": "x"}]}}, detail())
    assert matches({"detail": {"state": [{"anything-but": "x"}]}}, detail(state=None))


def test_numeric_comparisons_and_ranges() -> None:
    def n(value: Any, *expr: Any) -> bool:
        return matches({"v": [{"numeric": list(expr)}]}, {"v": value})

    assert n(5, ">", 0, "<=", 5)
    assert not n(0, ">", 0, "<=", 5)
    assert n(0, ">=", 0, "<", 5)
    assert not n(5, ">=", 0, "<", 5)
    assert n(301.8, "=", 3.018e2)
    assert n(9.999999, "<", 10)
    assert n(-5e9, "<=", -4e9)
    assert not n("7", ">", 1)
    assert not n(True, ">", 0)
    assert not n(None, ">", 0)
    # Event values outside AWS's numeric domain never compare.
    assert not n(6e9, ">", 0)
    assert not n(1.0000001, ">", 1)


def test_exists_on_leaves_only() -> None:
    event = detail(state="pending", nested={"k": 1}, empty=[], nothing=None)
    assert matches({"detail": {"state": [{"exists": True}]}}, event)
    assert matches({"detail": {"nothing": [{"exists": True}]}}, event)
    assert not matches({"detail": {"nested": [{"exists": True}]}}, event)
    assert matches({"detail": {"nested": [{"exists": False}]}}, event)
    assert not matches({"detail": {"empty": [{"exists": True}]}}, event)
    assert matches({"detail": {"absent": [{"exists": False}]}}, event)
    assert not matches({"detail": {"state": [{"exists": False}]}}, event)


def test_cidr_ipv4_and_ipv6() -> None:
    p4 = {"detail": {"sourceIPAddress": [{"cidr": "10.0.0.0/24"}]}}
    assert matches(p4, detail(sourceIPAddress="10.0.0.255"))
    assert not matches(p4, detail(sourceIPAddress="10.0.1.0"))
    assert not matches(p4, detail(sourceIPAddress="10.0.0.256"))
    assert not matches(p4, detail(sourceIPAddress="2001:db8::1"))
    p6 = {"ip": [{"cidr": "2001:db8:1234:1a00::/64"}]}
    assert matches(p6, {"ip": "2001:db8:1234:1a00::9"})
    assert not matches(p6, {"ip": "2001:db8:1234:1a01::"})


def test_exact_ip_value_matches_any_spelling_of_that_address() -> None:
    assert matches({"ip": ["2001:db8::1"]}, {"ip": "2001:0db8:0000:0000:0000:0000:0000:0001"})
    assert matches({"ip": ["10.0.0.1"]}, {"ip": "10.0.0.1"})


def test_wildcards_and_escapes() -> None:
    arn = {"EventBusArn": [{"wildcard": "arn:aws:events:us-east-1:*:event-bus/*"}]}
    assert matches(arn, {"EventBusArn": "arn:aws:events:us-east-1:123456789012:event-bus/b"})
    assert not matches(arn, {"EventBusArn": "arn:aws:events:eu-west-1:1:event-bus/b"})
    png = {"Filename": [{"wildcard": "dir/*.png"}]}
    assert matches(png, {"Filename": "dir/a/b.png"})
    assert matches(png, {"Filename": "dir/.png"})  # '*' matches the empty string
    assert not matches(png, {"Filename": "dir/a.jpg"})
    star = {"v": [{"wildcard": "a\\*b"}]}
    assert matches(star, {"v": "a*b"})
    assert not matches(star, {"v": "axb"})
    assert matches({"v": [{"wildcard": "a\\\\*"}]}, {"v": "a\\tail"})


def test_or_across_fields_and_nested() -> None:
    pattern = {
        "source": ["aws.cloudwatch"],
        "$or": [
            {"metricName": ["CPUUtilization", "ReadLatency"]},
            {"metricType": ["MetricType"], "namespace": ["AWS/EC2", "AWS/ES"]},
            {"$or": [{"scope": ["Service"]}, {"region": ["us-east-1"]}]},
        ],
    }
    base = {"source": "aws.cloudwatch"}
    assert matches(pattern, {**base, "metricName": "ReadLatency"})
    assert matches(pattern, {**base, "metricType": "MetricType", "namespace": "AWS/ES"})
    assert not matches(pattern, {**base, "metricType": "MetricType"})
    assert matches(pattern, {**base, "region": "us-east-1"})
    assert not matches(pattern, {"source": "x", "scope": "Service"})


def test_multiple_matchers_for_one_field_are_or() -> None:
    pattern = {"S": [{"anything-but": ["roses"]}, {"exists": False}]}
    assert matches(pattern, {"S": "tulips"})
    assert matches(pattern, {"N": "1"})
    assert not matches(pattern, {"S": "roses"})


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ({"resources": []}, "Empty arrays are not allowed"),
        ({}, "Empty objects are not allowed"),
        ({"detail": {}}, "Empty objects are not allowed"),
        ([], "Filter is not an object"),
        ({"int": 42}, '"int" must be an object or an array'),
        ({"a": [[1]]}, "Match value must be String, number, true, false, or null"),
        ({"a": [{}]}, "Match expression name not found"),
        ({"a": [{"prefix": "x", "suffix": "y"}]}, "Only one key allowed in match expression"),
        ({"a": [{"EXISTS": True}]}, "Unrecognized match type EXISTS"),
        ({"a": [{"exists": "yes"}]}, "exists match pattern must be either true or false."),
        ({"a": [{"prefix": {"nope": "x"}}]}, "Unsupported prefix pattern: nope"),
        ({"a": [{"suffix": {}}]}, "Suffix expression name not found"),
        ({"a": [{"numeric": []}]}, "Invalid member in numeric match: ]"),
        ({"a": [{"numeric": [5]}]}, "Invalid member in numeric match: 5"),
        ({"a": [{"numeric": ["!=", 5]}]}, "Unrecognized numeric range operator: !="),
        ({"a": [{"numeric": ["=", "5"]}]}, "Value of equals must be numeric"),
        ({"a": [{"numeric": ["<", 5, ">", 1]}]}, "Too many elements in numeric expression"),
        ({"a": [{"numeric": [">", 5, "<", 1]}]}, "Bottom must be less than top"),
        ({"a": [{"numeric": [">", 1, "<", 5, 7]}]}, "Too many terms in numeric range expression"),
        ({"a": [{"numeric": [">", 1, 5]}]}, "Bad value in numeric range: 5"),
        ({"a": [{"numeric": [">", 6e9]}]}, "Value must be between -5.0E9 and 5.0E9, inclusive"),
        ({"a": [{"anything-but": 6e9}]}, "Value must be between -5.0E9 and 5.0E9, inclusive"),
        (
            {"a": [{"anything-but": ["x", 1]}]},
            "Inside anything but list, either all values are number or string, "
            "mixed type is not supported",
        ),
        ({"a": [{"anything-but": {"regex": "x"}}]}, "Unsupported anything-but pattern: regex"),
        ({"a": [{"wildcard": "a\\b"}]}, "Invalid escape character at pos 2"),
        ({"a": [{"wildcard": "**"}]}, "Consecutive wildcard characters at pos 1"),
        ({"a": [{"cidr": "10.0.0.0/33"}]}, "IPv4 mask bits must be < 32"),
        ({"a": [{"cidr": "10.0.0.0/-1"}]}, "Malformed CIDR, mask bits must not be negative"),
        ({"a": [{"cidr": "300.0.0.0/8"}]}, "Invalid IP address: 300.0.0.0"),
        ({"$or": [{"a": ["x"]}]}, "There must have at least 2 Objects in $or relationship."),
        ({"$or": {"a": ["x"]}}, "It must be an Array followed with $or."),
        ({"$or": [{"a": ["x"]}, "b"]}, "Only JSON object is allowed in array of $or relationship."),
        (
            {"$or": [{"a": ["x"]}, {"numeric": ["y"]}]},
            "numeric is Ruler reserved fieldName which cannot be used inside $or.",
        ),
    ],
)
def test_invalid_patterns_give_aws_reasons(pattern: Any, reason: str) -> None:
    assert reason_of(pattern) == reason


def test_numeric_precision_limit_is_six_decimals() -> None:
    assert reason_of({"a": [{"numeric": [">", 1.1234567]}]}) == (
        "Only values upto 6 decimals are supported"
    )
    assert matches({"a": [{"numeric": [">", 1.123456]}]}, {"a": 1.123457})


def test_error_message_names_the_json_path() -> None:
    with pytest.raises(InvalidPattern) as info:
        compile({"detail": {"c-count": [{"numeric": [">", 0, "<"]}]}})
    assert info.value.path == '$.detail["c-count"][0].numeric[3]'
    assert (
        info.value.aws_message == "Event pattern is not valid. Reason: Value of < must be numeric"
    )
    assert "$.detail" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_invalid_json_text() -> None:
    assert reason_of('{"source": [').startswith("Filter is not valid JSON")
    assert reason_of('{"n": [NaN]}').startswith("Filter is not valid JSON")
    assert reason_of("[1]") == "Filter is not an object"


def test_duplicate_keys_in_json_text_merge_objects_and_override_leaves() -> None:
    pattern = compile('{"detail": {"a": ["1"]}, "detail": {"b": ["2"]}}')
    assert pattern.matches(detail(a="1", b="2"))
    assert not pattern.matches(detail(b="2"))


# ------------------------------------------------------------------------------ paypost events


def approved_event(amount: int = 12_345, mcc: str = "5411") -> dict[str, Any]:
    from paypost.events import AuthorizationRequest, AuthorizationResponse, Merchant
    from paypost.money import Money

    request = AuthorizationRequest(
        stan="000123",
        transmission_time="2026-11-21T10:00:00Z",
        acquirer_id="ACQ1",
        card_token="tok_1",
        pan_masked="411111******1111",
        amount=Money(minor=amount, currency="EUR"),
        merchant=Merchant(id="M1", name="Shop", mcc=mcc, country="DE"),
        issuing_country="FR",
    )
    response = AuthorizationResponse(response_code="00", approval_code="A1")
    det = AuthorizationApproved(request=request, response=response, source_ref="f:1")
    return new_event(det, source="paypost.ingest", tenant="acme-eu").to_dict()


def test_pipeline_rule_on_a_paypost_event() -> None:
    rule = compile(
        {
            "source": ["paypost.ingest"],
            "detail-type": ["AuthorizationApproved"],
            "tenant": [{"prefix": "acme-"}],
            "detail": {
                "request": {
                    "amount": {
                        "minor": [{"numeric": [">=", 10_000, "<", 1_000_000]}],
                        "currency": [{"anything-but": ["USD"]}],
                    },
                    "merchant": {"mcc": ["5411", "5812"]},
                    "issuing_country": [{"exists": True}],
                }
            },
        }
    )
    assert rule.matches(approved_event())
    assert not rule.matches(approved_event(amount=9_999))
    assert not rule.matches(approved_event(mcc="7995"))
    assert set(rule.field_names) >= {"source", "detail.request.amount.minor"}


# ------------------------------------------------------------------------------ fast path = exact


leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.5, 2.0, "a", "b", "ab", "A"]),
)
event_tree = st.recursive(
    leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.dictionaries(st.sampled_from(["x", "y", "x.y"]), kids, max_size=3),
    ),
    max_leaves=8,
)
matcher = st.sampled_from(
    [
        "a",
        1,
        None,
        True,
        {"prefix": "a"},
        {"anything-but": "a"},
        {"numeric": [">", 0]},
        {"exists": True},
        {"exists": False},
        {"equals-ignore-case": "a"},
    ]
)
field_name = st.sampled_from(["x", "y", "x.y", "y.x"])


@settings(max_examples=300, deadline=None)
@given(
    event=st.dictionaries(st.sampled_from(["x", "y", "x.y"]), event_tree, max_size=3),
    fields=st.dictionaries(field_name, st.lists(matcher, min_size=1, max_size=2), min_size=1),
)
def test_fast_path_agrees_with_exact_search(event: dict[str, Any], fields: dict[str, Any]) -> None:
    pattern = compile(fields)
    (branch,) = list(pattern._branches)
    assert pattern.matches(event) == patterns._match_exact(branch, event)


# ------------------------------------------------------------------------------ PatternIndex


def test_pattern_index_gives_the_same_answers_as_testing_every_pattern() -> None:
    rules: dict[str, Any] = {
        "by-type": {"detail-type": ["AuthorizationApproved"]},
        "by-source": {"source": ["paypost.ingest", "paypost.post"]},
        "or-types": {
            "$or": [
                {"detail-type": ["A"], "x": [1]},
                {"detail-type": ["AuthorizationApproved"], "tenant": [{"prefix": "acme"}]},
            ]
        },
        "unfiled": {"tenant": [{"prefix": "acme"}]},
        "type-or-absent": {"detail-type": ["A", {"exists": False}]},
    }
    index: patterns.PatternIndex[str] = patterns.PatternIndex()
    for name, rule in rules.items():
        index.add(name, rule)
    events = [
        approved_event(),
        {"detail-type": "A", "x": 1, "source": "paypost.post"},
        {"detail-type": ["A", "B"], "x": 1},
        {"source": "other", "tenant": "acme-us"},
        {},
    ]
    for event in events:
        expected = [name for name, rule in rules.items() if matches(rule, event)]
        assert index.matching(event) == expected
    assert index.matching(approved_event()) == ["by-type", "by-source", "or-types", "unfiled"]


def test_pattern_index_replace_and_remove() -> None:
    index: patterns.PatternIndex[str] = patterns.PatternIndex()
    index.add("r", {"detail-type": ["A"]})
    index.add("r", {"detail-type": ["B"]})
    assert index.matching({"detail-type": "A"}) == []
    assert index.matching({"detail-type": "B"}) == ["r"]
    index.remove("r")
    assert len(index) == 0
    assert index.matching({"detail-type": "B"}) == []
    with pytest.raises(InvalidPattern):
        index.add("bad", {"detail-type": []})
    assert "bad" not in index
