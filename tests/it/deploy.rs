//! What a deployment relies on: `sse-relay health` (the image's health
//! check) against a real relay, and the Dockerfile, fly.toml and the
//! Kubernetes manifests read as a container engine, Fly and the kubelet
//! would: probe paths that answer as the files expect, the port the relay
//! listens on, a numeric non-root user, and stop timeouts that cover the
//! drain. fly.toml and the manifests are parsed by Python's `tomllib` and
//! PyYAML (`make test` installs PyYAML, and tomli before Python 3.11, when
//! missing).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);

/// What the relay takes to stop after SIGTERM beyond `--drain-seconds`:
/// 2 s for the streams' last bytes and 2 s for the NATS drain (README:
/// "drain + 4 s").
const AFTER_DRAIN_SECS: u64 = 4;

/// Waits (bounded) until `/readyz` answers 503, NATS being gone.
async fn wait_not_ready(addr: &str) {
    wait_until(WAIT, "/readyz answers 503 once NATS is gone", || async {
        try_request(addr, "GET", "/readyz", &[], None, HTTP_TIMEOUT)
            .await
            .is_ok_and(|r| r.status == 503)
    })
    .await;
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// `sse-relay health <args>` with `envs`, bounded.
async fn health(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut full = vec!["health"];
    full.extend_from_slice(args);
    run_relay(&full, envs, WAIT).await
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_passes_against_a_running_relay() {
    within(TEST_LIMIT, "health_passes_against_a_running_relay", async {
        let nats = NatsServer::start().await;
        let relay = Relay::start(&nats.url(), &[], &[]).await;
        let out = health(&["--listen", relay.addr()], &[]).await;
        assert!(out.status.success(), "health: {}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("/healthz: 200"),
            "one line naming the check and its answer: {stdout:?}"
        );

        // As in the image: RELAY_LISTEN on 0.0.0.0, checked on loopback.
        let listen = format!("0.0.0.0:{}", port_of(relay.addr()));
        let out = health(&[], &[("RELAY_LISTEN", &listen)]).await;
        assert!(
            out.status.success(),
            "health via RELAY_LISTEN: {}",
            stderr(&out)
        );

        let url = format!("http://{}/readyz", relay.addr());
        let out = health(&["--url", &url], &[]).await;
        assert!(
            out.status.success(),
            "health --url /readyz: {}",
            stderr(&out)
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_with_a_reason_on_a_closed_port() {
    within(
        TEST_LIMIT,
        "health_fails_with_a_reason_on_a_closed_port",
        async {
            let listen = format!("127.0.0.1:{}", free_port());
            let out = health(&["--listen", &listen], &[]).await;
            assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
            let err = stderr(&out);
            assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
            assert!(
                err.contains("cannot connect") && err.contains(&listen),
                "says what it could not reach: {err:?}"
            );
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_gives_up_after_its_timeout() {
    within(TEST_LIMIT, "health_gives_up_after_its_timeout", async {
        // A listener nobody accepts on: the kernel completes the handshake
        // and nothing ever answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let started = Instant::now();
        let out = health(&["--listen", &addr, "--timeout", "1"], &[]).await;
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no answer within 1s"),
            "{}",
            stderr(&out)
        );
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(5),
            "took {took:?}"
        );
        drop(silent);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_of_readyz_fails_while_nats_is_down() {
    within(
        TEST_LIMIT,
        "health_of_readyz_fails_while_nats_is_down",
        async {
            let mut nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            nats.stop();
            wait_not_ready(relay.addr()).await;
            let url = format!("http://{}/readyz", relay.addr());
            let out = health(&["--url", &url], &[]).await;
            assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
            let err = stderr(&out);
            assert!(
                err.contains("503") && err.contains("not ready"),
                "status and the body's reason: {err:?}"
            );
            // The process itself is up: the liveness check still passes.
            let out = health(&["--listen", relay.addr()], &[]).await;
            assert!(out.status.success(), "health: {}", stderr(&out));
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_refuses_a_url_it_cannot_check() {
    within(TEST_LIMIT, "health_refuses_a_url_it_cannot_check", async {
        for url in ["https://127.0.0.1:8080/healthz", "not a url"] {
            let out = health(&["--url", url], &[]).await;
            assert_eq!(out.status.code(), Some(64), "{url}: {}", stderr(&out));
            assert!(stderr(&out).contains("--url"), "{url}: {}", stderr(&out));
        }
    })
    .await
}

/// fly.toml or a YAML file (all its documents) as JSON, read by Python.
fn parsed(rel: &str) -> Value {
    const SCRIPT: &str = "import json, sys\n\
        kind, path = sys.argv[1], sys.argv[2]\n\
        if kind == 'toml':\n    try:\n        import tomllib\n    except ImportError:\n        import tomli as tomllib\n    data = tomllib.load(open(path, 'rb'))\n\
        else:\n    import yaml\n    data = list(yaml.safe_load_all(open(path)))\n\
        json.dump(data, sys.stdout)\n";
    let kind = if rel.ends_with(".toml") {
        "toml"
    } else {
        "yaml"
    };
    let out = std::process::Command::new("python3")
        .args(["-c", SCRIPT, kind])
        .arg(repo_file(rel))
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 could not parse {rel} (PyYAML: `python3 -m pip install pyyaml`, \
         which `make test` does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every Kubernetes object of deploy/kubernetes/.
fn manifests() -> Vec<Value> {
    let dir = repo_file("deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| match parsed(&format!("deploy/kubernetes/{f}")) {
            Value::Array(docs) => docs,
            v => panic!("{f}: {v}"),
        })
        .collect()
}

fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
}

/// The relay's container in the Deployment.
fn relay_container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

/// `value` of env var `name` in a container spec.
fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

/// Seconds in a Fly duration ("15s") or a plain number.
fn secs(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(s) => s.trim_end_matches('s').parse().unwrap(),
        v => panic!("not a duration: {v}"),
    }
}

/// The Dockerfile's instructions as (keyword, arguments), continuation
/// lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let (kw, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((kw.to_ascii_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

#[test]
fn the_dockerfile_pins_its_images_runs_as_a_numeric_user_and_checks_health() {
    let instructions = dockerfile();
    let all = |kw: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(k, _)| k == kw)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let froms = all("FROM");
    assert_eq!(froms.len(), 2, "a builder and a runtime stage: {froms:?}");
    for from in froms {
        let image = from.split_whitespace().next().unwrap();
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            image.starts_with("docker.io/library/")
                && tag.chars().any(|c| c.is_ascii_digit())
                && tag != "latest",
            "{image}: registry spelled out and a pinned tag (podman has no default registry)"
        );
    }
    let user = all("USER");
    let uid = user.last().expect("a USER").split(':').next().unwrap();
    assert_eq!(uid, "10001", "numeric, so runAsNonRoot can verify it");
    assert_eq!(all("STOPSIGNAL"), ["SIGTERM"]);
    let check = all("HEALTHCHECK");
    assert!(
        check.len() == 1 && check[0].contains(r#"CMD ["sse-relay", "health"]"#),
        "the image has no curl: {check:?}"
    );
    // The image's port is the one it listens on and the one it checks
    // (`health` reads RELAY_LISTEN, as serve does).
    let listen = all("ENV")
        .iter()
        .find_map(|e| e.strip_prefix("RELAY_LISTEN="))
        .expect("ENV RELAY_LISTEN");
    assert_eq!(all("EXPOSE"), [port_of(listen).to_string().as_str()]);
    // The binary CI builds and checks is the one the image ships.
    let build = "cargo build --release --locked";
    assert!(all("RUN").iter().any(|r| r.contains(build)));
    assert!(read(".ci/run").contains(build), ".ci/run builds {build:?}");
    // The stop timeout the file asks for covers the drain.
    let text = read("Dockerfile");
    let stop: u64 = text
        .split("--stop-timeout ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("a `--stop-timeout N` note");
    assert!(stop > sse_relay::config::DEFAULT_DRAIN_SECS + AFTER_DRAIN_SECS);
}

#[test]
fn fly_toml_routes_on_readyz_and_outlasts_the_drain() {
    let fly = parsed("fly.toml");
    let service = &fly["http_service"];
    let checks = service["checks"].as_array().expect("http_service.checks");
    assert!(!checks.is_empty());
    for c in checks {
        assert_eq!(
            c["path"], "/readyz",
            "a machine without NATS gets no browsers"
        );
    }
    let listen = fly["env"]["RELAY_LISTEN"].as_str().unwrap();
    assert_eq!(
        service["internal_port"].as_u64(),
        Some(port_of(listen).into())
    );
    assert_eq!(fly["kill_signal"], "SIGTERM");
    assert!(secs(&fly["kill_timeout"]) > sse_relay::config::DEFAULT_DRAIN_SECS + AFTER_DRAIN_SECS);
    let concurrency = &service["concurrency"];
    assert_eq!(concurrency["type"], "connections");
    assert!(
        concurrency["soft_limit"].as_u64().unwrap() > 1000,
        "Fly's default of 20 would count 20 open streams as a full machine"
    );
}

#[test]
fn kubernetes_manifests_agree_with_the_image_and_the_drain() {
    let objects = manifests();
    let deployment = object(&objects, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&object(&objects, "Service")["spec"]["selector"], labels);
    let pdb = object(&objects, "PodDisruptionBudget");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);

    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 10001, "the Dockerfile's USER");

    let c = relay_container(deployment);
    let port = &c["ports"][0];
    let listen = env_of(c, "RELAY_LISTEN").expect("RELAY_LISTEN");
    assert_eq!(port["containerPort"].as_u64(), Some(port_of(listen).into()));
    for probe in ["livenessProbe", "readinessProbe"] {
        let p = &c[probe]["httpGet"]["port"];
        assert!(
            p == &port["name"] || p == &port["containerPort"],
            "{probe} port {p}"
        );
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let service_port = &object(&objects, "Service")["spec"]["ports"][0]["targetPort"];
    assert!(service_port == &port["name"] || service_port == &port["containerPort"]);

    // SIGTERM comes after preStop; the grace period covers both and the
    // drain.
    let pre_stop = &c["lifecycle"]["preStop"]["exec"]["command"];
    assert_eq!(pre_stop[0], "sleep");
    let pre_stop: u64 = pre_stop[1].as_str().unwrap().parse().unwrap();
    let drain: u64 = env_of(c, "RELAY_DRAIN_SECONDS")
        .map_or(sse_relay::config::DEFAULT_DRAIN_SECS, |v| {
            v.parse().unwrap()
        });
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > pre_stop + drain + AFTER_DRAIN_SECS,
        "grace {grace} s must cover preStop {pre_stop} s + drain {drain} s + after it {AFTER_DRAIN_SECS} s"
    );
}

/// The paths the deploy files probe, as (file, path, is a readiness check).
fn probes() -> Vec<(String, String, bool)> {
    let mut out = vec![("Dockerfile HEALTHCHECK".into(), "/healthz".into(), false)];
    let fly = parsed("fly.toml");
    for c in fly["http_service"]["checks"].as_array().unwrap() {
        out.push(("fly.toml".into(), c["path"].as_str().unwrap().into(), true));
    }
    let objects = manifests();
    let c = relay_container(object(&objects, "Deployment"));
    for (probe, ready) in [("livenessProbe", false), ("readinessProbe", true)] {
        let path = c[probe]["httpGet"]["path"].as_str().unwrap();
        out.push((format!("kubernetes {probe}"), path.into(), ready));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_probe_path_answers_as_its_file_expects() {
    within(
        TEST_LIMIT,
        "every_probe_path_answers_as_its_file_expects",
        async {
            let probes = probes();
            let mut nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &[]).await;
            for (file, path, _) in &probes {
                let r = relay.get(path, &[]).await;
                assert_eq!(r.status, 200, "{file}: GET {path} on a ready relay");
            }
            nats.stop();
            wait_not_ready(relay.addr()).await;
            for (file, path, ready) in &probes {
                let want = if *ready { 503 } else { 200 };
                let r = relay.get(path, &[]).await;
                assert_eq!(r.status, want, "{file}: GET {path} while NATS is down");
            }
        },
    )
    .await
}
