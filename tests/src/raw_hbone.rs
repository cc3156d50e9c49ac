//! An HBONE client with no agent behind it: TLS with a certificate the
//! test chooses (signed by the mesh's CA), HTTP/2, and requests no agent
//! would send. What a stolen certificate or a hostile peer looks like.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::client::SendRequest;
use mesh_agent::{
    config::KernelTlsMode,
    identity::{CertManager, EmbeddedCa, SpiffeId},
    tls::{KernelTls, TlsFactory},
};

use crate::netns::NetNs;

/// An HTTP/2 connection from `netns` to the HBONE port at `gateway`,
/// authenticated as `client` with a certificate from the CA in `ca_dir`,
/// expecting the server to be `server`. Err: the step that failed.
pub async fn connect(
    netns: &NetNs,
    ca_dir: &Path,
    client: &SpiffeId,
    server: &SpiffeId,
    gateway: SocketAddr,
) -> Result<SendRequest<Bytes>, String> {
    let ca = EmbeddedCa::load_or_create(ca_dir).map_err(|e| format!("the mesh's CA: {e}"))?;
    let certs = CertManager::new(Arc::new(ca), Duration::from_secs(3600));
    let failed = certs.ensure(std::slice::from_ref(client)).await;
    if !failed.is_empty() {
        return Err(format!("no certificate for {client}: {failed:?}"));
    }
    let tls = TlsFactory::new(
        certs,
        &client.trust_domain,
        KernelTls::new(KernelTlsMode::Off),
    )
    .map_err(|e| e.to_string())?;
    let config = tls
        .client(client.clone(), server.clone())
        .map_err(|e| e.to_string())?;
    let tcp = netns
        .run(|| std::net::TcpStream::connect_timeout(&gateway, Duration::from_secs(5)))
        .map_err(|e| format!("connect to {gateway}: {e}"))?;
    tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::IpAddress(gateway.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (sender, connection) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// The status a request gets, or the stream error's reason.
pub async fn answer(
    sender: &mut SendRequest<Bytes>,
    request: http::Request<()>,
) -> Result<u16, String> {
    let mut ready = sender.clone().ready().await.map_err(|e| e.to_string())?;
    let (response, _send) = ready
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

/// A CONNECT to `target`, as an agent sends it.
pub fn connect_request(target: SocketAddr) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .expect("static request parts")
}
