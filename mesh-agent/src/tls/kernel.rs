//! Kernel TLS (kTLS): after rustls's handshake, the record keys go to the
//! socket and the kernel encrypts and decrypts in place, so payload is no
//! longer copied and ciphered by the agent's TLS layer (one pass over each
//! byte in each direction fewer, and no rustls buffers per connection).
//!
//! A probe at start (loopback sockets, throw-away keys) finds which
//! ciphers the kernel takes and whether it takes new keys on a live
//! socket; a connection's secrets leave rustls only when the kernel will
//! accept them, so a kernel without the `tls` module simply leaves every
//! connection on rustls.
//!
//! What rustls did and this module now does over the kernel:
//! - Post-handshake messages arrive as control records (`recvmsg` with
//!   the record type). Session tickets are ignored (the agent never
//!   resumes). A peer's KeyUpdate moves the receiving traffic secret on
//!   (HKDF-Expand-Label "traffic upd", RFC 8446 7.2; the handshake's
//!   secrets come from rustls's key-log hook, kept in memory only and
//!   wiped when replaced) and gives the kernel the new keys; when the peer
//!   asks, our sending keys follow. rustls peers, ztunnel included, send a
//!   KeyUpdate at AES-GCM's confidentiality limit (2^24 records with
//!   AES-128, 2^23 with AES-256): hours of small RPCs on a pooled
//!   connection.
//! - The sending side counts its records and sends a KeyUpdate at the
//!   same limit, as rustls would.
//! - Kernels that cannot take new keys (before the TLS 1.3 rekey support)
//!   are used only with `hbone.kernel_tls: on`; there a peer's KeyUpdate
//!   ends the connection with an error naming it, and it is counted.
//! - Alerts arrive the same way: close_notify ends the stream, any other
//!   alert is an error naming it.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use rustls::{CommonState, ConnectionTrafficSecrets, ProtocolVersion};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, info};

use super::record_bounded::RecordBounded;
use crate::{config::KernelTlsMode, locks::lock};

/// A TLS stream over one TCP connection, the handshake done by rustls.
pub type HandshakenStream = tokio_rustls::TlsStream<RecordBounded<TcpStream>>;

/// TLS record content types (RFC 8446, section 5.1).
const RECORD_ALERT: u8 = 21;
const RECORD_HANDSHAKE: u8 = 22;
/// Handshake message types that may follow the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// The largest plaintext a record carries, so one control record fits.
const MAX_RECORD: usize = 16 * 1024 + 256;

/// Counters for `/stats` and metrics.
#[derive(Debug, Default)]
pub struct KernelTlsStats {
    /// Connections whose records the kernel ciphers.
    pub connections: AtomicU64,
    /// Connections that stayed on rustls although the setting allowed the
    /// kernel (no `tls` module, or a suite the kernel lacks).
    pub fallbacks: AtomicU64,
    /// Session tickets received and dropped.
    pub tickets_ignored: AtomicU64,
    /// Connections ended by a peer's KeyUpdate that this kernel cannot
    /// apply (see the module comment).
    pub key_updates_refused: AtomicU64,
    /// Peers' KeyUpdates applied to the kernel's receiving keys.
    pub key_updates_received: AtomicU64,
    /// KeyUpdates sent (at the confidentiality limit, or asked by a peer).
    pub key_updates_sent: AtomicU64,
}

impl KernelTlsStats {
    pub fn snapshot(&self) -> serde_json::Value {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        serde_json::json!({
            "connections": get(&self.connections),
            "fallbacks": get(&self.fallbacks),
            "tickets_ignored": get(&self.tickets_ignored),
            "key_updates_refused": get(&self.key_updates_refused),
            "key_updates_received": get(&self.key_updates_received),
            "key_updates_sent": get(&self.key_updates_sent),
        })
    }
}

/// Whether and how connections hand their records to the kernel.
#[derive(Debug)]
pub struct KernelTls {
    /// Ciphers the kernel took in a probe at start; empty when the setting
    /// is off or the kernel has no TLS.
    ciphers: Vec<Cipher>,
    /// Whether the kernel takes new keys on a live socket, so KeyUpdates
    /// can be applied both ways.
    rekey: bool,
    /// Records sent under one key before the stream refreshes it; `None`:
    /// the cipher suite's confidentiality limit.
    record_limit: Option<u64>,
    pub stats: Arc<KernelTlsStats>,
}

