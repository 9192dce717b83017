//! Target `standin_form`: any bytes given to the Stripe stand-in's form decoder (every v1
//! request body and query string our sink sends it goes through `decode_form`).
//!
//! Properties:
//! - no panic, whatever the bytes, in decoding or in reading the result (`as_list`, `to_json`);
//! - what decodes encodes back (with the bracket notation Stripe's libraries use, every byte
//!   outside the unreserved set percent-encoded) to a form that decodes to the same value.

use std::collections::BTreeMap;

use stripe_standin::form::{decode_form, FormValue};

pub fn check(data: &[u8]) {
    let Ok(value) = decode_form(data) else {
        return;
    };
    read_everything(&value);
    let encoded = encode(&value);
    let again = decode_form(&encoded).unwrap_or_else(|err| {
        panic!(
            "re-encoded form does not decode ({err}): {}",
            String::from_utf8_lossy(&encoded)
        )
    });
    assert_eq!(
        again,
        value,
        "decode(encode(form)) differs: {}",
        String::from_utf8_lossy(&encoded)
    );
}

fn read_everything(value: &FormValue) {
    let _ = value.to_json();
    let _ = value.as_str();
    if let Some(items) = value.as_list() {
        items.into_iter().for_each(read_everything);
    }
    if let Some(map) = value.as_map() {
        map.values().for_each(read_everything);
    }
}

/// The top-level map as `key=value` pairs joined by `&`.
fn encode(value: &FormValue) -> Vec<u8> {
    let FormValue::Map(root) = value else {
        panic!("decode_form returned a {value:?} at the top, not a map");
    };
    let mut pairs = Vec::new();
    encode_map(root, None, &mut pairs);
    pairs.join("&").into_bytes()
}

fn encode_map(map: &BTreeMap<String, FormValue>, prefix: Option<&str>, pairs: &mut Vec<String>) {
    for (name, child) in map {
        let key = match prefix {
            None => escape(name),
            Some(prefix) => format!("{prefix}[{}]", escape(name)),
        };
        match child {
            FormValue::Str(text) => pairs.push(format!("{key}={}", escape(text))),
            FormValue::List(items) => {
                for item in items {
                    // The decoder only ever appends strings (`k[]=v`); `k[][x]` is refused.
                    let Some(text) = item.as_str() else {
                        panic!("list of non-strings under {key}: {items:?}");
                    };
                    pairs.push(format!("{key}[]={}", escape(text)));
                }
            }
            FormValue::Map(child) => encode_map(child, Some(&key), pairs),
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
