//! What an HBONE peer's CONNECT request says, checked before anything acts
//! on it: the target (`authority`, an IPv4 address and port), the client
//! it carries for (`Forwarded: for=`), and the W3C trace context
//! (`traceparent`, `baggage`) that ztunnel peers may send. A peer's bytes
//! are hostile input: every field is bounded and a malformed optional
//! header is dropped, never trusted in part.

use std::net::{Ipv4Addr, SocketAddrV4};

use http::{Method, Request};

pub use crate::observability::spans::TraceParent;

/// A CONNECT request, as far as the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub target: SocketAddrV4,
    /// The first `for=` of `Forwarded` that is an IPv4 address.
    pub forwarded_for: Option<Ipv4Addr>,
    /// `traceparent`, when well formed.
    pub trace: Option<TraceParent>,
    /// `baggage`, when well formed and within the limits.
    pub baggage: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("method {0} is not CONNECT")]
    NotConnect(Method),
    #[error("no authority")]
    NoAuthority,
    #[error("authority {0:?} is not an IPv4 address and port")]
    BadAuthority(String),
}

/// Headers longer than this are ignored (h2 bounds the whole header list;
/// these bound what the agent parses and keeps).
const MAX_HEADER_LEN: usize = 8 * 1024;
/// Baggage members kept at most (W3C allows 64 list members).
const MAX_BAGGAGE_MEMBERS: usize = 64;

impl Connect {
    pub fn parse<B>(request: &Request<B>) -> Result<Self, RequestError> {
        if request.method() != Method::CONNECT {
            return Err(RequestError::NotConnect(request.method().clone()));
        }
        let authority = request
            .uri()
            .authority()
            .ok_or(RequestError::NoAuthority)?
            .as_str();
        let target = authority
            .parse::<SocketAddrV4>()
            .map_err(|_| RequestError::BadAuthority(authority.chars().take(64).collect()))?;
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= MAX_HEADER_LEN)
        };
        Ok(Self {
            target,
            forwarded_for: header("forwarded").and_then(forwarded_for),
            trace: header("traceparent").and_then(|v| TraceParent::parse(v).ok()),
            baggage: header("baggage").and_then(baggage).unwrap_or_default(),
        })
    }
}

/// The first `for=` in a `Forwarded` header that is an IPv4 address.
pub fn forwarded_for(header: &str) -> Option<Ipv4Addr> {
    header.split([';', ',']).find_map(|part| {
        let value = part.trim();
        let value = value
            .get(..4)
            .filter(|key| key.eq_ignore_ascii_case("for="))
            .map(|_| &value[4..])?;
        value.trim_matches('"').parse().ok()
    })
}

/// W3C baggage: `key=value` members separated by commas, properties after
/// `;` dropped. `None` when malformed or past the limits.
pub fn baggage(header: &str) -> Option<Vec<(String, String)>> {
    let mut members = Vec::new();
    for member in header.split(',') {
        let member = member.split(';').next()?.trim();
        if member.is_empty() {
            continue;
        }
        let (key, value) = member.split_once('=')?;
        let (key, value) = (key.trim(), value.trim());
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if key.is_empty() || !key.chars().all(token) || value.chars().any(|c| c.is_control()) {
            return None;
        }
        if members.len() == MAX_BAGGAGE_MEMBERS {
            return None;
        }
        members.push((key.to_owned(), value.to_owned()));
    }
    Some(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn a_well_formed_connect() {
        let connect = Connect::parse(&request(
            Method::CONNECT,
            "10.1.0.2:8080",
            &[
                ("forwarded", "for=10.2.0.3"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("baggage", "user=alice, tenant=a;ttl=3"),
            ],
        ))
        .unwrap();
        assert_eq!(connect.target, "10.1.0.2:8080".parse().unwrap());
        assert_eq!(connect.forwarded_for, Some(Ipv4Addr::new(10, 2, 0, 3)));
        assert_eq!(connect.trace.unwrap().parent_id, 0x00f0_67aa_0ba9_02b7);
        assert_eq!(connect.baggage.len(), 2);
    }

    #[test]
    fn what_is_refused_and_what_is_dropped() {
        assert!(matches!(
            Connect::parse(&request(Method::GET, "10.1.0.2:80", &[])),
            Err(RequestError::NotConnect(_))
        ));
        for authority in ["example.com:80", "10.1.0.2", "[::1]:80", "10.1.0.2:99999"] {
            assert!(
                Connect::parse(&request(Method::CONNECT, authority, &[])).is_err(),
                "{authority}"
            );
        }
        // Optional headers that are malformed are dropped, not fatal.
        let connect = Connect::parse(&request(
            Method::CONNECT,
            "10.1.0.2:80",
            &[
                ("forwarded", "for=unknown;for=\"[2001:db8::1]\""),
                (
                    "traceparent",
                    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ),
                ("baggage", "no value"),
            ],
        ))
        .unwrap();
        assert_eq!(connect.forwarded_for, None);
        assert_eq!(connect.trace, None);
        assert!(connect.baggage.is_empty());
        let long = format!("for=10.2.0.3,{}", "x".repeat(MAX_HEADER_LEN));
        let connect = Connect::parse(&request(
            Method::CONNECT,
            "10.1.0.2:80",
            &[("forwarded", &long)],
        ))
        .unwrap();
        assert_eq!(connect.forwarded_for, None, "an oversize header is ignored");
    }
}
