//! The bulk mapping upload's input: a CSV file of `customer_id,provider_customer_id` rows,
//! read into validated rows or per-line refusals before anything is written.
//!
//! Rules kept here: the CSV dialect is RFC 4180 (comma separated, `"` quoting with `""` for a
//! quote, LF or CRLF line ends); unquoted values are trimmed, quoted ones are taken as they
//! are (an id may hold commas or spaces); a first line `customer_id,provider_customer_id` is a
//! header; blank lines are skipped; each row is judged on its own and numbered by its line, so
//! one bad row never hides the verdict on the others; a customer or Stripe customer named by
//! two rows is refused on the second, so that the file's meaning does not depend on order.

use std::collections::HashMap;

use meterline_schemas::{CustomerId, SchemaError};

use crate::mappings::StripeCustomerId;

/// Most rows in one upload.
pub const MAX_ROWS: usize = 10_000;
/// Largest upload body.
pub const MAX_BYTES: usize = 1 << 20;

/// One line of the file, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    Valid {
        line: usize,
        customer_id: CustomerId,
        provider_customer_id: StripeCustomerId,
    },
    Invalid {
        line: usize,
        /// The raw values, when the line had the right shape, so the answer can name them.
        customer_id: Option<String>,
        provider_customer_id: Option<String>,
        reason: String,
    },
}

/// Why the file as a whole was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("the file is not UTF-8 text")]
    NotUtf8,
    #[error("the file holds no rows")]
    Empty,
    #[error("the file holds more than {MAX_ROWS} rows")]
    TooManyRows,
}

/// One record of the file: its first line and its fields, or why it does not parse.
struct Record {
    line: usize,
    fields: Result<Vec<String>, String>,
}

/// Splits `text` into records (RFC 4180). A quoted field may span lines; the record is
/// numbered by the line it starts on.
fn records(text: &str) -> Vec<Record> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut error: Option<String> = None;
        loop {
            match chars.next() {
                None => {
                    fields.push(finish(field, quoted));
                    break;
                }
                Some('\n') => {
                    line += 1;
                    fields.push(finish(field, quoted));
                    break;
                }
                Some('\r') if chars.peek() == Some(&'\n') => {}
                Some(',') => {
                    fields.push(finish(std::mem::take(&mut field), quoted));
                    quoted = false;
                }
                Some('"') if field.trim().is_empty() && !quoted => {
                    field.clear();
                    quoted = true;
                    // Inside quotes until the closing quote; `""` is one quote.
                    loop {
                        match chars.next() {
                            None => {
                                error.get_or_insert("a quoted value is not closed".into());
                                break;
                            }
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                field.push('"');
                            }
                            Some('"') => break,
                            Some(c) => {
                                if c == '\n' {
                                    line += 1;
                                }
                                field.push(c);
                            }
                        }
                    }
                }
                Some(c) if quoted => {
                    if !c.is_whitespace() {
                        error.get_or_insert(format!("{c:?} after a quoted value"));
                    }
                }
                Some('"') => {
                    error.get_or_insert("a quote inside an unquoted value".into());
                    field.push('"');
                }
                Some(c) => field.push(c),
            }
        }
        let blank = error.is_none() && fields.len() == 1 && fields[0].is_empty();
        if !blank {
            out.push(Record {
                line: start,
                fields: match error {
                    Some(e) => Err(format!("malformed csv: {e}")),
                    None => Ok(fields),
                },
            });
        }
    }
    out
}

fn finish(field: String, quoted: bool) -> String {
    if quoted {
        field
    } else {
        field.trim().to_owned()
    }
}

fn reason(e: SchemaError) -> String {
    match e {
        SchemaError::InvalidValue { field, reason } => format!("{field} {reason}"),
        other => other.to_string(),
    }
}