/// The TLS 1.3 AEADs the agent negotiates, as the kernel names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    fn of_suite(suite: rustls::CipherSuite) -> Option<Self> {
        match suite {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(Cipher::Aes128Gcm),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(Cipher::Aes256Gcm),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(Cipher::Chacha20Poly1305),
            _ => None,
        }
    }

    fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
        }
    }
}

/// Records the handshake's application traffic secrets of one connection
/// (rustls's `KeyLog` hook, in memory only, taken at the hand-over).
#[derive(Default)]
pub struct SecretCapture {
    client: Mutex<Vec<u8>>,
    server: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for SecretCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretCapture")
    }
}

impl rustls::KeyLog for SecretCapture {
    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let slot = match label {
            "CLIENT_TRAFFIC_SECRET_0" => &self.client,
            "SERVER_TRAFFIC_SECRET_0" => &self.server,
            _ => return,
        };
        *lock(slot) = secret.to_vec();
    }
}

/// A traffic secret, overwritten when dropped.
struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

fn wipe(bytes: &mut [u8]) {
    for byte in bytes.iter_mut() {
        // SAFETY: a valid, exclusive reference; volatile so the wipe stays.
        unsafe { std::ptr::write_volatile(byte, 0) };
    }
}

/// TLS 1.3 key schedule for KeyUpdates (RFC 8446, section 7.2): each
/// direction's next secret is HKDF-Expand-Label(secret, "traffic upd"),
/// and its key and IV expand from that.
struct Rekey {
    cipher: Cipher,
    hkdf: &'static dyn rustls::crypto::tls13::Hkdf,
    tx: Secret,
    rx: Secret,
    records_sent: u64,
    record_limit: u64,
    tx_update_due: bool,
}

impl Rekey {
    fn expand_label(&self, secret: &[u8], label: &[u8], out: &mut [u8]) -> io::Result<()> {
        let expander = self
            .hkdf
            .expander_for_okm(&rustls::crypto::tls13::OkmBlock::new(secret));
        let length = (out.len() as u16).to_be_bytes();
        let label_len = [(b"tls13 ".len() + label.len()) as u8];
        expander
            .expand_slice(&[&length, &label_len, b"tls13 ", label, &[0]], out)
            .map_err(|_| io::Error::other("TLS key schedule: output too long"))
    }

    /// Moves `secret` one KeyUpdate on and gives the kernel the keys that
    /// follow from it for `direction`.
    fn advance(&self, fd: RawFd, direction: libc::c_int, secret: &mut Secret) -> io::Result<()> {
        let mut next = Secret(vec![0; secret.0.len()]);
        self.expand_label(&secret.0, b"traffic upd", &mut next.0)?;
        let mut key = Secret(vec![0; self.cipher.key_len()]);
        let mut iv = Secret(vec![0; 12]);
        self.expand_label(&next.0, b"key", &mut key.0)?;
        self.expand_label(&next.0, b"iv", &mut iv.0)?;
        set_keys(fd, direction, self.cipher, &key.0, &iv.0, 0)?;
        *secret = next;
        Ok(())
    }
}

/// Where a connection's records are ciphered from now on.
pub enum HboneIo {
    Kernel(KernelStream),
    User(Box<HandshakenStream>),
}

impl KernelTls {
    /// Unless `off`, probes once which ciphers this kernel takes and
    /// whether it takes new keys (on loopback connections with throw-away
    /// keys), so a connection's secrets leave rustls only when the kernel
    /// will accept them; `auto` also wants the new keys.
    pub fn new(mode: KernelTlsMode) -> Self {
        let probed = match mode {
            KernelTlsMode::Off => Probed::default(),
            KernelTlsMode::Auto | KernelTlsMode::On => match probe() {
                Ok(probed) if mode == KernelTlsMode::Auto && !probed.rekey => {
                    info!(
                        "kernel TLS cannot take new keys for TLS KeyUpdates on this kernel: \
                         HBONE stays on rustls (`hbone.kernel_tls: on` uses it anyway)"
                    );
                    Probed::default()
                }
                Ok(probed) if !probed.ciphers.is_empty() => {
                    info!(
                        ciphers = ?probed.ciphers,
                        key_update = probed.rekey,
                        "kernel TLS available: the kernel will cipher HBONE records"
                    );
                    probed
                }
                Ok(_) => {
                    info!("kernel TLS has none of the TLS 1.3 ciphers: HBONE stays on rustls");
                    Probed::default()
                }
                Err(error) => {
                    info!(%error, "kernel TLS unavailable (no `tls` module?): HBONE stays on rustls");
                    Probed::default()
                }
            },
        };
        Self {
            ciphers: probed.ciphers,
            rekey: probed.rekey,
            record_limit: None,
            stats: Arc::default(),
        }
    }

