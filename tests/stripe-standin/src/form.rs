//! Stripe's form encoding: `application/x-www-form-urlencoded` bodies (and query strings) whose
//! keys use bracket notation for nesting, as Stripe's libraries send them:
//! `metadata[external_id]=a`, `enabled_events[]=x&enabled_events[]=y`,
//! `default_aggregation[formula]=sum`, `items[0][price]=p`.
//!
//! [`decode_form`] is a pure function over raw bytes (a fuzz target): it never panics, refuses
//! malformed input with a [`FormError`] instead of guessing, and bounds nesting depth.

use std::collections::BTreeMap;

/// Deepest nesting accepted; Stripe's own parameters never go past four levels.
pub const MAX_DEPTH: usize = 8;

/// A decoded form value: a string leaf, a list (from `key[]`), or a map (from `key[sub]`).
/// Numeric segments (`items[0]`) stay map keys; [`FormValue::as_list`] reads both forms as a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormValue {
    Str(String),
    List(Vec<FormValue>),
    Map(BTreeMap<String, FormValue>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("invalid percent-encoding in form data")]
    BadPercent,
    #[error("form data is not valid utf-8")]
    NotUtf8,
    #[error("malformed parameter name: {0}")]
    BadKey(String),
    #[error("parameter nested too deeply: {0}")]
    TooDeep(String),
    #[error("parameter given more than once or with conflicting shapes: {0}")]
    Conflict(String),
}

impl FormValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FormValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&BTreeMap<String, FormValue>> {
        match self {
            FormValue::Map(m) => Some(m),
            _ => None,
        }
    }

    /// A list, whether sent as `k[]=a&k[]=b` or `k[0]=a&k[1]=b` (indices in numeric order).
    pub fn as_list(&self) -> Option<Vec<&FormValue>> {
        match self {
            FormValue::List(l) => Some(l.iter().collect()),
            FormValue::Map(m) => {
                let mut indexed = m
                    .iter()
                    .map(|(k, v)| k.parse::<usize>().ok().map(|i| (i, v)))
                    .collect::<Option<Vec<_>>>()?;
                indexed.sort_by_key(|(i, _)| *i);
                Some(indexed.into_iter().map(|(_, v)| v).collect())
            }
            FormValue::Str(_) => None,
        }
    }

    /// Plain JSON view (maps to objects, lists to arrays, leaves to strings): used to echo
    /// parameters back (meter event payloads, metadata) and to fingerprint idempotent requests.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            FormValue::Str(s) => serde_json::Value::String(s.clone()),
            FormValue::List(l) => l.iter().map(FormValue::to_json).collect(),
            FormValue::Map(m) => m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect(),
        }
    }
}

/// Decodes a form body or query string into a top-level map.
pub fn decode_form(input: &[u8]) -> Result<FormValue, FormError> {
    let mut root = BTreeMap::new();
    for pair in input.split(|b| *b == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (raw_key, raw_value) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let key = percent_decode(raw_key)?;
        let value = percent_decode(raw_value)?;
        let path = split_key(&key)?;
        insert(&mut root, &key, &path, value)?;
    }
    Ok(FormValue::Map(root))
}

/// `+` is a space and `%XX` a byte, as in every form encoder; anything else is literal.
fn percent_decode(raw: &[u8]) -> Result<String, FormError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = raw.get(i + 1).and_then(|b| (*b as char).to_digit(16));
                let lo = raw.get(i + 2).and_then(|b| (*b as char).to_digit(16));
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => return Err(FormError::BadPercent),
                }
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| FormError::NotUtf8)
}

/// A path segment: a named child or `[]` (append to a list).
#[derive(Debug, PartialEq)]
enum Segment {
    Name(String),
    Append,
}

