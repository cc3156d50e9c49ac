//! The `mesh-agent` command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::{
    admin::{LogControl, LogFilterError},
    app, cleanup, cli,
    config::{Config, Overrides},
};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tracing_subscriber::{EnvFilter, prelude::*, reload};

/// eBPF-accelerated, sidecar-free service mesh: one agent per node.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, env = "MESH_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `mesh_agent=debug`.
    #[arg(long, default_value = "info", global = true, env = "MESH_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the kernel programs, proxy captured connections, and
    /// remove everything again on SIGTERM. SIGHUP reloads the config.
    /// Started while another agent runs on the same pin root, it takes
    /// that agent's listeners and kernel state over (an upgrade without a
    /// lapse), and the other finishes its connections and exits.
    Run {
        /// YAML config: node, proxy settings, workloads, services (or
        /// `kubernetes:` to learn those from the API server).
        #[arg(long, short)]
        config: PathBuf,
        /// This node's name, over the config's `node.name` (a DaemonSet
        /// passes it from the downward API).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// bpffs directory for this agent's programs, maps and links.
        #[arg(long, default_value = mesh_common::DEFAULT_PIN_ROOT, env = "MESH_PIN_ROOT")]
        pin_root: PathBuf,
        /// Unix socket where a new agent for the same pin root finds this
        /// one and takes over its listeners and kernel state (an upgrade
        /// without a lapse). Root only.
        #[arg(long, default_value = mesh_agent::handover::DEFAULT_SOCKET, env = "MESH_HANDOVER_SOCKET")]
        handover_socket: PathBuf,
        #[command(flatten)]
        endpoints: Endpoints,
        /// Threads that run the proxy (default: one per CPU this process
        /// may use). Fewer than the node's cores leaves them to the pods.
        #[arg(long, env = "MESH_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
        worker_threads: Option<u16>,
    },
    /// Remove what an agent that did not exit cleanly left behind: pinned
    /// programs, maps and links (which detaches tc and cgroup programs) and
    /// the steer routing. Run it in the agent's network namespace.
    Cleanup {
        /// The pin root the agent used.
        #[arg(long, default_value = mesh_common::DEFAULT_PIN_ROOT, env = "MESH_PIN_ROOT")]
        pin_root: PathBuf,
    },
    /// Check a config file and exit: 0 when valid, 1 with the problem
    /// otherwise. It checks exactly what `run` checks before it starts.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// As for `run`.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// As for `run` (the proxy's ports must not collide with them).
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Summary of a running agent: proxy, kernel, certificates, endpoints.
    Status {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
    },
    /// Live connections of a running agent, with bytes and age.
    Connections {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
    },
    /// Follow connections as they finish: source to destination with
    /// identities, verdict and bytes.
    Observe {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Print the raw JSON events.
        #[arg(long)]
        json: bool,
    },
    /// Who talks to whom, as Graphviz DOT (or SVG with --svg).
    Graph {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        #[arg(long)]
        svg: bool,
    },
    /// Create the mesh's CA (a new root) in DIR, or keep the one there:
    /// `ca-cert.pem`, `ca-key.pem` and `root-cert.pem`, for the
    /// `mesh-agent-ca` secret of a Kubernetes install.
    CaInit {
        #[arg(long)]
        dir: PathBuf,
    },
    /// The mesh's CA as a service, so that nodes hold no signing key.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Check this kernel: every feature the agent needs (program and map
    /// types, helpers, attach modes) and whether each program passes the
    /// verifier. Exits 1 when the agent could not run here.
    Probe {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Typed dump of every pinned map (JSON), read from bpffs.
    Inspect {
        #[arg(long, default_value = mesh_common::DEFAULT_PIN_ROOT, env = "MESH_PIN_ROOT")]
        pin_root: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Serve Istio's certificate API (`CreateCertificate`) over TLS 1.3:
    /// a workload certificate for a node agent's CSR, only for a meshed
    /// pod on that agent's own node (its ServiceAccount token, checked
    /// with a TokenReview, names the node). Reads the API server from the
    /// in-cluster config or KUBECONFIG; SIGTERM stops it.
    Serve(CaServeArgs),
}

#[derive(clap::Args)]
struct CaServeArgs {
    /// Where the gRPC service listens.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Prometheus endpoint (`/metrics`): issued, refused by reason.
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics: SocketAddr,
    /// The signing CA: `ca-cert.pem`, `ca-key.pem`, `root-cert.pem` (as
    /// `ca-init` writes them, or mounted from the `mesh-ca` Secret).
    #[arg(long, env = "MESH_CA_DIR", default_value = "/etc/mesh-ca")]
    ca_dir: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The audience a caller's token must be issued for.
    #[arg(long, default_value = mesh_agent::istio_ca::TOKEN_AUDIENCE)]
    audience: String,
    /// ServiceAccounts of node agents, `namespace/name`, comma-separated
    /// or repeated (istiod's CA_TRUSTED_NODE_ACCOUNTS).
    #[arg(
        long = "node-account",
        env = "CA_TRUSTED_NODE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "mesh-system/mesh-agent"
    )]
    node_accounts: Vec<String>,
    /// Lifetime of a certificate whose request names none.
    #[arg(long, default_value_t = 24 * 3600)]
    default_lifetime_s: u64,
    /// The longest lifetime granted, whatever a request asks.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    max_lifetime_s: u64,
    /// Names (DNS or IP) clients reach the service by, for its serving
    /// certificate; comma-separated or repeated.
    #[arg(
        long = "serving-name",
        value_delimiter = ',',
        default_value = "mesh-ca.mesh-system.svc"
    )]
    serving_names: Vec<String>,
}