    /// Refreshes the sending keys after `records` records instead of at
    /// the suite's confidentiality limit (tests reach it that way).
    pub fn with_record_limit(mut self, records: u64) -> Self {
        self.record_limit = Some(records);
        self
    }

    /// Whether peers' KeyUpdates can be applied: the kernel takes new
    /// keys on a live socket.
    pub fn applies_key_updates(&self) -> bool {
        self.rekey
    }

    /// A recorder of the handshake's traffic secrets for one connection,
    /// to set as the TLS config's `key_log` when KeyUpdates can be
    /// applied (the kernel path derives the next keys from them).
    pub fn secret_capture(&self) -> Option<Arc<SecretCapture>> {
        (self.wanted() && self.rekey).then(Arc::default)
    }

    /// Whether secret extraction must be enabled on the TLS configs.
    pub fn wanted(&self) -> bool {
        !self.ciphers.is_empty()
    }

    /// Hands a finished handshake to the kernel when it can take it, or
    /// keeps it on rustls. An error means the secrets had left rustls when
    /// the kernel refused them: the connection cannot be used.
    pub fn take_over(
        &self,
        tls: HandshakenStream,
        secrets: Option<&SecretCapture>,
    ) -> io::Result<HboneIo> {
        if !self.wanted() {
            return Ok(HboneIo::User(Box::new(tls)));
        }
        if let Some(reason) = self.cannot_take(&tls) {
            return Ok(self.stay_on_rustls(tls, reason));
        }
        let rekey = self.rekey_state(&tls, secrets);
        if self.rekey && rekey.is_none() {
            // Without the handshake's secrets a KeyUpdate could not be
            // followed, where rustls would follow it.
            return Ok(self.stay_on_rustls(tls, "the traffic secrets were not captured"));
        }
        if set_ulp(tls.get_ref().0.get_ref().as_raw_fd()).is_err() {
            // The probe passed, so this connection is the odd one (the
            // peer may already have closed it).
            return Ok(self.stay_on_rustls(tls, "the kernel refused the tls protocol"));
        }
        // The handshake's last reads may have taken whole application
        // records too (tokio-rustls reads on while rustls wants to): their
        // plaintext is read out first and served before the socket's.
        let (io, early, extracted) = match tls {
            tokio_rustls::TlsStream::Client(tls) => {
                let (io, mut conn) = tls.into_inner();
                let early = drain(&mut conn.reader())?;
                (io, early, conn.dangerous_extract_secrets())
            }
            tokio_rustls::TlsStream::Server(tls) => {
                let (io, mut conn) = tls.into_inner();
                let early = drain(&mut conn.reader())?;
                (io, early, conn.dangerous_extract_secrets())
            }
        };
        let secrets = extracted.map_err(|e| io::Error::other(format!("TLS secrets: {e}")))?;
        let tcp = io.into_inner();
        let fd = tcp.as_raw_fd();
        set_secrets(fd, libc::TLS_TX, &secrets.tx.1, secrets.tx.0)?;
        set_secrets(fd, libc::TLS_RX, &secrets.rx.1, secrets.rx.0)?;
        if self.stats.connections.fetch_add(1, Ordering::Relaxed) == 0 {
            info!("kernel TLS in use: the kernel ciphers HBONE records");
        }
        Ok(HboneIo::Kernel(KernelStream {
            tcp,
            pending: early,
            rekey,
            read_closed: false,
            close_notify_sent: false,
            stats: self.stats.clone(),
        }))
    }

