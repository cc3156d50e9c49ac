//! A tiny workload for the simulated pods: a TCP server that tells each
//! client who answered and whom it saw, and checksums what it receives; and a
//! client that drives it. The fixtures start it inside a pod's network
//! namespace and cgroup.
//!
//! Server protocol, per connection: send `<name> <peer-ip>:<peer-port>\n`;
//! read to end of stream, hashing; then send `<bytes> <sha256-hex>\n` and close.
//! That answer can only arrive if the half-close reached the server while the
//! reverse direction stayed open.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use clap::{Parser, Subcommand};
use mesh_tests::payload;
use sha2::{Digest, Sha256};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the protocol above on 0.0.0.0:PORT.
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
        /// After the greeting (and a 200 ms pause), reset the connection
        /// instead of reading.
        #[arg(long)]
        reset: bool,
        /// Hold each connection this long before greeting (a slow backend).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Close right after the greeting, before the client does (the
        /// server closes first, as HTTP/1.0 servers do).
        #[arg(long)]
        close_first: bool,
        /// Sleep this long after every read of at most 64 KiB (a slow
        /// reader).
        #[arg(long, default_value_t = 0)]
        read_delay_ms: u64,
        /// Read at most this many MiB a second (a receiver slower than
        /// its sender, fast enough for gigabytes); 0: no limit.
        #[arg(long, default_value_t = 0)]
        read_rate_mib: u64,
    },
    /// Connect COUNT times, one after the other; print one JSON line each.
    Connect {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Bytes to send (deterministic pseudo-random data), then half-close.
        #[arg(long, default_value_t = 0)]
        send: u64,
        /// Keep the connection open until stdin closes (after the greeting).
        #[arg(long)]
        hold: bool,
        /// After the greeting, reset the connection and report nothing else.
        #[arg(long)]
        reset: bool,
        /// Send before reading the greeting (client speaks first).
        #[arg(long)]
        send_first: bool,
        /// Source address to connect from.
        #[arg(long)]
        bind: Option<std::net::Ipv4Addr>,
        /// Spread COUNT connections over this many threads.
        #[arg(long, default_value_t = 1)]
        parallel: u32,
        /// After the greeting, read until the server closes, then close
        /// (for servers that close first).
        #[arg(long)]
        wait_close: bool,
        /// Send on a non-blocking socket, waiting for writability with
        /// edge-triggered epoll; 5 s without an edge is reported as a
        /// stall (the error names how much was sent).
        #[arg(long)]
        edge_triggered: bool,
        /// Give up on a connect after this long.
        #[arg(long, default_value_t = 5000)]
        connect_timeout_ms: u64,
        /// A connect refused (a reset answering the SYN) is that
        /// connection's report, not a failure of the client.
        #[arg(long)]
        report_refused: bool,
        /// Like a caller with a retry policy: a connection that fails
        /// (reset, refused, cut) is made again, up to this many times;
        /// its report says how many `attempts` it took.
        #[arg(long, default_value_t = 0)]
        retries: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            port,
            name,
            reset,
            delay_ms,
            close_first,
            read_delay_ms,
            read_rate_mib,
        } => serve(
            port,
            &name,
            Answer {
                reset,
                close_first,
                delay: Duration::from_millis(delay_ms),
                read_delay: Duration::from_millis(read_delay_ms),
                read_rate: read_rate_mib << 20,
            },
        ),
        Command::Connect {
            addr,
            count,
            send,
            hold,
            reset,
            send_first,
            bind,
            parallel,
            wait_close,
            edge_triggered,
            connect_timeout_ms,
            report_refused,
            retries,
        } => {
            let plan = Plan {
                send,
                hold,
                reset,
                send_first,
                wait_close,
                edge_triggered,
                connect_timeout: Duration::from_millis(connect_timeout_ms),
                report_refused,
            };
            let parallel = parallel.max(1);
            let threads: Vec<_> = (0..parallel)
                .map(|t| {
                    // Thread t makes every parallel-th connection.
                    let share = count / parallel + u32::from(t < count % parallel);
                    std::thread::spawn(move || -> anyhow::Result<()> {
                        for _ in 0..share {
                            let mut attempts = 0;
                            let line = loop {
                                attempts += 1;
                                let line = connect(addr, bind, plan)?;
                                let failed = line.contains("\"error\"");
                                if !failed || attempts > retries {
                                    break line;
                                }
                            };
                            if retries > 0 {
                                let mut report: serde_json::Value = serde_json::from_str(&line)?;
                                report["attempts"] = attempts.into();
                                println!("{report}");
                            } else {
                                println!("{line}");
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for thread in threads {
                thread.join().expect("client thread")?;
            }
            Ok(())
        }
    }
}

/// How the server treats each connection.
#[derive(Clone, Copy)]
struct Answer {
    reset: bool,
    close_first: bool,
    delay: Duration,
    /// Pause after every read.
    read_delay: Duration,
    /// Bytes a second at most; 0: no limit.
    read_rate: u64,
}

fn serve(port: u16, name: &str, how: Answer) -> anyhow::Result<()> {
    let listener = listen(port)?;
    println!("listening");
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.to_owned();
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|p| p.to_string())
                .unwrap_or_default();
            std::thread::sleep(how.delay);
            let result = answer(stream, &name, how);
            // One line per connection, for the test to read what happened.
            let line = serde_json::json!({
                "peer": peer,
                "bytes": result.as_ref().ok(),
                "error": result.as_ref().err().map(|e| e.to_string()),
            });
            println!("{line}");
        });
    }
    Ok(())
}

