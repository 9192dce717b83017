//! `GET /v1/subscriptions`: the account's subscriptions (made through test control), newest
//! first, as Stripe lists them: `customer` narrows to one customer, and without
//! `status=all` (or `status=canceled`) canceled ones are left out.

use serde_json::Value;

use super::params::Params;
use super::{paginate, Ctx};
use crate::error::Error;

pub fn list(ctx: &Ctx, params: &Params) -> Result<Value, Error> {
    params.allow(&[
        "limit",
        "starting_after",
        "ending_before",
        "customer",
        "status",
    ])?;
    let customer = params.str("customer")?;
    let status = params.str("status")?;
    let inner = ctx.app.lock();
    let items = inner
        .accounts
        .get(&ctx.key)
        .map(|a| {
            a.subscriptions
                .iter()
                .rev()
                .filter(|s| customer.is_none_or(|c| s["customer"] == c))
                .filter(|s| match status {
                    Some("all") => true,
                    Some(wanted) => s["status"] == wanted,
                    None => s["status"] != "canceled",
                })
                .map(|s| (s["id"].as_str().unwrap_or_default().to_owned(), s.clone()))
                .collect()
        })
        .unwrap_or_default();
    paginate(params, "/v1/subscriptions", items)
}