    /// What applying KeyUpdates on this connection takes: its cipher, HKDF
    /// and current traffic secrets (ours to send, the peer's to receive).
    fn rekey_state(
        &self,
        tls: &HandshakenStream,
        secrets: Option<&SecretCapture>,
    ) -> Option<Rekey> {
        if !self.rekey {
            return None;
        }
        let secrets = secrets?;
        let (_, state) = tls.get_ref();
        let rustls::SupportedCipherSuite::Tls13(suite) = state.negotiated_cipher_suite()? else {
            return None;
        };
        let cipher = Cipher::of_suite(suite.common.suite)?;
        let client = std::mem::take(&mut *lock(&secrets.client));
        let server = std::mem::take(&mut *lock(&secrets.server));
        if client.is_empty() || server.is_empty() {
            return None;
        }
        let (tx, rx) = match tls {
            tokio_rustls::TlsStream::Client(_) => (client, server),
            tokio_rustls::TlsStream::Server(_) => (server, client),
        };
        Some(Rekey {
            cipher,
            hkdf: suite.hkdf_provider,
            tx: Secret(tx),
            rx: Secret(rx),
            records_sent: 0,
            record_limit: self
                .record_limit
                .unwrap_or(suite.common.confidentiality_limit),
            tx_update_due: false,
        })
    }

    /// Why this connection cannot go to the kernel although the kernel
    /// could take connections.
    fn cannot_take(&self, tls: &HandshakenStream) -> Option<&'static str> {
        let (io, state) = tls.get_ref();
        let cipher = state
            .negotiated_cipher_suite()
            .and_then(|suite| Cipher::of_suite(suite.suite()));
        if !cipher.is_some_and(|cipher| self.ciphers.contains(&cipher)) {
            return Some("the kernel lacks the negotiated cipher");
        }
        check_state(state).or_else(|| {
            (!io.at_record_boundary()).then_some("rustls read past the last handshake record")
        })
    }

    /// Keeps a connection the kernel could have taken on rustls, counted.
    fn stay_on_rustls(&self, mut tls: HandshakenStream, reason: &'static str) -> HboneIo {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        debug!(reason, "kernel TLS not used on an HBONE connection");
        tls.get_mut().0.unbound();
        HboneIo::User(Box::new(tls))
    }

    /// The TCP stream a handshake runs over: bounded to one record per
    /// read only when the kernel may take the connection afterwards.
    pub fn handshake_io(&self, tcp: TcpStream) -> RecordBounded<TcpStream> {
        RecordBounded::new(tcp, self.wanted())
    }
}

/// The plaintext rustls has decrypted and not yet handed out.
fn drain(reader: &mut rustls::Reader<'_>) -> io::Result<Vec<u8>> {
    let mut early = Vec::new();
    match io::Read::read_to_end(reader, &mut early) {
        Ok(_) => Ok(early),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(early),
        Err(e) => Err(e),
    }
}

/// What rustls's state must be for the kernel to continue it exactly.
fn check_state(state: &CommonState) -> Option<&'static str> {
    if state.is_handshaking() {
        return Some("handshake not finished");
    }
    if state.wants_write() {
        return Some("TLS records still queued in rustls");
    }
    if state.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Some("not TLS 1.3");
    }
    None
}

fn set_ulp(fd: RawFd) -> io::Result<()> {
    setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, b"tls".as_ptr().cast(), 3)
}

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: *const libc::c_void,
    len: usize,
) -> io::Result<()> {
    // SAFETY: `value` points at `len` readable bytes for the call.
    let rc = unsafe { libc::setsockopt(fd, level, name, value, len as libc::socklen_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One direction's secrets from rustls, handed to the kernel.
fn set_secrets(
    fd: RawFd,
    direction: libc::c_int,
    secrets: &ConnectionTrafficSecrets,
    sequence: u64,
) -> io::Result<()> {
    let (cipher, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Cipher::Chacha20Poly1305, key, iv)
        }
        _ => {
            return Err(io::Error::other(
                "cipher suite the kernel path does not know",
            ));
        }
    };
    set_keys(fd, direction, cipher, key.as_ref(), iv.as_ref(), sequence)
}

/// One direction's key, IV and record sequence in the kernel's layout.
/// TLS 1.3's 12-byte IV is the kernel's 4-byte salt then 8-byte IV for
/// AES-GCM; ChaCha20-Poly1305 takes it whole.
fn set_keys(
    fd: RawFd,
    direction: libc::c_int,
    cipher: Cipher,
    key: &[u8],
    iv: &[u8],
    sequence: u64,
) -> io::Result<()> {
    let rec_seq = sequence.to_be_bytes();
    let version = libc::TLS_1_3_VERSION;
    if iv.len() != 12 {
        return Err(io::Error::other("TLS IV of an unexpected length"));
    }
    match cipher {
        Cipher::Aes128Gcm => {
            let mut info = libc::tls12_crypto_info_aes_gcm_128 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_AES_GCM_128,
                },
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq,
            };
            fill(&mut info.key, key)?;
            fill(&mut info.salt, &iv[..4])?;
            fill(&mut info.iv, &iv[4..])?;
            set_and_wipe(fd, direction, &mut info)
        }
        Cipher::Aes256Gcm => {
            let mut info = libc::tls12_crypto_info_aes_gcm_256 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_AES_GCM_256,
                },
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq,
            };
            fill(&mut info.key, key)?;
            fill(&mut info.salt, &iv[..4])?;
            fill(&mut info.iv, &iv[4..])?;
            set_and_wipe(fd, direction, &mut info)
        }
        Cipher::Chacha20Poly1305 => {
            let mut info = libc::tls12_crypto_info_chacha20_poly1305 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305,
                },
                iv: [0; 12],
                key: [0; 32],
                salt: [],
                rec_seq,
            };
            fill(&mut info.key, key)?;
            fill(&mut info.iv, iv)?;
            set_and_wipe(fd, direction, &mut info)
        }
    }
}

