//! The load side of a benchmark's measured pass: `concurrency` clients sharing one counter of
//! work, each timing its own requests, and the HTTP requests they send.
//!
//! Rule kept: a latency runs from just before a request is sent to its answer's body read,
//! and the pass's elapsed time from before the first client starts to after the last one
//! ends; anything but the expected answer fails the run with the start of that answer.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use reqwest::{RequestBuilder, StatusCode};

/// `concurrency` clients, each taking the next index of `0..count` until none is left and
/// keeping the latency `one(index)` measured; the elapsed time of the whole pass and every
/// latency.
pub async fn run_clients<F, Fut>(
    concurrency: usize,
    count: usize,
    one: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Duration>>,
{
    let next = AtomicUsize::new(0);
    let (next, one) = (&next, &one);
    let started = Instant::now();
    let clients = (0..concurrency).map(|_| async move {
        let mut latencies = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= count {
                return anyhow::Ok(latencies);
            }
            latencies.push(one(index).await?);
        }
    });
    let mut all = Vec::with_capacity(count);
    for outcome in futures::future::join_all(clients).await {
        all.extend(outcome?);
    }
    Ok((started.elapsed(), all))
}

/// Sends `request` and reads its whole answer: the latency, the status and the body.
/// `what` names the request when it cannot be sent.
pub async fn send_timed(
    request: RequestBuilder,
    what: &'static str,
) -> anyhow::Result<(Duration, StatusCode, Bytes)> {
    let started = Instant::now();
    let response = request.send().await.context(what)?;
    let status = response.status();
    let answer = response.bytes().await.context("reading the answer")?;
    Ok((started.elapsed(), status, answer))
}

/// The start of an answer, for an error message.
pub fn excerpt(answer: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(&answer[..answer.len().min(2000)])
}

/// Posts one `/v1/events/bulk` body to ingest; anything but 202 fails the run, `which`
/// (` to bulk request 7`, or empty) naming the request in the message.
pub async fn post_bulk(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: Bytes,
    which: &str,
) -> anyhow::Result<Duration> {
    let request = client
        .post(url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    let (elapsed, status, answer) = send_timed(request, "posting a bulk request").await?;
    if status != StatusCode::ACCEPTED {
        bail!("ingest answered {status}{which}: {}", excerpt(&answer));
    }
    Ok(elapsed)
}

/// A client for `concurrency` load clients: one keep-alive connection each, `timeout` per
/// request.
pub fn http_client(concurrency: usize, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(timeout)
        .build()
        .context("building the http client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_is_taken_once() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let taken = std::sync::Mutex::new(Vec::new());
        let (_, latencies) = runtime
            .block_on(run_clients(3, 10, |index| {
                taken.lock().unwrap().push(index);
                async { Ok(Duration::from_millis(1)) }
            }))
            .unwrap();
        let mut taken = taken.into_inner().unwrap();
        taken.sort_unstable();
        assert_eq!(taken, (0..10).collect::<Vec<_>>());
        assert_eq!(latencies.len(), 10);
        assert_eq!(excerpt(&[b'x'; 3000]).len(), 2000);
    }
}