/// `a[b][]` → `[Name(a), Name(b), Append]`. The base name must be non-empty and every bracket
/// must close before the next opens; trailing text after a `]` is refused.
fn split_key(key: &str) -> Result<Vec<Segment>, FormError> {
    let bad = || FormError::BadKey(key.to_string());
    let (base, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    if base.is_empty() || base.contains(']') {
        return Err(bad());
    }
    let mut path = vec![Segment::Name(base.to_string())];
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[').ok_or_else(bad)?;
        let close = inner.find(']').ok_or_else(bad)?;
        let name = &inner[..close];
        if name.contains('[') {
            return Err(bad());
        }
        path.push(if name.is_empty() {
            Segment::Append
        } else {
            Segment::Name(name.to_string())
        });
        rest = &inner[close + 1..];
    }
    if path.len() > MAX_DEPTH {
        return Err(FormError::TooDeep(key.to_string()));
    }
    Ok(path)
}

fn insert(
    map: &mut BTreeMap<String, FormValue>,
    key: &str,
    path: &[Segment],
    value: String,
) -> Result<(), FormError> {
    let conflict = || FormError::Conflict(key.to_string());
    let (Segment::Name(name), rest) = (&path[0], &path[1..]) else {
        return Err(conflict());
    };
    match rest.first() {
        None => {
            if map.contains_key(name) {
                return Err(conflict());
            }
            map.insert(name.clone(), FormValue::Str(value));
            Ok(())
        }
        Some(Segment::Append) => {
            // Only `k[]` (a list of strings) is supported as an append; `k[][x]` is ambiguous
            // (which element does `x` go into?) and Stripe's clients send indices for it.
            if rest.len() > 1 {
                return Err(FormError::BadKey(key.to_string()));
            }
            let entry = map
                .entry(name.clone())
                .or_insert_with(|| FormValue::List(Vec::new()));
            match entry {
                FormValue::List(l) => {
                    l.push(FormValue::Str(value));
                    Ok(())
                }
                _ => Err(conflict()),
            }
        }
        Some(Segment::Name(_)) => {
            let entry = map
                .entry(name.clone())
                .or_insert_with(|| FormValue::Map(BTreeMap::new()));
            match entry {
                FormValue::Map(child) => insert(child, key, rest, value),
                _ => Err(conflict()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(v: &'a FormValue, path: &[&str]) -> Option<&'a FormValue> {
        path.iter().try_fold(v, |v, k| v.as_map()?.get(*k))
    }

    #[test]
    fn decodes_flat_and_nested_keys() {
        let v = decode_form(
            b"event_name=api&payload[stripe_customer_id]=cus_1&payload[value]=25&metadata[external_id]=t%201",
        )
        .unwrap();
        assert_eq!(get(&v, &["event_name"]).unwrap().as_str(), Some("api"));
        assert_eq!(
            get(&v, &["payload", "stripe_customer_id"])
                .unwrap()
                .as_str(),
            Some("cus_1")
        );
        assert_eq!(get(&v, &["payload", "value"]).unwrap().as_str(), Some("25"));
        assert_eq!(
            get(&v, &["metadata", "external_id"]).unwrap().as_str(),
            Some("t 1")
        );
    }

    #[test]
    fn percent_encoded_brackets_are_brackets() {
        let v = decode_form(b"metadata%5Bexternal_id%5D=x+y").unwrap();
        assert_eq!(
            get(&v, &["metadata", "external_id"]).unwrap().as_str(),
            Some("x y")
        );
    }

    #[test]
    fn appends_and_indices_are_lists() {
        let v =
            decode_form(b"enabled_events[]=a&enabled_events[]=b&expand[1]=y&expand[0]=x").unwrap();
        let events: Vec<_> = get(&v, &["enabled_events"])
            .unwrap()
            .as_list()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(events, ["a", "b"]);
        let expand: Vec<_> = get(&v, &["expand"])
            .unwrap()
            .as_list()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(expand, ["x", "y"]);
    }

    #[test]
    fn empty_pairs_and_missing_values_are_tolerated() {
        let v = decode_form(b"&a=&&b").unwrap();
        assert_eq!(get(&v, &["a"]).unwrap().as_str(), Some(""));
        assert_eq!(get(&v, &["b"]).unwrap().as_str(), Some(""));
        assert_eq!(decode_form(b"").unwrap(), FormValue::Map(BTreeMap::new()));
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            &b"a[b=1"[..],
            b"a]=1",
            b"[a]=1",
            b"a[b]c=1",
            b"a[b[c]]=1",
            b"=1",
            b"a[][b]=1",
        ] {
            assert!(
                matches!(decode_form(bad), Err(FormError::BadKey(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn conflicts_and_duplicates_are_refused() {
        assert!(matches!(
            decode_form(b"a=1&a=2"),
            Err(FormError::Conflict(_))
        ));
        assert!(matches!(
            decode_form(b"a=1&a[b]=2"),
            Err(FormError::Conflict(_))
        ));
        assert!(matches!(
            decode_form(b"a[b]=2&a=1"),
            Err(FormError::Conflict(_))
        ));
        assert!(matches!(
            decode_form(b"a[]=1&a[b]=2"),
            Err(FormError::Conflict(_))
        ));
    }

    #[test]
    fn bad_encoding_is_refused() {
        assert_eq!(decode_form(b"a=%zz"), Err(FormError::BadPercent));
        assert_eq!(decode_form(b"a=%4"), Err(FormError::BadPercent));
        assert_eq!(decode_form(b"a=%ff"), Err(FormError::NotUtf8));
    }

    #[test]
    fn depth_is_bounded() {
        let deep = format!("a{}=1", "[x]".repeat(MAX_DEPTH));
        assert!(matches!(
            decode_form(deep.as_bytes()),
            Err(FormError::TooDeep(_))
        ));
        let ok = format!("a{}=1", "[x]".repeat(MAX_DEPTH - 1));
        assert!(decode_form(ok.as_bytes()).is_ok());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A poor man's fuzz pass until the real fuzz target exists.
        const ALPHABET: &[u8] = b"ab[]=&%5+\xff0";
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2000 {
            let len = (seed % 24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ALPHABET[(seed % ALPHABET.len() as u64) as usize]
                })
                .collect();
            let _ = decode_form(&bytes);
        }
    }
}