/// What the kernel's TLS can do, found by the probe.
#[derive(Debug, Default)]
struct Probed {
    ciphers: Vec<Cipher>,
    /// Whether keys can be replaced on a live socket (TLS 1.3 KeyUpdate).
    rekey: bool,
}

/// Which ciphers the kernel takes in both directions, tried on loopback
/// connections with all-zero keys that never carry a byte, and whether it
/// takes new keys on a socket that has some (older kernels refuse with
/// `EBUSY`). An error means no TLS at all (the `tls` upper-layer protocol
/// is refused).
fn probe() -> io::Result<Probed> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let mut probed = Probed::default();
    for cipher in Cipher::ALL {
        let client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let _server = listener.accept()?;
        let fd = client.as_raw_fd();
        set_ulp(fd)?;
        let zero = [0u8; 32];
        let key = &zero[..cipher.key_len()];
        let taken = set_keys(fd, libc::TLS_TX, cipher, key, &zero[..12], 0)
            .and_then(|()| set_keys(fd, libc::TLS_RX, cipher, key, &zero[..12], 0));
        match taken {
            Ok(()) => {
                if probed.ciphers.is_empty() {
                    probed.rekey = set_keys(fd, libc::TLS_TX, cipher, key, &zero[..12], 0)
                        .and_then(|()| set_keys(fd, libc::TLS_RX, cipher, key, &zero[..12], 0))
                        .is_ok();
                }
                probed.ciphers.push(cipher);
            }
            Err(error) => debug!(?cipher, %error, "kernel TLS refuses a cipher"),
        }
    }
    Ok(probed)
}

fn fill(to: &mut [u8], from: &[u8]) -> io::Result<()> {
    if to.len() != from.len() {
        return Err(io::Error::other("TLS key material of an unexpected length"));
    }
    to.copy_from_slice(from);
    Ok(())
}

/// Gives the kernel one direction's keys, then overwrites the copy.
fn set_and_wipe<T>(fd: RawFd, direction: libc::c_int, info: &mut T) -> io::Result<()> {
    let result = setsockopt(
        fd,
        libc::SOL_TLS,
        direction,
        (info as *const T).cast(),
        size_of::<T>(),
    );
    // SAFETY: `info` is a plain-old-data struct of `size_of::<T>()` bytes,
    // borrowed exclusively.
    wipe(unsafe { std::slice::from_raw_parts_mut((info as *mut T).cast::<u8>(), size_of::<T>()) });
    result.map_err(|e| {
        let which = if direction == libc::TLS_TX {
            "send"
        } else {
            "receive"
        };
        io::Error::new(e.kind(), format!("kernel TLS {which} keys refused: {e}"))
    })
}

/// A TCP connection whose records the kernel ciphers. Reads and writes are
/// plain socket calls; records that are not application data come back as
/// `EIO` from `read` and are taken with `recvmsg` and their record type.
pub struct KernelStream {
    tcp: TcpStream,
    /// Application data that came with `recvmsg`, not yet read.
    pending: Vec<u8>,
    /// Key schedule state where the kernel can take new keys.
    rekey: Option<Rekey>,
    read_closed: bool,
    close_notify_sent: bool,
    stats: Arc<KernelTlsStats>,
}

