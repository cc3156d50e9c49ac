//! A whole agent started in the test's own process: `Bound::bind` on ports
//! the test chooses (0: any free one), then `Bound::run` until the test
//! says stop. The kernel, the pods and the traffic are as real as in the
//! other suites; only the process boundary is gone, so a test can hold the
//! agent's handles. Needs root.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_agent::{
    admin::LogControl,
    app::{Bound, RunOptions},
    config::{Config, Overrides},
    dataplane::policy_routing,
};
use mesh_tests::{
    pod::Connect,
    scenario::{ECHO_VIP, echo_config, greeting},
    topology::Node,
};

/// One HTTP/1.1 GET; the status code and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn an_agent_binds_chosen_ports_serves_and_stops_in_process() {
    let mut node = Node::new("inproc", 1);
    for pod in ["client", "be1", "be2"] {
        node.add_pod(pod);
    }
    let _servers: Vec<_> = ["be1", "be2"]
        .iter()
        .map(|pod| node.pod(pod).serve(8080, pod, false))
        .collect();
    let config_dir = std::env::temp_dir().join(format!("{}.config", node.name));
    std::fs::create_dir_all(&config_dir).expect("config directory");
    let config_path = config_dir.join("config.yaml");
    std::fs::write(
        &config_path,
        echo_config(&node, &["client", "be1", "be2"], &["be1", "be2"], ""),
    )
    .expect("write config");
    let log: LogControl = Arc::new(|filter: &str| Ok(filter.to_owned()));
    let options = RunOptions {
        log,
        config: config_path.clone(),
        overrides: Overrides::default(),
        pin_root: node.pin_root.clone(),
        handover_socket: node.handover_socket(),
        admin: "127.0.0.1:0".parse().unwrap(),
        ready: "127.0.0.1:0".parse().unwrap(),
        metrics: "127.0.0.1:0".parse().unwrap(),
    };

    let node = &node;
    node.netns.run(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            policy_routing::install().await.expect("steer routing");
            let config = Config::load_with(&options.config, &options.overrides).expect("config");
            let bound = Bound::bind(&options, config).await.expect("bind");
            let addresses = bound.addresses();
            for addr in [addresses.admin, addresses.ready, addresses.metrics] {
                assert_ne!(addr.port(), 0, "{addresses:?}");
            }
            assert_eq!(addresses.outbound.port(), 15001, "{addresses:?}");
            assert!(
                node.pin_root.join("maps").exists(),
                "bound means loaded and pinned"
            );
            let ready = addresses.ready;
            let (status, _) = tokio::task::block_in_place(|| http_get(ready, "/healthz/ready"));
            assert_eq!(status, 503, "not ready before run");

            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let running = tokio::spawn(bound.run(async {
                let _ = stopped.await;
            }));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (status, _) = tokio::task::block_in_place(|| http_get(ready, "/healthz/ready"));
                if status == 200 {
                    break;
                }
                assert!(Instant::now() < deadline, "never ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            // Real traffic from a pod through the in-process agent.
            let reports = tokio::task::block_in_place(|| {
                node.pod("client").connect(
                    ECHO_VIP.parse().unwrap(),
                    Connect {
                        count: 4,
                        ..Default::default()
                    },
                )
            });
            let mut names: Vec<String> = reports.iter().map(|r| greeting(r).0).collect();
            names.sort();
            assert_eq!(names, ["be1", "be1", "be2", "be2"], "{reports:?}");
            let admin = addresses.admin;
            let (status, stats) = tokio::task::block_in_place(|| http_get(admin, "/stats"));
            assert_eq!(status, 200);
            let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
            assert!(stats["outbound"]["accepted"].as_u64() >= Some(4), "{stats}");

            stop.send(()).expect("agent running");
            running.await.expect("run task").expect("clean stop");
            assert!(
                !node.pin_root.join("maps").exists(),
                "stopping removes the pins"
            );
            policy_routing::remove()
                .await
                .expect("steer routing removed");
        });
    });
    let _ = std::fs::remove_dir_all(&config_dir);
}
