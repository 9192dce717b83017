//! The optional allow-list of source networks (`WEBHOOK_ALLOWED_SOURCES`), and which address
//! a delivery comes from when it passed through trusted proxies (`WEBHOOK_TRUSTED_PROXIES`).
//!
//! Rules kept here:
//! - Off unless configured. When on, a delivery from outside the listed networks is refused
//!   with 403 `source_not_allowed` before anything else happens: no secret is looked up, no
//!   body is read, nothing is published or recorded.
//! - `X-Forwarded-For` is read only when the TCP peer is a trusted proxy: anyone else can write
//!   anything in it. Then the source is the RIGHT-MOST address of the header that is not itself
//!   a trusted proxy. Each proxy appends the address it received the request from, so the
//!   entries right of (after) the first untrusted one were written by our own proxies, and
//!   everything left of it was written by the client and can be forged. When every entry is
//!   a trusted proxy the source is the left-most one; with no header, the peer itself.
//! - An entry that is not an IP address (optionally with a port) stops the walk and the
//!   delivery is refused: we cannot tell who sent it. Several `X-Forwarded-For` headers are
//!   read as one list, in order (RFC 9110 §5.3).
//! - IPv4 addresses seen as IPv4-mapped IPv6 (`::ffff:a.b.c.d`, from a dual-stack socket)
//!   are compared as IPv4.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;

use crate::error::WebhookError;
use crate::metrics;

pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// A list of networks, parsed from `a.b.c.d/len, x::/len, a.b.c.d` (a bare address is a
/// network of one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Networks(Vec<IpNet>);

