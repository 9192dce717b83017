//! Driving the local Stripe stand-in from a test: accounts, customers, meters, webhook
//! endpoints, faults, the clock, and inspection of what it accepted.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// A stand-in serving in this test process.
pub struct Standin {
    pub base: String,
    pub key: String,
    http: reqwest::Client,
    _handle: stripe_standin::StandinHandle,
}

impl Standin {
    /// Starts one on a free port with the account `sk_test_standin` at `rate_limit`
    /// requests per second.
    pub async fn start(rate_limit: u32) -> Standin {
        let (addr, handle) = stripe_standin::spawn(stripe_standin::Config::for_tests())
            .await
            .expect("starting the stripe stand-in");
        let standin = Standin {
            base: format!("http://{addr}"),
            key: "sk_test_standin".into(),
            http: reqwest::Client::new(),
            _handle: handle,
        };
        standin
            .control(
                "accounts",
                json!({"secret_key": standin.key, "rate_limit": rate_limit}),
            )
            .await;
        standin
    }

    /// POSTs a control request (`/_standin/<path>`).
    pub async fn control(&self, path: &str, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/_standin/{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("the stand-in answers");
        assert!(
            response.status().is_success(),
            "control {path}: {}",
            response.status()
        );
        response.json().await.expect("control answers JSON")
    }

    /// POSTs a Stripe API form request with the account's key, waiting out the account's
    /// rate limit (429) as a well-behaved client would.
    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Value {
        self.call("POST", path, || {
            self.http.post(format!("{}{path}", self.base)).form(form)
        })
        .await
    }

    /// Sends the request `build` makes with the account's key until it is not refused with
    /// 429 (the account's rate limit or an injected fault); its JSON body, asserting success.
    async fn call(
        &self,
        method: &str,
        path: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Value {
        loop {
            let response = build()
                .bearer_auth(&self.key)
                .send()
                .await
                .expect("the stand-in answers");
            let status = response.status();
            let body: Value = response.json().await.expect("stripe answers JSON");
            if status.as_u16() == 429 {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            assert!(status.is_success(), "{method} {path}: {status} {body}");
            return body;
        }
    }

    /// A customer whose `metadata[external_id]` is `external_id`; its `cus_...` id.
    pub async fn customer(&self, external_id: &str) -> String {
        let body = self
            .post("/v1/customers", &[("metadata[external_id]", external_id)])
            .await;
        body["id"].as_str().expect("a customer id").to_owned()
    }

    /// A subscription of `customer` (`cus_...`) whose metered price bills `meter`
    /// (`mtr_...`), in its current period `[start, end)` (Unix seconds): Stripe sends
    /// `customer.subscription.created` to the endpoints that want it. Its `sub_...` id.
    pub async fn subscription(
        &self,
        customer: &str,
        meter: &str,
        (start, end): (i64, i64),
    ) -> String {
        let path = format!("accounts/{}/subscriptions", self.key);
        let body = json!({"customer": customer, "meter": meter,
                          "current_period_start": start, "current_period_end": end});
        let created = self.control(&path, body).await;
        created["id"]
            .as_str()
            .expect("a subscription id")
            .to_owned()
    }

    /// Finalizes the invoice of `subscription` for the usage of `[start, end)` (Unix
    /// seconds): Stripe sends `invoice.finalized`.
    pub async fn finalize_invoice(&self, subscription: &str, (start, end): (i64, i64)) {
        let path = format!(
            "accounts/{}/subscriptions/{subscription}/finalize_invoice",
            self.key
        );
        self.control(&path, json!({"period_start": start, "period_end": end}))
            .await;
    }

    /// A `sum` meter for `event_name`; its `mtr_...` id.
    pub async fn sum_meter(&self, event_name: &str) -> String {
        self.meter(event_name, "sum").await
    }

    /// A meter for `event_name` with `formula` (`sum`, `count`, `last`); its `mtr_...` id.
    pub async fn meter(&self, event_name: &str, formula: &str) -> String {
        let body = self
            .post(
                "/v1/billing/meters",
                &[
                    ("display_name", event_name),
                    ("event_name", event_name),
                    ("default_aggregation[formula]", formula),
                ],
            )
            .await;
        body["id"].as_str().expect("a meter id").to_owned()
    }

    /// GETs a Stripe API route with the account's key, waiting out 429s (the account's rate
    /// limit or an injected fault) as a well-behaved client would.
    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        self.call("GET", path, || {
            self.http.get(format!("{}{path}", self.base)).query(query)
        })
        .await
    }

    /// The aggregated value of meter `meter_id` (`mtr_...`) for `customer` (`cus_...`) over
    /// `[start, end)` (Unix seconds, minute-aligned), from Stripe's meter event summaries.
    pub async fn summarised_total(
        &self,
        meter_id: &str,
        customer: &str,
        start: i64,
        end: i64,
    ) -> f64 {
        let (start, end) = (start.to_string(), end.to_string());
        let body = self
            .get(
                &format!("/v1/billing/meters/{meter_id}/event_summaries"),
                &[
                    ("customer", customer),
                    ("start_time", &start),
                    ("end_time", &end),
                ],
            )
            .await;
        let summaries = body["data"].as_array().expect("a list of summaries");
        assert_eq!(summaries.len(), 1, "one summary without grouping: {body}");
        summaries[0]["aggregated_value"]
            .as_f64()
            .expect("an aggregated value")
    }

    /// Faults applied so far, by kind (`too_many_requests`, `server_error`, `slow`,
    /// `dropped`).
    pub async fn faults_injected(&self) -> Value {
        self.http
            .get(format!("{}/_standin/faults/injected", self.base))
            .send()
            .await
            .expect("the stand-in answers")
            .json()
            .await
            .expect("the fault counts are JSON")
    }

    pub async fn inspect(&self) -> Value {
        self.http
            .get(format!(
                "{}/_standin/accounts/{}/inspect",
                self.base, self.key
            ))
            .send()
            .await
            .expect("the stand-in answers")
            .json()
            .await
            .expect("inspect answers JSON")
    }

    /// Counted totals per (`cus_...`, event_name).
    pub async fn totals(&self) -> BTreeMap<(String, String), f64> {
        let inspect = self.inspect().await;
        inspect["totals"]
            .as_array()
            .map(|totals| {
                totals
                    .iter()
                    .map(|t| {
                        (
                            (
                                t["customer"].as_str().unwrap_or_default().to_owned(),
                                t["event_name"].as_str().unwrap_or_default().to_owned(),
                            ),
                            t["total"].as_f64().unwrap_or(f64::NAN),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}