impl CaServeArgs {
    async fn serve(self) -> anyhow::Result<()> {
        use mesh_agent::{ca_service, identity::ca};
        let dir = &self.ca_dir;
        let authority = mesh_agent::identity::EmbeddedCa::load(
            &dir.join(ca::CA_CERT),
            &dir.join(ca::CA_KEY),
            &dir.join(ca::ROOT_CERTS),
        )?;
        let kube = kube::Client::try_default().await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let stopping = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            stopping.cancel();
        });
        let settings = ca_service::Settings {
            listen: self.listen,
            metrics: self.metrics,
            trust_domain: self.trust_domain,
            audience: self.audience,
            node_accounts: self.node_accounts,
            default_lifetime: Duration::from_secs(self.default_lifetime_s),
            max_lifetime: Duration::from_secs(self.max_lifetime_s),
            serving_names: self.serving_names,
        };
        ca_service::serve(settings, authority, kube, stop).await
    }
}

/// The agent's HTTP endpoints, for `run` and `check`.
#[derive(clap::Args, Clone, Copy)]
struct Endpoints {
    /// Admin endpoint (`/stats`, `/config_dump`, `/logging`...): a loopback
    /// address only, since it shows every connection and changes state.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    ready: SocketAddr,
    /// Prometheus endpoint (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
}

impl Endpoints {
    /// What the config's ports must not collide with.
    fn overrides(&self, node_name: Option<String>) -> Overrides {
        Overrides {
            node_name,
            reserved_ports: vec![
                ("--admin", self.admin.port()),
                ("--ready", self.ready.port()),
                ("--metrics", self.metrics.port()),
            ],
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = init_tracing(cli.log_format, &cli.log);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Run { worker_threads, .. } = cli.command {
        app::memory::tune_allocator();
        raise_open_files_limit();
        if let Some(threads) = worker_threads {
            runtime.worker_threads(threads.into());
        }
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mesh-agent: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                config,
                node_name,
                pin_root,
                handover_socket,
                endpoints,
                worker_threads: _,
            } => {
                app::run(app::RunOptions {
                    log,
                    config,
                    overrides: endpoints.overrides(node_name),
                    pin_root,
                    handover_socket,
                    admin: endpoints.admin,
                    ready: endpoints.ready,
                    metrics: endpoints.metrics,
                })
                .await
            }
            Command::Cleanup { pin_root } => cleanup::run(&pin_root).await,
            Command::Check {
                config,
                node_name,
                endpoints,
            } => Config::load_with(&config, &endpoints.overrides(node_name))
                .map(|_| ())
                .map_err(Into::into),
            Command::Status { admin } => cli::status(admin),
            Command::Connections { admin } => cli::connections(admin),
            Command::Observe { admin, json } => cli::observe(admin, json),
            Command::Graph { admin, svg } => cli::graph(admin, svg),
            Command::Inspect { pin_root } => cli::inspect(&pin_root),
            Command::Probe { json } => cli::probe(json),
            Command::Ca {
                command: CaCommand::Serve(args),
            } => args.serve().await,
            Command::CaInit { dir } => mesh_agent::identity::EmbeddedCa::load_or_create(&dir)
                .map(|_| println!("CA in {}", dir.display()))
                .map_err(Into::into),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("mesh-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every proxied connection holds two descriptors (more with HBONE), so
/// the agent lifts its open-file limit as far as it may: to the kernel's
/// `nr_open` when privileged, else the soft limit up to the hard one.
fn raise_open_files_limit() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let wanted = nr_open.max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_err() {
        // Without CAP_SYS_RESOURCE the hard limit cannot rise: take it.
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Sets up logging; returns the control `/logging` uses to change the filter.
fn init_tracing(format: LogFormat, filter: &str) -> LogControl {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only for a terminal: logs in files and collectors stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    Arc::new(move |text: &str| {
        let filter = EnvFilter::try_new(text).map_err(|e| LogFilterError::Invalid {
            filter: text.to_owned(),
            reason: e.to_string(),
        })?;
        handle
            .reload(filter)
            .map_err(|e| LogFilterError::Reload(e.to_string()))?;
        Ok(text.to_owned())
    })
}
