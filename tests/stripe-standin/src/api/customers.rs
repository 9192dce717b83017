//! `/v1/customers`: create, retrieve, update, delete and list (newest first, Stripe's paging),
//! each change published as `customer.created` / `customer.updated` / `customer.deleted`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::params::Params;
use super::{paginate, Ctx};
use crate::error::Error;
use crate::state::Customer;
use crate::webhooks::publish_snapshot;

const FIELDS: &[&str] = &["email", "name", "description", "phone", "metadata"];

pub fn create(ctx: &Ctx, params: &Params) -> Result<Value, Error> {
    params.allow(FIELDS)?;
    let metadata = params.metadata()?.unwrap_or_default();
    let mut inner = ctx.app.lock();
    let id = inner.id("cus");
    let customer = Customer {
        id,
        created: inner.now(),
        email: params.str("email")?.map(str::to_string),
        name: params.str("name")?.map(str::to_string),
        description: params.str("description")?.map(str::to_string),
        phone: params.str("phone")?.map(str::to_string),
        // An empty value unsets a key; on create that means "not set".
        metadata: metadata
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect(),
        deleted: false,
    };
    let body = customer.to_json(ctx.livemode);
    account_mut(&mut inner, &ctx.key)?.customers.push(customer);
    publish_snapshot(
        &ctx.app,
        &mut inner,
        &ctx.key,
        "customer.created",
        body.clone(),
        None,
    );
    Ok(body)
}

pub fn retrieve(ctx: &Ctx, params: &Params, id: &str) -> Result<Value, Error> {
    params.allow(&[])?;
    let inner = ctx.app.lock();
    let account = inner
        .accounts
        .get(&ctx.key)
        .ok_or_else(|| Error::no_such("customer", id, "id"))?;
    match account.customers.iter().find(|c| c.id == id) {
        // Stripe still answers for a deleted customer, with a stub.
        Some(c) if c.deleted => Ok(json!({ "id": c.id, "object": "customer", "deleted": true })),
        Some(c) => Ok(c.to_json(ctx.livemode)),
        None => Err(Error::no_such("customer", id, "id")),
    }
}

pub fn update(ctx: &Ctx, params: &Params, id: &str) -> Result<Value, Error> {
    params.allow(FIELDS)?;
    let metadata = params.metadata()?;
    let mut inner = ctx.app.lock();
    let livemode = ctx.livemode;
    let account = account_mut(&mut inner, &ctx.key)?;
    let customer = account
        .customers
        .iter_mut()
        .find(|c| c.id == id && !c.deleted)
        .ok_or_else(|| Error::no_such("customer", id, "id"))?;
    let before = customer.to_json(livemode);
    for (field, slot) in [
        ("email", &mut customer.email),
        ("name", &mut customer.name),
        ("description", &mut customer.description),
        ("phone", &mut customer.phone),
    ] {
        if let Some(v) = params.str(field)? {
            // Stripe unsets a field sent as an empty string.
            *slot = Some(v.to_string()).filter(|v| !v.is_empty());
        }
    }
    if let Some(metadata) = metadata {
        for (k, v) in metadata {
            if v.is_empty() {
                customer.metadata.remove(&k);
            } else {
                customer.metadata.insert(k, v);
            }
        }
    }
    let after = customer.to_json(livemode);
    let previous = changed_fields(&before, &after);
    if !previous.is_empty() {
        publish_snapshot(
            &ctx.app,
            &mut inner,
            &ctx.key,
            "customer.updated",
            after.clone(),
            Some(Value::Object(previous.into_iter().collect())),
        );
    }
    Ok(after)
}

pub fn delete(ctx: &Ctx, params: &Params, id: &str) -> Result<Value, Error> {
    params.allow(&[])?;
    let mut inner = ctx.app.lock();
    let account = account_mut(&mut inner, &ctx.key)?;
    let customer = account
        .customers
        .iter_mut()
        .find(|c| c.id == id && !c.deleted)
        .ok_or_else(|| Error::no_such("customer", id, "id"))?;
    customer.deleted = true;
    let object = customer.to_json(ctx.livemode);
    publish_snapshot(
        &ctx.app,
        &mut inner,
        &ctx.key,
        "customer.deleted",
        object,
        None,
    );
    Ok(json!({ "id": id, "object": "customer", "deleted": true }))
}

pub fn list(ctx: &Ctx, params: &Params) -> Result<Value, Error> {
    params.allow(&["limit", "starting_after", "ending_before", "email"])?;
    let email = params.str("email")?;
    let inner = ctx.app.lock();
    let items = inner
        .accounts
        .get(&ctx.key)
        .map(|a| {
            a.customers
                .iter()
                .rev()
                .filter(|c| !c.deleted)
                .filter(|c| email.is_none() || c.email.as_deref() == email)
                .map(|c| (c.id.clone(), c.to_json(ctx.livemode)))
                .collect()
        })
        .unwrap_or_default();
    paginate(params, "/v1/customers", items)
}

fn account_mut<'a>(
    inner: &'a mut crate::state::Inner,
    key: &str,
) -> Result<&'a mut crate::state::Account, Error> {
    inner
        .accounts
        .get_mut(key)
        .ok_or_else(|| Error::unauthorized(None, "account removed"))
}

/// Previous values of the top-level fields that changed (Stripe's `previous_attributes`).
fn changed_fields(before: &Value, after: &Value) -> BTreeMap<String, Value> {
    let (Some(b), Some(a)) = (before.as_object(), after.as_object()) else {
        return BTreeMap::new();
    };
    b.iter()
        .filter(|(k, v)| a.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
