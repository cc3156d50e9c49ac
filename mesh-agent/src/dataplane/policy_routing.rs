//! The node routing that makes steered packets local: packets the tc program
//! assigned to an agent socket carry the steer mark, and
//!
//! ```text
//! ip rule add fwmark 0x200/0xf00 lookup 100 pref 1000
//! ip route add local 0.0.0.0/0 dev lo table 100
//! ```
//!
//! deliver them locally instead of forwarding them (without it the kernel
//! drops an assigned SYN in the forward path). Installed over netlink in the
//! agent's network namespace, removed on exit and by `cleanup`.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use mesh_common::{STEER_MARK, STEER_MARK_MASK, STEER_ROUTE_TABLE};
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    packet_route::{
        route::{RouteMessage, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute},
    },
};

/// Priority of the steer rule: before the main table (32766).
pub const STEER_RULE_PRIORITY: u32 = 1000;

const EEXIST: i32 = libc::EEXIST;
const ENOENT: i32 = libc::ENOENT;
const ESRCH: i32 = libc::ESRCH;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: &'static str,
        source: rtnetlink::Error,
    },
}

fn connect() -> Result<Handle, RoutingError> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    Ok(handle)
}

fn code(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(-message.raw_code()),
        _ => None,
    }
}

fn local_route() -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .table_id(STEER_ROUTE_TABLE)
        // ifindex 1 is always the namespace's loopback.
        .output_interface(1)
        .build()
}

/// Installs the rule and the route; already present is fine.
pub async fn install() -> Result<(), RoutingError> {
    let handle = connect()?;
    let mut rule = handle
        .rule()
        .add()
        .v4()
        .fw_mark(STEER_MARK)
        .table_id(STEER_ROUTE_TABLE)
        .priority(STEER_RULE_PRIORITY)
        .action(RuleAction::ToTable);
    rule.message_mut()
        .attributes
        .push(RuleAttribute::FwMask(STEER_MARK_MASK));
    tolerate(rule.execute().await, &[EEXIST], "adding the steer rule")?;
    let route = handle.route().add(local_route()).execute().await;
    tolerate(route, &[EEXIST], "adding the local route")
}

/// Removes the rule and the route; already absent is fine.
pub async fn remove() -> Result<(), RoutingError> {
    let handle = connect()?;
    let rules: Vec<_> = handle
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .map_err(|source| RoutingError::Netlink {
            what: "listing rules",
            source,
        })?;
    for rule in rules {
        let ours = rule
            .attributes
            .contains(&RuleAttribute::Priority(STEER_RULE_PRIORITY))
            && rule.attributes.contains(&RuleAttribute::FwMark(STEER_MARK));
        if ours {
            let deleted = handle.rule().del(rule).execute().await;
            tolerate(deleted, &[ENOENT, ESRCH], "removing the steer rule")?;
        }
    }
    let deleted = handle.route().del(local_route()).execute().await;
    tolerate(deleted, &[ENOENT, ESRCH], "removing the local route")
}

/// Ok unless the request failed with an errno other than the `benign` ones.
fn tolerate(
    result: Result<(), rtnetlink::Error>,
    benign: &[i32],
    what: &'static str,
) -> Result<(), RoutingError> {
    match result {
        Err(source) if !code(&source).is_some_and(|c| benign.contains(&c)) => {
            Err(RoutingError::Netlink { what, source })
        }
        _ => Ok(()),
    }
}
