//! The HTTP client under the ClickHouse client: plain HTTP, or HTTPS (rustls) checking the
//! server's certificate against the Mozilla roots built in or, when `CLICKHOUSE_CA_CERT`
//! names them, only against those certificate authorities (a private CA, a managed service's
//! bundle).
//!
//! The clickhouse crate's own client refuses `https://` unless built with a TLS feature that
//! fixes its roots; this one is the same hyper client with the roots ours to choose.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::ClickhouseSettings;

/// As the clickhouse crate's default: the server closes idle connections after 3 s, and a
/// connection taken from the pool just as the server closes it fails the query.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A client speaking HTTP or HTTPS as its URL says, with the settings' trust roots.
pub(super) fn client(settings: &ClickhouseSettings) -> ::clickhouse::Client {
    let mut http = HttpConnector::new();
    http.set_keepalive(Some(TCP_KEEPALIVE));
    // The TLS layer below takes https:// URLs; the TCP connector must let them through.
    http.enforce_http(false);
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports rustls' default protocol versions")
    .with_root_certificates(roots(settings))
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    ::clickhouse::Client::with_http_client(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector),
    )
}

fn roots(settings: &ClickhouseSettings) -> rustls::RootCertStore {
    match &settings.ca_certificates {
        Some(ca) => {
            let mut store = rustls::RootCertStore::empty();
            // Each was parsed at start; one the TLS library cannot use is left out and the
            // server then fails verification with a certificate error naming the cause.
            let (_, ignored) = store.add_parsable_certificates(ca.certificates.iter().cloned());
            if ignored > 0 {
                tracing::warn!(
                    path = %ca.path,
                    ignored,
                    "some certificates of CLICKHOUSE_CA_CERT cannot be used as trust roots"
                );
            }
            store
        }
        None => rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    }
}
