//! Unit tests of the meter rules: property names, aggregation parsing, matching, quantities,
//! unique keys, definition refusals and the flat JSON form.

use super::*;
use serde_json::json;

fn props(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn meter(value: Value) -> Result<MeterDefinition, SchemaError> {
    let input: MeterInput = serde_json::from_value(value).expect("input shape");
    MeterDefinition::try_from(input)
}

/// The flat JSON form of [`tokens_meter`], which is also exactly what it serialises to.
fn tokens_json() -> Value {
    json!({
        "id": "tokens",
        "event_name": "llm.completion",
        "aggregation": "SUM",
        "property": "tokens",
        "filters": [
            {"property": "model", "in": ["gpt-4", "gpt-4o"]},
            {"property": "tier", "in": [1, true]}
        ]
    })
}

fn tokens_meter() -> MeterDefinition {
    meter(tokens_json()).expect("valid meter")
}

#[test]
fn property_names() {
    for ok in ["a", "tokens", "usage.tokens", "A-b_c.9", &"p".repeat(128)] {
        assert!(PropertyName::parse(ok).is_ok(), "{ok:?}");
    }
    for (bad, reason) in [
        ("", "must not be empty"),
        ("has space", "may contain only"),
        ("a/b", "may contain only"),
        ("ü", "may contain only"),
        (&"p".repeat(129), "at most 128"),
    ] {
        let err = PropertyName::parse(bad).expect_err(bad).to_string();
        assert!(err.starts_with("invalid property: "), "{err}");
        assert!(err.contains(reason), "{bad:?}: {err}");
    }
}

#[test]
fn aggregation_parse_table() {
    let p = |s: &str| PropertyName::parse(s).expect("valid");
    let cases: Vec<(&str, Option<&str>, Result<Aggregation, &str>)> = vec![
        ("COUNT", None, Ok(Aggregation::Count)),
        ("SUM", Some("t"), Ok(Aggregation::Sum(p("t")))),
        ("MAX", Some("t"), Ok(Aggregation::Max(p("t")))),
        ("LATEST", Some("t"), Ok(Aggregation::Latest(p("t")))),
        (
            "COUNT_UNIQUE",
            Some("u"),
            Ok(Aggregation::CountUnique(p("u"))),
        ),
        (
            "COUNT",
            Some("t"),
            Err("invalid property: must be absent for COUNT"),
        ),
        ("SUM", None, Err("invalid property: is required for SUM")),
        (
            "COUNT_UNIQUE",
            None,
            Err("invalid property: is required for COUNT_UNIQUE"),
        ),
        (
            "SUM",
            Some("bad name"),
            Err("invalid property: may contain only"),
        ),
        (
            "AVERAGE",
            Some("t"),
            Err("invalid aggregation: must be one of"),
        ),
        ("count", None, Err("invalid aggregation: must be one of")),
        ("", None, Err("invalid aggregation: must be one of")),
    ];
    for (kind, property, want) in cases {
        let got = Aggregation::parse(kind, property);
        match (got, want) {
            (Ok(got), Ok(want)) => {
                assert_eq!(got, want);
                assert_eq!(got.kind(), kind);
                assert_eq!(got.property().map(PropertyName::as_str), property);
            }
            (Err(got), Err(want)) => {
                assert!(
                    got.to_string().starts_with(want),
                    "{kind} {property:?}: {got}"
                )
            }
            (got, want) => panic!("{kind} {property:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn matches_table() {
    let m = tokens_meter();
    let name = |s: &str| EventName::parse(s).expect("valid");
    let cases = [
        ("llm.completion", json!({"model": "gpt-4", "tier": 1}), true),
        (
            "llm.completion",
            json!({"model": "gpt-4o", "tier": 1.0}),
            true,
        ),
        (
            "llm.completion",
            json!({"model": "gpt-4o", "tier": true}),
            true,
        ),
        (
            "llm.completion",
            json!({"model": "gpt-4o", "tier": 1e0}),
            true,
        ),
        (
            "llm.completion",
            json!({"model": "gpt-3", "tier": 1}),
            false,
        ),
        (
            "llm.completion",
            json!({"model": "gpt-4", "tier": 2}),
            false,
        ),
        (
            "llm.completion",
            json!({"model": "gpt-4", "tier": "1"}),
            false,
        ),
        (
            "llm.completion",
            json!({"model": "gpt-4", "tier": false}),
            false,
        ),
        ("llm.completion", json!({"model": "gpt-4"}), false),
        (
            "llm.completion",
            json!({"model": "GPT-4", "tier": 1}),
            false,
        ),
        (
            "llm.completion",
            json!({"model": ["gpt-4"], "tier": 1}),
            false,
        ),
        ("llm.completion", json!({"model": null, "tier": 1}), false),
        ("llm.other", json!({"model": "gpt-4", "tier": 1}), false),
        // A dot is part of the name, not a path into nested objects.
        (
            "llm.completion",
            json!({"tier": 1, "m": {"model": "gpt-4"}}),
            false,
        ),
    ];
    for (event, properties, want) in cases {
        assert_eq!(
            m.matches(&name(event), &props(properties.clone())),
            want,
            "{event} {properties}"
        );
    }
    let unfiltered =
        meter(json!({"id": "c", "event_name": "e", "aggregation": "COUNT"})).expect("valid");
    assert!(unfiltered.matches(&name("e"), &Map::new()));
    assert!(!unfiltered.matches(&name("E"), &Map::new()));

    let dotted = meter(json!({
        "id": "d", "event_name": "e", "aggregation": "COUNT",
        "filters": [{"property": "a.b", "in": ["x"]}]
    }))
    .expect("valid");
    assert!(dotted.matches(&name("e"), &props(json!({"a.b": "x"}))));
    assert!(!dotted.matches(&name("e"), &props(json!({"a": {"b": "x"}}))));
}

#[test]
fn quantity_table() {
    let p = |s: &str| PropertyName::parse(s).expect("valid");
    let d = |s: &str| Decimal::from_str_exact(s).expect("decimal");
    let sum = Aggregation::Sum(p("tokens"));
    type Case = (Aggregation, Value, Result<Option<Decimal>, &'static str>);
    let cases: Vec<Case> = vec![
        (Aggregation::Count, json!({}), Ok(Some(Decimal::ONE))),
        (Aggregation::Count, json!({"tokens": "x"}), Ok(Some(Decimal::ONE))),
        (sum.clone(), json!({"tokens": 42}), Ok(Some(d("42")))),
        (sum.clone(), json!({"tokens": -3}), Ok(Some(d("-3")))),
        (sum.clone(), json!({"tokens": 12.5}), Ok(Some(d("12.5")))),
        (sum.clone(), json!({"tokens": 0.1}), Ok(Some(d("0.1")))),
        (sum.clone(), json!({"tokens": u64::MAX}), Ok(Some(d("18446744073709551615")))),
        (sum.clone(), json!({"tokens": 1e20}), Ok(Some(d("100000000000000000000")))),
        (sum.clone(), json!({"tokens": "12.5"}), Ok(Some(d("12.5")))),
        (sum.clone(), json!({"tokens": "-0.25"}), Ok(Some(d("-0.25")))),
        (sum.clone(), json!({}), Ok(None)),
        (sum.clone(), json!({"tokens": null}), Ok(None)),
        (sum.clone(), json!({"other": 5}), Ok(None)),
        (sum.clone(), json!({"tokens": "abc"}), Err("property tokens: must be a number or a decimal string, found a string that is not a decimal")),
        (sum.clone(), json!({"tokens": "1e3"}), Err("found a string that is not a decimal")),
        (sum.clone(), json!({"tokens": " 1"}), Err("found a string that is not a decimal")),
        (sum.clone(), json!({"tokens": true}), Err("property tokens: must be a number or a decimal string, found a boolean")),
        (sum.clone(), json!({"tokens": [1]}), Err("found an array")),
        (sum.clone(), json!({"tokens": {"n": 1}}), Err("found an object")),
        (sum, json!({"tokens": 1e300}), Err("property tokens: number outside the decimal range")),
        (Aggregation::Max(p("v")), json!({"v": 7}), Ok(Some(d("7")))),
        (Aggregation::Latest(p("v")), json!({"v": "3.50"}), Ok(Some(d("3.50")))),
        (Aggregation::Latest(p("v")), json!({"v": false}), Err("property v:")),
        (Aggregation::CountUnique(p("user")), json!({"user": "u1"}), Ok(Some(Decimal::ONE))),
        (Aggregation::CountUnique(p("user")), json!({"user": {"a": 1}}), Ok(Some(Decimal::ONE))),
        (Aggregation::CountUnique(p("user")), json!({}), Ok(None)),
    ];
    for (aggregation, properties, want) in cases {
        let got = aggregation.quantity(&props(properties.clone()));
        match (&got, want) {
            (Ok(got), Ok(want)) => assert_eq!(*got, want, "{aggregation:?} {properties}"),
            (Err(got), Err(want)) => assert!(
                got.to_string().contains(want),
                "{aggregation:?} {properties}: {got}"
            ),
            (got, want) => panic!("{aggregation:?} {properties}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn unique_key_table() {
    let unique = Aggregation::CountUnique(PropertyName::parse("u").expect("valid"));
    let cases: Vec<(Value, Option<&str>)> = vec![
        (json!({"u": "user-1"}), Some("user-1")),
        (json!({"u": 42}), Some("42")),
        (json!({"u": "42"}), Some("42")),
        (json!({"u": 42.0}), Some("42")),
        (json!({"u": 1.50}), Some("1.5")),
        (json!({"u": 1e300}), Some("1e+300")),
        (json!({"u": true}), Some("true")),
        (json!({"u": [1.0, "a", 2.5]}), Some(r#"[1,"a",2.5]"#)),
        (json!({"u": {"b": 1, "a": 2}}), Some(r#"{"a":2,"b":1}"#)),
        (json!({"u": null}), None),
        (json!({}), None),
    ];
    for (properties, want) in cases {
        assert_eq!(
            unique.unique_key(&props(properties.clone())).as_deref(),
            want,
            "{properties}"
        );
    }
    // Key order does not change the key.
    let a = unique.unique_key(&props(json!({"u": {"x": 1, "y": 2}})));
    let b = unique.unique_key(&props(json!({"u": {"y": 2, "x": 1.0}})));
    assert_eq!(a, b);
    assert_eq!(Aggregation::Count.unique_key(&props(json!({"u": 1}))), None);
}

#[test]
fn definition_refusals_name_the_field() {
    let base = json!({"id": "m", "event_name": "e", "aggregation": "COUNT"});
    let with = |key: &str, value: Value| {
        let mut v = base.clone();
        v[key] = value;
        v
    };
    let filter_values =
        |n: usize| json!([{"property": "p", "in": (0..n).map(|i| json!(i)).collect::<Vec<_>>()}]);
    let many_filters: Vec<Value> = (0..21)
        .map(|i| json!({"property": format!("p{i}"), "in": ["x"]}))
        .collect();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"event_name": "e", "aggregation": "COUNT"}),
            "invalid id: is required",
        ),
        (with("id", json!("bad id")), "invalid id: may contain only"),
        (with("id", json!("")), "invalid id: must not be empty"),
        (
            with("id", json!("a".repeat(65))),
            "invalid id: must be at most 64",
        ),
        (
            with("event_name", json!("x".repeat(101))),
            "invalid event_name: must be at most 100",
        ),
        (
            with("event_name", json!(" ")),
            "invalid event_name: must not be only whitespace",
        ),
        (with("aggregation", json!("AVG")), "invalid aggregation"),
        (
            with("property", json!("p")),
            "invalid property: must be absent for COUNT",
        ),
        (
            with("filters", filter_values(0)),
            "invalid filters: filter 0: `in` must list 1 to 100",
        ),
        (
            with("filters", filter_values(101)),
            "invalid filters: filter 0: `in` must list 1 to 100",
        ),
        (
            with("filters", json!(many_filters)),
            "invalid filters: at most 20 filters",
        ),
        (
            with(
                "filters",
                json!([{"property": "p", "in": ["a"]}, {"property": "p", "in": ["b"]}]),
            ),
            "invalid filters: filter 1: property p already has a filter",
        ),
        (
            with("filters", json!([{"property": "a b", "in": ["a"]}])),
            "invalid filters: filter 0 property may contain only",
        ),
        (
            with("filters", json!([{"property": "p", "in": ["a", null]}])),
            "invalid filters: filter 0 value 1: must be a string, number or boolean",
        ),
        (
            with("filters", json!([{"property": "p", "in": [{"a": 1}]}])),
            "invalid filters: filter 0 value 0: must be a string, number or boolean",
        ),
        (
            with("filters", json!([{"property": "p", "in": [1e300]}])),
            "invalid filters: filter 0 value 0: number outside the decimal range",
        ),
    ];
    for (input, want) in cases {
        let err = meter(input.clone())
            .expect_err(&input.to_string())
            .to_string();
        assert!(err.starts_with(want), "{input}: {err}");
    }
    assert!(meter(with("filters", filter_values(100))).is_ok());
    assert!(meter(with("filters", json!(null))).is_ok());
}

#[test]
fn input_shape_is_strict() {
    for bad in [
        json!({"id": "m", "event_name": "e", "aggregation": "COUNT", "extra": 1}),
        json!({"id": "m", "event_name": "e", "aggregation": "COUNT", "filters": [{"property": "p", "in": ["a"], "not": 1}]}),
        json!({"id": "m", "aggregation": "COUNT"}),
        json!({"id": 5, "event_name": "e", "aggregation": "COUNT"}),
        json!(["m", "e", "COUNT", null, null]),
        json!({"id": "m", "event_name": "e", "aggregation": "COUNT", "filters": [["p", ["a"]]]}),
    ] {
        assert!(
            serde_json::from_value::<MeterInput>(bad.clone()).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn serialises_flat_and_reads_back() {
    let m = tokens_meter();
    let value = serde_json::to_value(&m).expect("serialise");
    assert_eq!(value, tokens_json());
    assert_eq!(
        serde_json::from_value::<MeterDefinition>(value).expect("parse"),
        m
    );

    let count =
        meter(json!({"id": "api_calls", "event_name": "api.request", "aggregation": "COUNT"}))
            .expect("valid");
    let value = serde_json::to_value(&count).expect("serialise");
    assert_eq!(
        value,
        json!({"id": "api_calls", "event_name": "api.request", "aggregation": "COUNT", "filters": []})
    );
    assert_eq!(
        serde_json::from_value::<MeterDefinition>(value).expect("parse"),
        count
    );
}

#[test]
fn filter_numbers_survive_a_round_trip() {
    let m = meter(json!({
        "id": "m", "event_name": "e", "aggregation": "COUNT",
        "filters": [{"property": "p", "in": [0.1, -2.5, 1.0, 18446744073709551615u64, -9007199254740993i64, 1e25]}]
    }))
    .expect("valid");
    let text = serde_json::to_string(&m).expect("serialise");
    let back: MeterDefinition = serde_json::from_str(&text).expect("parse");
    assert_eq!(back, m, "{text}");
    assert!(
        text.contains("[0.1,-2.5,1,18446744073709551615,-9007199254740993,"),
        "{text}"
    );
}
