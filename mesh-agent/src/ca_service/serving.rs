//! The CA service's TLS: a serving certificate its own CA signs for the
//! names clients reach it by, TLS 1.3 only, no client certificates
//! (callers prove who they are with their token). Handshakes run beside
//! the accept loop, bounded in number and in time, so a slow or silent
//! client holds nothing but its own slot.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use rcgen::KeyPair;
use rustls::{ServerConfig, pki_types::PrivateKeyDer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use super::Settings;
use crate::identity::EmbeddedCa;

/// Handshakes in progress at once; more connections wait in the backlog.
const MAX_HANDSHAKES: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The serving certificate's lifetime; a restart issues a new one.
const SERVING_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// An accepted, handshaken connection.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    local: Option<SocketAddr>,
    peer: SocketAddr,
}

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.peer),
        }
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The TLS configuration: a fresh key, certified by `ca` for `names`.
pub fn server_config(ca: &EmbeddedCa, names: &[String]) -> anyhow::Result<ServerConfig> {
    let key = KeyPair::generate()?;
    let issued = ca.sign_server(names, &key.public_key_der(), SERVING_LIFETIME)?;
    let mut config = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            issued.chain,
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Binds the service's port and yields its handshaken connections.
pub async fn incoming(
    settings: &Settings,
    ca: &EmbeddedCa,
) -> anyhow::Result<impl Stream<Item = std::io::Result<TlsConnection>> + use<>> {
    let acceptor = TlsAcceptor::from(Arc::new(server_config(ca, &settings.serving_names)?));
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", settings.listen))?;
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(accept(listener, acceptor, sender));
    Ok(futures::stream::unfold(receiver, |mut receiver| async {
        let connection = receiver.recv().await?;
        Some((Ok(connection), receiver))
    }))
}

async fn accept(listener: TcpListener, acceptor: TlsAcceptor, sender: mpsc::Sender<TlsConnection>) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "CA service accept failed");
                // EMFILE and the like: do not spin on them.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, sender) = (acceptor.clone(), sender.clone());
        tokio::spawn(async move {
            let local = tcp.local_addr().ok();
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    drop(slot);
                    let _ = sender
                        .send(TlsConnection {
                            stream,
                            local,
                            peer,
                        })
                        .await;
                }
                Ok(Err(error)) => debug!(%peer, %error, "CA service TLS handshake failed"),
                Err(_) => debug!(%peer, "CA service TLS handshake timed out"),
            }
        });
    }
}
