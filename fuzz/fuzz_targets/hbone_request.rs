//! A peer's CONNECT request: method, authority and headers as h2 would
//! hand them over. Parsing never panics, and what it accepts is exactly an
//! IPv4 address and port.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesh_agent::hbone::request::{Connect, TraceParent, baggage, forwarded_for};

#[derive(Arbitrary, Debug)]
struct Input {
    connect: bool,
    authority: String,
    headers: Vec<(u8, String)>,
}

const NAMES: [&str; 4] = ["forwarded", "traceparent", "baggage", "x-other"];

fuzz_target!(|input: Input| {
    let method = if input.connect { "CONNECT" } else { "GET" };
    let mut builder = http::Request::builder().method(method).uri(input.authority.as_str());
    for (name, value) in &input.headers {
        builder = builder.header(NAMES[*name as usize % NAMES.len()], value.as_str());
        // The raw parsers see every value, valid header or not.
        let _ = forwarded_for(value);
        let _ = TraceParent::parse(value);
        let _ = baggage(value);
    }
    // The http crate refuses what no h2 peer could send; the rest is ours.
    let Ok(request) = builder.body(()) else {
        return;
    };
    if let Ok(connect) = Connect::parse(&request) {
        assert!(input.connect);
        assert_eq!(
            connect.target.to_string().parse::<std::net::SocketAddrV4>().ok(),
            Some(connect.target)
        );
        assert!(connect.baggage.len() <= 64);
    }
});