impl Networks {
    pub fn parse(text: &str) -> Result<Self, String> {
        let networks = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| format!("{entry:?} is not a CIDR network or an IP address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if networks.is_empty() {
            return Err("lists no network".into());
        }
        Ok(Self(networks))
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        self.0.iter().any(|net| net.contains(&address))
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; every other address unchanged.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Who may deliver webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePolicy {
    /// `WEBHOOK_ALLOWED_SOURCES`: the networks deliveries may come from.
    pub allowed: Networks,
    /// `WEBHOOK_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` is believed; none by default.
    pub trusted_proxies: Option<Networks>,
}

/// The source of a delivery could not be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableForwardedFor;

impl SourcePolicy {
    /// The address the delivery comes from: `peer`, or, when `peer` is a trusted proxy, the
    /// right-most untrusted entry of `X-Forwarded-For` (see the module rules).
    pub fn source(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
    ) -> Result<IpAddr, UnreadableForwardedFor> {
        let peer = canonical(peer);
        let Some(trusted) = &self.trusted_proxies else {
            return Ok(peer);
        };
        if !trusted.contains(peer) {
            return Ok(peer);
        }
        let mut entries = Vec::new();
        for value in headers.get_all(FORWARDED_FOR) {
            let text = value.to_str().map_err(|_| UnreadableForwardedFor)?;
            entries.extend(text.split(',').map(str::trim));
        }
        let mut source = peer;
        for entry in entries.iter().rev() {
            source = parse_hop(entry).ok_or(UnreadableForwardedFor)?;
            if !trusted.contains(source) {
                break;
            }
        }
        Ok(source)
    }

    /// Whether a delivery from `peer` with these headers may go on.
    pub fn allows(&self, peer: IpAddr, headers: &HeaderMap) -> bool {
        self.source(peer, headers)
            .map(|source| self.allowed.contains(source))
            .unwrap_or(false)
    }
}

/// One `X-Forwarded-For` entry: `a.b.c.d`, `a.b.c.d:port`, `x::y` or `[x::y]:port`.
fn parse_hop(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(canonical)
}

/// The middleware of the webhook route: refuses deliveries from outside the allow-list.
/// Without a peer address (no connection info, as in router tests) it refuses too: an
/// allow-list that cannot be checked must not let everything through.
pub async fn enforce(State(policy): State<SourcePolicy>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    match peer {
        Some(peer) if policy.allows(peer, request.headers()) => next.run(request).await,
        _ => {
            let error = WebhookError::SourceNotAllowed;
            metrics::refused(&error);
            tracing::info!(peer = ?peer, code = error.code(), "webhook delivery refused");
            error.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn policy(allowed: &str, trusted: Option<&str>) -> SourcePolicy {
        SourcePolicy {
            allowed: Networks::parse(allowed).unwrap(),
            trusted_proxies: trusted.map(|t| Networks::parse(t).unwrap()),
        }
    }

    #[test]
    fn networks_parse_cidrs_and_bare_addresses() {
        let n = Networks::parse(" 3.18.12.63 , 10.0.0.0/8, 2001:db8::/32").unwrap();
        assert!(n.contains(ip("3.18.12.63")));
        assert!(!n.contains(ip("3.18.12.64")));
        assert!(n.contains(ip("10.200.1.1")));
        assert!(n.contains(ip("2001:db8::1")));
        assert!(
            n.contains(ip("::ffff:10.1.2.3")),
            "ipv4-mapped compares as ipv4"
        );
        // Host bits set are truncated to the network, as routers read it.
        assert!(Networks::parse("10.1.2.3/8")
            .unwrap()
            .contains(ip("10.9.9.9")));
        for bad in ["", " , ", "10.0.0.0/33", "example.com", "10.0.0.0/8;"] {
            assert!(Networks::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_header_is_ignored_unless_the_peer_is_a_trusted_proxy() {
        let untrusting = policy("10.0.0.0/8", None);
        let forged = headers(&["10.1.1.1"]);
        assert_eq!(
            untrusting.source(ip("192.0.2.7"), &forged),
            Ok(ip("192.0.2.7"))
        );
        assert!(!untrusting.allows(ip("192.0.2.7"), &forged));

        let trusting = policy("10.0.0.0/8", Some("172.16.0.0/12"));
        // A peer that is not one of our proxies: its header is ignored too.
        assert_eq!(
            trusting.source(ip("192.0.2.7"), &forged),
            Ok(ip("192.0.2.7"))
        );
        assert!(!trusting.allows(ip("192.0.2.7"), &forged));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_source() {
        let p = policy("10.0.0.0/8", Some("172.16.0.0/12"));
        let proxy = ip("172.16.0.5");
        // Client 10.1.1.1 -> proxy: allowed.
        assert_eq!(p.source(proxy, &headers(&["10.1.1.1"])), Ok(ip("10.1.1.1")));
        // Through two of our proxies.
        assert_eq!(
            p.source(proxy, &headers(&["10.1.1.1, 172.16.0.9"])),
            Ok(ip("10.1.1.1"))
        );
        // A client forging an allowed address in front of its own: the proxy appended the
        // real one, which is what counts.
        let forged = headers(&["10.1.1.1, 198.51.100.4"]);
        assert_eq!(p.source(proxy, &forged), Ok(ip("198.51.100.4")));
        assert!(!p.allows(proxy, &forged));
        // Several headers are one list, in order.
        assert_eq!(
            p.source(proxy, &headers(&["198.51.100.4", "10.1.1.1"])),
            Ok(ip("10.1.1.1"))
        );
        // Ports and brackets.
        assert_eq!(
            p.source(proxy, &headers(&["10.1.1.1:4711"])),
            Ok(ip("10.1.1.1"))
        );
        assert_eq!(
            p.source(proxy, &headers(&["[2001:db8::1]:443"])),
            Ok(ip("2001:db8::1"))
        );
        // Every hop trusted: the left-most; no header: the proxy itself.
        assert_eq!(
            p.source(proxy, &headers(&["172.16.0.1, 172.16.0.2"])),
            Ok(ip("172.16.0.1"))
        );
        assert_eq!(p.source(proxy, &HeaderMap::new()), Ok(proxy));
    }

    #[test]
    fn an_unreadable_entry_refuses_the_delivery() {
        let p = policy("10.0.0.0/8", Some("172.16.0.0/12"));
        let proxy = ip("172.16.0.5");
        for bad in ["unknown", "10.1.1.1, , 172.16.0.9", "10.1.1.1, garbage"] {
            assert_eq!(
                p.source(proxy, &headers(&[bad])),
                Err(UnreadableForwardedFor),
                "{bad}"
            );
            assert!(!p.allows(proxy, &headers(&[bad])));
        }
        // Garbage left of the right-most untrusted hop is never read.
        assert_eq!(
            p.source(proxy, &headers(&["garbage, 10.1.1.1"])),
            Ok(ip("10.1.1.1"))
        );
    }
}