/// A listener with the backlog real servers ask for (Go's and nginx's take
/// `somaxconn`). std's is 128: when a burst of a few hundred connections
/// meets a busy accept loop, the kernel drops the handshake's last ACK,
/// the connecting side believes it is connected, and the connection can
/// end up dropped at the server while its client waits for a greeting
/// that never comes (a test failure that says nothing about the mesh).
fn listen(port: u16) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Returns how many bytes the client sent.
fn answer(mut stream: TcpStream, name: &str, how: Answer) -> io::Result<u64> {
    let peer = stream.peer_addr()?;
    stream.write_all(format!("{name} {peer}\n").as_bytes())?;
    if how.close_first {
        return Ok(0);
    }
    if how.reset {
        // A reset that lands before the connecting side's connect() returned
        // turns into a failed connect there (SO_ERROR says ECONNRESET), and
        // the agent would answer "unavailable" instead of carrying the
        // greeting and the reset. Tests mean the reset of an established
        // connection, so give connect() time to return first.
        std::thread::sleep(Duration::from_millis(200));
        reset_close(stream)?;
        return Ok(0);
    }
    let (count, digest) = hash_until_eof(&mut stream, how.read_delay, how.read_rate)?;
    stream.write_all(format!("{count} {digest}\n").as_bytes())?;
    Ok(count)
}

fn hash_until_eof(
    stream: &mut TcpStream,
    read_delay: Duration,
    read_rate: u64,
) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let size = if read_delay.is_zero() { 256 } else { 64 };
    let mut buffer = vec![0; size * 1024];
    let mut count = 0u64;
    let started = std::time::Instant::now();
    loop {
        if read_rate > 0 {
            // Ahead of the rate: wait until the bytes read so far are due.
            let due = Duration::from_secs_f64(count as f64 / read_rate as f64);
            if let Some(early) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(early);
            }
        }
        let n = match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buffer[..n]);
        count += n as u64;
        std::thread::sleep(read_delay);
    }
    Ok((count, hex(&hasher.finalize())))
}

/// One connection. Failing to connect is an error; anything that goes wrong
/// after that (a reset, typically) is part of the report, under `error`.
/// What one client connection does.
#[derive(Clone, Copy)]
struct Plan {
    send: u64,
    hold: bool,
    reset: bool,
    send_first: bool,
    wait_close: bool,
    edge_triggered: bool,
    connect_timeout: Duration,
    report_refused: bool,
}

fn connect(
    addr: SocketAddr,
    bind: Option<std::net::Ipv4Addr>,
    plan: Plan,
) -> anyhow::Result<String> {
    // Connecting counts: a stalled handshake is what users feel most.
    let started = std::time::Instant::now();
    let stream = match open(addr, bind, plan.connect_timeout) {
        Ok(stream) => stream,
        // Accepted and reset before connect() returned: a reset, not a failure to connect.
        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {
            return Ok(serde_json::json!({ "error": error.to_string() }).to_string());
        }
        Err(error) if plan.report_refused && error.kind() == io::ErrorKind::ConnectionRefused => {
            let duration_ms = started.elapsed().as_millis() as u64;
            return Ok(serde_json::json!({
                "error": error.to_string(),
                "refused": true,
                "duration_ms": duration_ms,
            })
            .to_string());
        }
        Err(error) => return Err(error.into()),
    };
    let local = stream.local_addr().ok();
    let mut report = serde_json::json!({ "local": local });
    if let Err(error) = session(stream, plan, &mut report) {
        report["error"] = error.to_string().into();
    }
    report["duration_ms"] = (started.elapsed().as_millis() as u64).into();
    Ok(report.to_string())
}