/// TLS record content type of application data.
const RECORD_APPLICATION_DATA: u8 = 23;

impl KernelStream {
    /// Takes one control record from the head of the receive queue.
    /// `Ok(true)` when it ended the stream (close_notify).
    fn control_record(&mut self) -> io::Result<bool> {
        // Not through tokio's readiness: a kernel that rekeys reports the
        // socket unreadable while a KeyUpdate waits (see `poll_read`).
        let (kind, body) = recv_record(self.tcp.as_raw_fd())?;
        match kind {
            // Only control records make `read` fail, but should data come
            // first after all, it is kept for the next read.
            RECORD_APPLICATION_DATA => {
                self.pending = body;
                Ok(false)
            }
            RECORD_ALERT => match body.as_slice() {
                [_, 0] => Ok(true),
                [level, description] => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("peer sent TLS alert {description} (level {level})"),
                )),
                _ => Err(invalid("malformed TLS alert record")),
            },
            RECORD_HANDSHAKE => {
                let mut rest = body.as_slice();
                while let [kind, a, b, c, tail @ ..] = rest {
                    let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
                    match *kind {
                        NEW_SESSION_TICKET => {
                            self.stats.tickets_ignored.fetch_add(1, Ordering::Relaxed);
                        }
                        KEY_UPDATE => self.key_update(tail.first().copied())?,
                        other => {
                            return Err(invalid(&format!(
                                "unexpected TLS handshake message {other} after the handshake"
                            )));
                        }
                    }
                    rest = tail
                        .get(len..)
                        .ok_or_else(|| invalid("truncated TLS handshake record"))?;
                }
                Ok(false)
            }
            other => Err(invalid(&format!("unexpected TLS record type {other}"))),
        }
    }

    /// Applies a peer's KeyUpdate to the receiving keys; `request` is its
    /// `request_update` byte (1: the peer wants ours refreshed too).
    fn key_update(&mut self, request: Option<u8>) -> io::Result<()> {
        let fd = self.tcp.as_raw_fd();
        let applied = match self.rekey.as_mut() {
            None => Err(io::Error::other("this kernel cannot take new keys")),
            Some(rekey) => {
                let mut rx = std::mem::replace(&mut rekey.rx, Secret(Vec::new()));
                let result = rekey.advance(fd, libc::TLS_RX, &mut rx);
                rekey.rx = rx;
                if request == Some(1) {
                    rekey.tx_update_due = true;
                }
                result
            }
        };
        match applied {
            Ok(()) => {
                self.stats
                    .key_updates_received
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                self.stats
                    .key_updates_refused
                    .fetch_add(1, Ordering::Relaxed);
                Err(io::Error::other(format!(
                    "peer sent a TLS KeyUpdate the kernel TLS path cannot apply ({error}): \
                     connection closed"
                )))
            }
        }
    }

    /// Sends a KeyUpdate under the old keys, then gives the kernel the new
    /// sending keys, before any more data goes out.
    fn poll_key_update(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.rekey.as_ref().is_some_and(|rekey| rekey.tx_update_due) {
            ready!(self.tcp.poll_write_ready(cx))?;
            let fd = self.tcp.as_raw_fd();
            // update_not_requested: the peer's sending keys are its own
            // business.
            let message = [KEY_UPDATE, 0, 0, 1, 0];
            match self.tcp.try_io(Interest::WRITABLE, || {
                send_record(fd, RECORD_HANDSHAKE, &message)
            }) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
            let Some(rekey) = self.rekey.as_mut() else {
                break;
            };
            let mut tx = std::mem::replace(&mut rekey.tx, Secret(Vec::new()));
            let result = rekey.advance(fd, libc::TLS_TX, &mut tx);
            rekey.tx = tx;
            result?;
            rekey.records_sent = 0;
            rekey.tx_update_due = false;
            self.stats.key_updates_sent.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }

    /// Counts the records a write of `bytes` made (the kernel closes a
    /// record at the end of every send and every 16 KiB).
    fn sent(&mut self, bytes: usize) {
        if let Some(rekey) = self.rekey.as_mut() {
            rekey.records_sent += bytes.div_ceil(16 * 1024).max(1) as u64;
            if rekey.records_sent >= rekey.record_limit {
                rekey.tx_update_due = true;
            }
        }
    }

    /// Sends close_notify once, as an alert record.
    fn poll_close_notify(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.close_notify_sent {
            ready!(self.tcp.poll_write_ready(cx))?;
            let fd = self.tcp.as_raw_fd();
            match self.tcp.try_io(Interest::WRITABLE, || {
                send_record(fd, RECORD_ALERT, &[1, 0])
            }) {
                Ok(()) => self.close_notify_sent = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // The peer is gone: nothing more to say to it.
                Err(_) => self.close_notify_sent = true,
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// `recvmsg` of one record with its type (a control message).
fn recv_record(fd: RawFd) -> io::Result<(u8, Vec<u8>)> {
    let mut body = vec![0u8; MAX_RECORD];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr().cast(),
        iov_len: body.len(),
    };
    let mut control = [MaybeUninit::<u64>::uninit(); 8];
    // SAFETY: msghdr is plain data; every pointer in it outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: as above.
    let read = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    body.truncate(read as usize);
    // SAFETY: the kernel filled `msg_control`; CMSG_* walk it in bounds.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: as above.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_TLS && header.cmsg_type == libc::TLS_GET_RECORD_TYPE {
            // SAFETY: this control message carries one byte.
            let kind = unsafe { *libc::CMSG_DATA(cmsg) };
            return Ok((kind, body));
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Err(invalid("TLS record without its record type"))
}

/// `sendmsg` of one record of type `kind` (an alert, for close_notify).
fn send_record(fd: RawFd, kind: u8, body: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer in it outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: `control` has room for one header and one byte of data.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = kind;
    }
    // SAFETY: as above.
    let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl AsyncRead for KernelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let take = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..take]);
                this.pending.drain(..take);
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            // Read before asking tokio whether the socket is readable: a
            // kernel that takes KeyUpdates reports the socket unreadable
            // once it has decrypted a KeyUpdate it has not yet delivered
            // (until the new key is set, which needs that very record), so
            // a reader that waits for an edge there waits forever. Found
            // in the qemu matrix on 7.3: `recv` gets `EIO` and `recvmsg`
            // the record while `poll` says nothing is there.
            let fd = this.tcp.as_raw_fd();
            // SAFETY: `recv` writes at most `len` bytes into the unfilled
            // part, which is then marked initialised and filled.
            let unfilled = unsafe { buf.unfilled_mut() };
            let (ptr, len) = (unfilled.as_mut_ptr().cast::<libc::c_void>(), unfilled.len());
            let raw_read = || {
                // SAFETY: as above; the socket is non-blocking.
                let read = unsafe { libc::recv(fd, ptr, len, 0) };
                if read < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(read as usize)
                }
            };
            let result = match raw_read() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(this.tcp.poll_read_ready(cx))?;
                    // Clears a stale readiness when it would block, so the
                    // next turn registers for the next edge.
                    this.tcp.try_io(Interest::READABLE, raw_read)
                }
                other => other,
            };
            match result {
                Ok(read) => {
                    // SAFETY: `recv` initialised `read` bytes.
                    unsafe { buf.assume_init(read) };
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.raw_os_error() == Some(libc::EIO) => match this.control_record() {
                    Ok(true) => this.read_closed = true,
                    Ok(false) => {}
                    Err(e) => return Poll::Ready(Err(e)),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for KernelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_key_update(cx))?;
        let written = ready!(Pin::new(&mut this.tcp).poll_write(cx, buf))?;
        this.sent(written);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_key_update(cx))?;
        let written = ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs))?;
        this.sent(written);
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_close_notify(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl AsyncRead for HboneIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HboneIo::Kernel(stream) => Pin::new(stream).poll_read(cx, buf),
            HboneIo::User(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HboneIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HboneIo::Kernel(stream) => Pin::new(stream).poll_write(cx, buf),
            HboneIo::User(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HboneIo::Kernel(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            HboneIo::User(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            HboneIo::Kernel(stream) => stream.is_write_vectored(),
            HboneIo::User(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HboneIo::Kernel(stream) => Pin::new(stream).poll_flush(cx),
            HboneIo::User(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HboneIo::Kernel(stream) => Pin::new(stream).poll_shutdown(cx),
            HboneIo::User(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
