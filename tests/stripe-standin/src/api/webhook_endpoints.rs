//! `/v1/webhook_endpoints`: create (the only answer that carries the `whsec_` signing secret),
//! retrieve and list. Secret rolls are a control endpoint (`/_standin/webhook_endpoints/...`).

use serde_json::Value;

use super::params::Params;
use super::{paginate, Ctx};
use crate::error::Error;
use crate::state::WebhookEndpoint;

pub fn create(ctx: &Ctx, params: &Params) -> Result<Value, Error> {
    params.allow(&[
        "url",
        "enabled_events",
        "description",
        "metadata",
        "api_version",
        "connect",
    ])?;
    let url = params.required_str("url")?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Error::invalid("url_invalid", "Invalid URL", Some("url")));
    }
    let enabled_events = params
        .str_list("enabled_events")?
        .filter(|e| !e.is_empty())
        .ok_or_else(|| Error::missing("enabled_events"))?;
    let metadata = params.metadata()?.unwrap_or_default();
    let mut inner = ctx.app.lock();
    let id = inner.id("we");
    let secret = format!("whsec_{}", uuid::Uuid::new_v4().simple());
    let endpoint = WebhookEndpoint {
        id,
        created: inner.now(),
        url: url.to_string(),
        enabled_events,
        description: params.str("description")?.map(str::to_string),
        metadata,
        secret,
        previous_secret: None,
    };
    let body = endpoint.to_json(ctx.livemode, true);
    inner
        .accounts
        .get_mut(&ctx.key)
        .ok_or_else(|| Error::unauthorized(None, "account removed"))?
        .webhook_endpoints
        .push(endpoint);
    Ok(body)
}

pub fn retrieve(ctx: &Ctx, params: &Params, id: &str) -> Result<Value, Error> {
    params.allow(&[])?;
    let inner = ctx.app.lock();
    inner
        .accounts
        .get(&ctx.key)
        .and_then(|a| a.webhook_endpoints.iter().find(|e| e.id == id))
        .map(|e| e.to_json(ctx.livemode, false))
        .ok_or_else(|| Error::no_such("webhook endpoint", id, "id"))
}

pub fn list(ctx: &Ctx, params: &Params) -> Result<Value, Error> {
    params.allow(&["limit", "starting_after", "ending_before"])?;
    let inner = ctx.app.lock();
    let items = inner
        .accounts
        .get(&ctx.key)
        .map(|a| {
            a.webhook_endpoints
                .iter()
                .rev()
                .map(|e| (e.id.clone(), e.to_json(ctx.livemode, false)))
                .collect()
        })
        .unwrap_or_default();
    paginate(params, "/v1/webhook_endpoints", items)
}