/// Reads the uploaded file into judged rows.
pub fn parse(body: &[u8]) -> Result<Vec<Row>, FileError> {
    let text = std::str::from_utf8(body).map_err(|_| FileError::NotUtf8)?;
    // A byte order mark, as spreadsheet programs write, is not part of the first value.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = records(text);
    let is_header = |r: &Record| {
        matches!(&r.fields, Ok(f) if f.len() == 2
            && f[0].eq_ignore_ascii_case("customer_id")
            && f[1].eq_ignore_ascii_case("provider_customer_id"))
    };
    if records.first().is_some_and(is_header) {
        records.remove(0);
    }
    if records.is_empty() {
        return Err(FileError::Empty);
    }
    if records.len() > MAX_ROWS {
        return Err(FileError::TooManyRows);
    }
    let mut customers: HashMap<String, usize> = HashMap::new();
    let mut providers: HashMap<String, usize> = HashMap::new();
    Ok(records
        .into_iter()
        .map(|record| {
            let line = record.line;
            let invalid =
                |customer_id: Option<String>, provider: Option<String>, reason| Row::Invalid {
                    line,
                    customer_id,
                    provider_customer_id: provider,
                    reason,
                };
            let fields = match record.fields {
                Ok(fields) => fields,
                Err(e) => return invalid(None, None, e),
            };
            let [customer, provider] = match <[String; 2]>::try_from(fields) {
                Ok(pair) => pair,
                Err(fields) => {
                    return invalid(
                        None,
                        None,
                        format!(
                            "expected 2 values (customer_id,provider_customer_id), found {}",
                            fields.len()
                        ),
                    )
                }
            };
            let parsed = CustomerId::parse(&customer).map_err(reason).and_then(|c| {
                StripeCustomerId::parse(&provider)
                    .map(|p| (c, p))
                    .map_err(reason)
            });
            let (customer_id, provider_customer_id) = match parsed {
                Ok(pair) => pair,
                Err(e) => return invalid(Some(customer), Some(provider), e),
            };
            if let Some(first) = customers.get(customer_id.as_str()) {
                let e = format!("customer_id already appears on line {first}");
                return invalid(Some(customer), Some(provider), e);
            }
            if let Some(first) = providers.get(provider_customer_id.as_str()) {
                let e = format!("provider_customer_id already appears on line {first}");
                return invalid(Some(customer), Some(provider), e);
            }
            customers.insert(customer_id.as_str().to_owned(), line);
            providers.insert(provider_customer_id.as_str().to_owned(), line);
            Row::Valid {
                line,
                customer_id,
                provider_customer_id,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(rows: &[Row]) -> Vec<(usize, bool)> {
        rows.iter()
            .map(|r| match r {
                Row::Valid { line, .. } => (*line, true),
                Row::Invalid { line, .. } => (*line, false),
            })
            .collect()
    }

    fn reason_of(row: &Row) -> &str {
        match row {
            Row::Invalid { reason, .. } => reason,
            Row::Valid { .. } => "",
        }
    }

    #[test]
    fn a_header_blank_lines_and_crlf() {
        let rows =
            parse(b"\xef\xbb\xbfcustomer_id,provider_customer_id\r\nc1,cus_1\r\n\r\n c2 , cus_2\n")
                .unwrap();
        assert_eq!(lines(&rows), [(2, true), (4, true)]);
        let Row::Valid {
            customer_id,
            provider_customer_id,
            ..
        } = &rows[1]
        else {
            panic!("{rows:?}")
        };
        assert_eq!(
            (customer_id.as_str(), provider_customer_id.as_str()),
            ("c2", "cus_2")
        );
    }

    #[test]
    fn quoted_values_keep_commas_quotes_and_spaces() {
        let rows = parse(b"\"acme, inc \"\"eu\"\"\",cus_1\n").unwrap();
        let Row::Valid { customer_id, .. } = &rows[0] else {
            panic!("{rows:?}")
        };
        assert_eq!(customer_id.as_str(), "acme, inc \"eu\"");
    }

    #[test]
    fn each_bad_row_is_refused_on_its_own() {
        let body = b"c1,cus_1\nc2\nc3,sub_3\nc4,cus_4,extra\n\"c5,cus_5\nc6,cus_6\n";
        let rows = parse(body).unwrap();
        assert_eq!(
            lines(&rows),
            [(1, true), (2, false), (3, false), (4, false), (5, false)]
        );
        assert!(reason_of(&rows[1]).contains("found 1"), "{rows:?}");
        assert!(
            reason_of(&rows[2]).contains("provider_customer_id"),
            "{rows:?}"
        );
        assert!(reason_of(&rows[3]).contains("found 3"), "{rows:?}");
        assert!(reason_of(&rows[4]).contains("not closed"), "{rows:?}");
        let rows = parse(b"a\"b,cus_1\n\"x\"y,cus_2\n").unwrap();
        assert!(reason_of(&rows[0]).contains("quote inside"), "{rows:?}");
        assert!(
            reason_of(&rows[1]).contains("after a quoted value"),
            "{rows:?}"
        );
    }

    #[test]
    fn duplicates_are_refused_after_their_first_line() {
        let rows = parse(b"c1,cus_1\nc1,cus_2\nc3,cus_1\n").unwrap();
        assert_eq!(lines(&rows), [(1, true), (2, false), (3, false)]);
        assert_eq!(reason_of(&rows[1]), "customer_id already appears on line 1");
        assert_eq!(
            reason_of(&rows[2]),
            "provider_customer_id already appears on line 1"
        );
    }

    #[test]
    fn whole_file_refusals() {
        assert_eq!(parse(b"\xff\xfe"), Err(FileError::NotUtf8));
        assert_eq!(parse(b""), Err(FileError::Empty));
        assert_eq!(
            parse(b"customer_id,provider_customer_id\n\n"),
            Err(FileError::Empty)
        );
        let many: String = (0..=MAX_ROWS).map(|i| format!("c{i},cus_{i}\n")).collect();
        assert_eq!(parse(many.as_bytes()), Err(FileError::TooManyRows));
    }
}
