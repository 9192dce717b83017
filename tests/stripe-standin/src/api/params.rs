//! Typed reads of decoded form parameters with Stripe's refusals: unknown parameters
//! (`parameter_unknown`, which is how Stripe and stripe-mock both treat typos), missing ones
//! (`parameter_missing`), non-integers (`parameter_invalid_integer`) and metadata limits.

use std::collections::BTreeMap;

use crate::error::Error;
use crate::form::FormValue;

/// Top-level parameters of one request.
#[derive(Debug, Clone, Default)]
pub struct Params(pub BTreeMap<String, FormValue>);

/// Parameters every endpoint takes (and we ignore).
const ALWAYS_ALLOWED: &[&str] = &["expand"];

impl Params {
    pub fn from_form(value: FormValue) -> Self {
        match value {
            FormValue::Map(m) => Params(m),
            _ => Params::default(),
        }
    }

    pub fn fingerprint(&self) -> String {
        FormValue::Map(self.0.clone()).to_json().to_string()
    }

    /// Refuses any top-level parameter not in `allowed`.
    pub fn allow(&self, allowed: &[&str]) -> Result<(), Error> {
        match self
            .0
            .keys()
            .find(|k| !allowed.contains(&k.as_str()) && !ALWAYS_ALLOWED.contains(&k.as_str()))
        {
            Some(k) => Err(Error::unknown_param(k)),
            None => Ok(()),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>, Error> {
        match self.0.get(key) {
            None => Ok(None),
            Some(FormValue::Str(s)) => Ok(Some(s)),
            Some(_) => Err(Error::bad_value(
                format!("Invalid string: {key} must be a string"),
                key,
            )),
        }
    }

    pub fn required_str(&self, key: &str) -> Result<&str, Error> {
        match self.str(key)? {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(Error::missing(key)),
        }
    }

    pub fn int(&self, key: &str) -> Result<Option<i64>, Error> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) => s.parse::<i64>().map(Some).map_err(|_| {
                Error::invalid(
                    "parameter_invalid_integer",
                    format!("Invalid integer: {s}"),
                    Some(key),
                )
            }),
        }
    }

    /// A nested map whose own keys are limited to `allowed` (None: any key).
    pub fn map(&self, key: &str, allowed: Option<&[&str]>) -> Result<Option<Params>, Error> {
        match self.0.get(key) {
            None => Ok(None),
            Some(FormValue::Map(m)) => {
                if let Some(allowed) = allowed {
                    if let Some(bad) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
                        return Err(Error::unknown_param(&format!("{key}[{bad}]")));
                    }
                }
                Ok(Some(Params(m.clone())))
            }
            Some(_) => Err(Error::bad_value(
                format!("Invalid object: {key} must be an object"),
                key,
            )),
        }
    }

    /// A list of strings (`k[]=a` or `k[0]=a`).
    pub fn str_list(&self, key: &str) -> Result<Option<Vec<String>>, Error> {
        let Some(value) = self.0.get(key) else {
            return Ok(None);
        };
        let bad = || Error::bad_value(format!("Invalid array: {key} must be an array"), key);
        let list = value.as_list().ok_or_else(bad)?;
        list.into_iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// `metadata[...]`: string values, Stripe's limits (50 keys, key ≤ 40 chars, value ≤ 500).
    /// An empty value means "unset this key" on updates, so it is kept here as "".
    pub fn metadata(&self) -> Result<Option<BTreeMap<String, String>>, Error> {
        let Some(map) = self.map("metadata", None)? else {
            return Ok(None);
        };
        if map.0.len() > 50 {
            return Err(Error::bad_value(
                "Metadata can have at most 50 keys",
                "metadata",
            ));
        }
        let mut out = BTreeMap::new();
        for (k, v) in map.0 {
            let param = format!("metadata[{k}]");
            let FormValue::Str(v) = v else {
                return Err(Error::bad_value("Metadata values must be strings", &param));
            };
            if k.chars().count() > 40 || v.chars().count() > 500 {
                return Err(Error::bad_value(
                    "Metadata keys are limited to 40 characters and values to 500",
                    &param,
                ));
            }
            out.insert(k, v);
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::form::decode_form;

    fn params(raw: &str) -> Params {
        Params::from_form(decode_form(raw.as_bytes()).unwrap())
    }

    #[test]
    fn unknown_parameters_are_named() {
        let err = params("a=1&bogus=2").allow(&["a"]).unwrap_err();
        assert_eq!(err.body()["error"]["param"], "bogus");
        assert_eq!(err.body()["error"]["code"], "parameter_unknown");
        assert!(params("a=1&expand[]=x").allow(&["a"]).is_ok());
    }

    #[test]
    fn nested_unknowns_carry_the_bracket_path() {
        let err = params("cancel[nope]=1")
            .map("cancel", Some(&["identifier"]))
            .unwrap_err();
        assert_eq!(err.body()["error"]["param"], "cancel[nope]");
    }

    #[test]
    fn integers_and_metadata() {
        let p = params("t=12&u=x&metadata[k]=v");
        assert_eq!(p.int("t").unwrap(), Some(12));
        assert_eq!(
            p.int("u").unwrap_err().body()["error"]["code"],
            "parameter_invalid_integer"
        );
        assert_eq!(p.metadata().unwrap().unwrap()["k"], "v");
    }
}