fn session(mut stream: TcpStream, plan: Plan, report: &mut serde_json::Value) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    if plan.send_first {
        send_payload(&mut stream, plan.send, plan.edge_triggered, report)?;
    }
    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    report["greeting"] = greeting.trim_end().into();
    if plan.reset {
        return reset_close(stream);
    }
    if plan.wait_close {
        let rest = reader.read_to_end(&mut Vec::new())?;
        report["after_greeting"] = rest.into();
        return Ok(());
    }
    if plan.hold {
        // Tell the driver the connection is up, then wait for it to let go.
        println!(
            "{}",
            serde_json::json!({ "local": report["local"], "greeting": report["greeting"], "held": true })
        );
        io::stdout().flush()?;
        io::stdin().read_to_end(&mut Vec::new())?;
    }
    if !plan.send_first {
        send_payload(&mut stream, plan.send, plan.edge_triggered, report)?;
    }
    // On a socket already reset shutdown() says ENOTCONN while the reset
    // itself is still pending: the read below reports it.
    if let Err(error) = stream.shutdown(Shutdown::Write)
        && error.kind() != io::ErrorKind::NotConnected
    {
        return Err(error);
    }
    let mut reply = String::new();
    reader.read_line(&mut reply)?;
    report["reply"] = reply.trim_end().into();
    Ok(())
}

/// Sends `send` bytes of the deterministic payload, recording the count
/// and checksum in the report.
fn send_payload(
    writer: &mut TcpStream,
    send: u64,
    edge_triggered: bool,
    report: &mut serde_json::Value,
) -> io::Result<()> {
    let mut edges = if edge_triggered {
        Some(EdgeWriter::new(writer)?)
    } else {
        None
    };
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    let mut chunk = vec![0; 256 * 1024];
    while sent < send {
        let n = (send - sent).min(chunk.len() as u64) as usize;
        payload::fill(&mut chunk[..n], sent);
        hasher.update(&chunk[..n]);
        match edges.as_mut() {
            Some(edges) => edges.write_all(writer, &chunk[..n], sent)?,
            None => writer.write_all(&chunk[..n])?,
        }
        sent += n as u64;
        report["sent"] = sent.into();
    }
    if edge_triggered {
        writer.set_nonblocking(false)?;
    }
    report["sent"] = sent.into();
    report["sent_sha256"] = hex(&hasher.finalize()).into();
    Ok(())
}

/// Writes the way an event loop does: a non-blocking socket, written until
/// it would block, then a wait for the next writable edge
/// (`EPOLLOUT | EPOLLET`). A path that fills the socket and never wakes it
/// again stalls such a writer for good; here that shows as an error.
struct EdgeWriter {
    epoll: nix::sys::epoll::Epoll,
}

/// How long a writer waits for an edge before it calls the path stalled.
const EDGE_PATIENCE_MS: u16 = 5_000;

impl EdgeWriter {
    fn new(stream: &TcpStream) -> io::Result<Self> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
        stream.set_nonblocking(true)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            stream,
            EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, 0),
        )?;
        Ok(Self { epoll })
    }

    /// Writes `data`, the bytes after the first `sent` of the payload.
    fn write_all(&mut self, stream: &mut TcpStream, mut data: &[u8], sent: u64) -> io::Result<()> {
        let len = data.len();
        while !data.is_empty() {
            match stream.write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut events = [nix::sys::epoll::EpollEvent::empty()];
                    let ready = self.epoll.wait(&mut events, EDGE_PATIENCE_MS)?;
                    if ready == 0 {
                        let at = sent + (len - data.len()) as u64;
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "stalled: no writable edge for {EDGE_PATIENCE_MS} ms with {at} bytes sent"
                            ),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Connects, from `bind` when given (within `timeout` when not).
fn open(
    addr: SocketAddr,
    bind: Option<std::net::Ipv4Addr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(bind) = bind else {
        return TcpStream::connect_timeout(&addr, timeout);
    };
    // SAFETY: plain socket syscalls on a descriptor we own; the std stream
    // takes ownership at the end.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        let local = sockaddr(bind, 0);
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let SocketAddr::V4(remote) = addr else {
            return Err(io::Error::other("IPv4 only"));
        };
        let remote = sockaddr(*remote.ip(), remote.port());
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn reset_close(stream: TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid descriptor and a correctly sized value.
    let ret = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    drop(stream);
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
