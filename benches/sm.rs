//! The Security Manager's notification path, against a real `warden serve` and the SOL 005
//! NFVO test double.
//!
//! `cargo bench --bench sm` (the `warden` binary is built with the bench profile). Environment:
//! `BENCH_SECONDS` (default 5) per closed-loop case, `BENCH_RATE` (default 2500,5000) and
//! `BENCH_RATE_SECONDS` (default 5) for the open-loop run, `BENCH_REACTIONS` (default 200).
//!
//! 1. Intake: NsLcmOperationOccurrenceNotification bodies (about 1 KB, each a new id) posted
//!    over HTTPS with BASIC authentication, as the NFVO does; each is answered 204 only after
//!    it is durably journaled (group commit, redb `Durability::Immediate`). Closed loop with C
//!    keep-alive connections, then open loop at a fixed offered rate (latency timed from the
//!    moment each request was due). The processor runs meanwhile (batched Query NS).
//! 2. Reaction, FULLY_ACTIVE: the time from posting a notification that a VNF was
//!    instantiated from a package whose checksum differs from the pinned one, to the NFVO
//!    double receiving the first UpdateNS (REMOVE_VNF) for it. The path: auth, parse, Query NS
//!    and package GET (while the journal commit is in flight), the decision commit (which
//!    waits for the journal commit and also journals the first step), POST.
//!
//! Everything runs under target/ (fsync is real); only 127.0.0.1 is contacted; the agent is
//! stopped by its PID.

#[allow(dead_code)]
#[path = "../tests/common/agent.rs"]
mod agent;
#[allow(dead_code)]
#[path = "../tests/common/nfvo.rs"]
mod nfvo;
#[allow(dead_code)]
#[path = "../tests/common/shell.rs"]
mod shell;
#[allow(dead_code)]
#[path = "../tests/common/sm.rs"]
mod sm;
#[allow(dead_code)]
#[path = "../tests/common/softhsm.rs"]
mod softhsm;
#[path = "../tests/common/swtpm.rs"]
mod swtpm;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use nfv_warden::client::{Connection, HttpsClient};
use serde_json::json;
use sm::{SmAgent, SmSetup};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let seconds = env_or("BENCH_SECONDS", 5u64);
    let rates: Vec<u64> = std::env::var("BENCH_RATE")
        .unwrap_or_else(|_| "2500,5000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let rate_seconds = env_or("BENCH_RATE_SECONDS", 5u64);
    let reactions = env_or("BENCH_REACTIONS", 200usize);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    println!("== SM notification intake (durable journal before 204)");
    let mut agent = SmAgent::new(SmSetup {
        mode: "FULLY_ACTIVE",
        ..Default::default()
    });
    agent.nfvo.add_ns("ns-a", "core");
    agent
        .nfvo
        .add_vnf(&["ns-a"], "vnf-2", "vnfd-1", "pkg-good", "profile-2");
    agent.start();
    use_subscription_of(&agent);
    let client = callback_client(&agent);
    for connections in [4usize, 16, 64] {
        let cpu0 = cpu_seconds(&agent);
        let own0 = process_cpu_seconds("self");
        let (count, mut latencies) = runtime.block_on(closed_loop(
            &client,
            connections,
            Duration::from_secs(seconds),
        ));
        latencies.sort_unstable();
        let cpu = cpu_seconds(&agent) - cpu0;
        let own = process_cpu_seconds("self") - own0;
        println!(
            "closed loop c={connections:<3} {:>7.0} notifications/s  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  agent CPU {:.0} us/notification ({:.2} cores; load generator + NFVO double {:.2} cores)",
            count as f64 / seconds as f64,
            pct(&latencies, 50.0),
            pct(&latencies, 99.0),
            pct(&latencies, 100.0),
            cpu * 1e6 / count.max(1) as f64,
            cpu / seconds as f64,
            own / seconds as f64,
        );
    }
    for rate in rates {
        let (sent, mut latencies, late) =
            runtime.block_on(open_loop(&client, rate, Duration::from_secs(rate_seconds)));
        latencies.sort_unstable();
        println!(
            "open loop {rate}/s for {rate_seconds} s: {sent} sent, p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  ({late} started >1 ms late)",
            pct(&latencies, 50.0),
            pct(&latencies, 99.0),
            pct(&latencies, 99.9),
            pct(&latencies, 100.0),
        );
    }
    // The backlog: a tampered VNF announced last is acted on once everything before it is
    // processed.
    let start = Instant::now();
    agent.nfvo.add_vnf(
        &["ns-a"],
        "vnf-marker",
        "vnfd-1",
        "pkg-tampered",
        "profile-m",
    );
    runtime.block_on(post_one(&client, &instantiated("marker", "vnf-marker")));
    let drained = wait_update(&agent, "vnf-marker", Duration::from_secs(600));
    println!(
        "backlog drained (marker acted on) {:.0} ms after the load ended",
        drained.map_or(f64::NAN, |t| (t - start).as_secs_f64() * 1e3)
    );
    println!("agent RSS {} MB", rss_mb(&agent));
    agent.kill9();
    drop(agent);

    println!("== SM reaction, FULLY_ACTIVE: notification -> first UpdateNS");
    let rules = r#"
[[sm.rule]]
on = "package_checksum_mismatch"
action = "terminate"
disable_package = false
erase = true
"#;
    let mut agent = SmAgent::new(SmSetup {
        mode: "FULLY_ACTIVE",
        rules,
        ..Default::default()
    });
    agent.nfvo.add_ns("ns-a", "core");
    agent.start();
    use_subscription_of(&agent);
    let client = callback_client(&agent);
    let mut conn = runtime.block_on(client.connect()).expect("connect");
    let mut reaction = Vec::new();
    // Where the time goes: notification -> Query NS arrives -> package GET arrives -> UpdateNS.
    let mut to_query = Vec::new();
    let mut to_package = Vec::new();
    let mut to_update = Vec::new();
    for i in 0..reactions {
        let vnf = format!("vnf-r{i}");
        agent
            .nfvo
            .add_vnf(&["ns-a"], &vnf, "vnfd-1", "pkg-tampered", "profile-r");
        let body = instantiated(&format!("r{i}"), &vnf);
        let t0 = Instant::now();
        // The NFVO keeps its connection to the callback alive, as SOL 013 clients do.
        runtime.block_on(async {
            assert_eq!(post(&mut conn, body.clone()).await, 204);
        });
        let at = wait_update(&agent, &vnf, Duration::from_secs(10)).expect("UpdateNS");
        reaction.push((at - t0).as_micros() as u64);
        let requests = agent.nfvo.requests();
        let after = |from: Instant, path: &str| {
            requests
                .iter()
                .find(|r| {
                    r.arrived >= from
                        && r.arrived <= at
                        && r.method == "GET"
                        // The recorded path includes the query (`?fields=vnfInstance`).
                        && r.path.split('?').next().is_some_and(|p| p.ends_with(path))
                })
                .map(|r| r.arrived)
        };
        if let Some(query) = after(t0, "/ns_instances") {
            if let Some(package) = after(query, "/vnf_packages/pkg-tampered") {
                to_query.push((query - t0).as_micros() as u64);
                to_package.push((package - query).as_micros() as u64);
                to_update.push((at - package).as_micros() as u64);
            }
        }
        // Let its op occurrence and erasure finish so each sample starts from a quiet agent.
        std::thread::sleep(Duration::from_millis(100));
    }
    reaction.sort_unstable();
    println!(
        "reaction over {reactions} VNFs: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        pct(&reaction, 50.0),
        pct(&reaction, 90.0),
        pct(&reaction, 99.0),
        pct(&reaction, 100.0),
    );
    for (what, samples) in [
        (
            "POST + auth + parse -> Query NS arrives (journal commit alongside)",
            &mut to_query,
        ),
        (
            "Query NS answered + inventory diff -> package GET arrives",
            &mut to_package,
        ),
        (
            "package answered + decision commit -> UpdateNS arrives",
            &mut to_update,
        ),
    ] {
        samples.sort_unstable();
        println!(
            "  {what}: p50 {:.2} ms  p99 {:.2} ms",
            pct(samples, 50.0),
            pct(samples, 99.0)
        );
    }
    let violations = agent.nfvo.violations();
    assert!(violations.is_empty(), "{violations:?}");
}

/// Percentile of sorted microseconds, in ms.
fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn callback_client(agent: &SmAgent) -> HttpsClient {
    HttpsClient::new(
        &format!("https://127.0.0.1:{}", agent.port),
        &agent.dir().join("ca.pem"),
        None,
    )
    .expect("client")
}

fn headers() -> Vec<(&'static str, String)> {
    let basic =
        base64::engine::general_purpose::STANDARD.encode("warden-sm:s3cret-notify-password");
    vec![
        ("content-type", "application/json".into()),
        ("authorization", format!("Basic {basic}")),
        ("version", "2.3.0".into()),
    ]
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// The SM's subscription id at the double: the SM refuses notifications for any other.
static SUBSCRIPTION: Mutex<String> = Mutex::new(String::new());

fn use_subscription_of(agent: &SmAgent) {
    let id = agent
        .nfvo
        .subscriptions()
        .iter()
        .find_map(|s| s["id"].as_str().map(String::from))
        .expect("the SM's subscription");
    *SUBSCRIPTION.lock().unwrap() = id;
}

fn subscription() -> String {
    SUBSCRIPTION.lock().unwrap().clone()
}

/// A RESULT notification about vnf-2 (MODIFY_INFORMATION: no rule fires).
fn routine() -> Vec<u8> {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let changed = json!({"vnfInstanceId": "vnf-2"});
    json!({
        "id": format!("bench-{n}"), "nsInstanceId": "ns-a", "nsLcmOpOccId": format!("op-{n}"),
        "operation": "UPDATE", "notificationType": "NsLcmOperationOccurrenceNotification",
        "subscriptionId": subscription(), "timestamp": "2026-11-26T12:00:00Z",
        "notificationStatus": "RESULT", "operationState": "COMPLETED",
        "isAutomaticInvocation": false,
        "affectedVnf": [{
            "vnfInstanceId": "vnf-2", "vnfdId": "vnfd-1", "vnfProfileId": "profile-2",
            "vnfName": "vnf-2", "changeType": "MODIFY_INFORMATION", "changeResult": "COMPLETED",
            "changedInfo": {"changedVnfInfo": changed}, "changedVnfInfo": changed,
        }],
        "_links": {
            "nsInstance": {"href": "https://nfvo.example/nslcm/v2/ns_instances/ns-a"},
            "nslcmOpOcc": {"href": format!("https://nfvo.example/nslcm/v2/ns_lcm_op_occs/op-{n}")},
            "subscription": {"href": "https://nfvo.example/nslcm/v2/subscriptions/bench"},
        },
    })
    .to_string()
    .into_bytes()
}

fn instantiated(tag: &str, vnf: &str) -> Vec<u8> {
    let changed = json!({"vnfInstanceId": vnf});
    json!({
        "id": format!("inst-{tag}"), "nsInstanceId": "ns-a", "nsLcmOpOccId": format!("op-inst-{tag}"),
        "operation": "INSTANTIATE", "notificationType": "NsLcmOperationOccurrenceNotification",
        "subscriptionId": subscription(), "timestamp": "2026-11-26T12:00:00Z",
        "notificationStatus": "RESULT", "operationState": "COMPLETED",
        "isAutomaticInvocation": false,
        "affectedVnf": [{
            "vnfInstanceId": vnf, "vnfdId": "vnfd-1", "vnfProfileId": "profile-r",
            "vnfName": vnf, "changeType": "INSTANTIATE", "changeResult": "COMPLETED",
            "changedInfo": {"changedVnfInfo": changed}, "changedVnfInfo": changed,
        }],
        "_links": {"nsInstance": {"href": "https://nfvo.example/nslcm/v2/ns_instances/ns-a"}},
    })
    .to_string()
    .into_bytes()
}

async fn post(conn: &mut Connection, body: Vec<u8>) -> u16 {
    conn.request_with("POST", "/sm/v1/notifications", &headers(), body)
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

async fn post_one(client: &HttpsClient, body: &[u8]) {
    let mut conn = client.connect().await.expect("connect");
    assert_eq!(post(&mut conn, body.to_vec()).await, 204);
}

async fn closed_loop(
    client: &HttpsClient,
    connections: usize,
    duration: Duration,
) -> (u64, Vec<u64>) {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let client = client.clone();
        let latencies = latencies.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = client.connect().await.expect("connect");
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let body = routine();
                let t = Instant::now();
                let status = post(&mut conn, body).await;
                assert_eq!(status, 204);
                mine.push(t.elapsed().as_micros() as u64);
            }
            latencies.lock().expect("lock").extend(mine);
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    let all = std::mem::take(&mut *latencies.lock().expect("lock"));
    (all.len() as u64, all)
}

/// Requests due every 1/rate s over a pool of connections; latency from the due time.
async fn open_loop(client: &HttpsClient, rate: u64, duration: Duration) -> (u64, Vec<u64>, u64) {
    let connections = 128;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let late = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let client = client.clone();
        let rx = rx.clone();
        let latencies = latencies.clone();
        let late = late.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = client.connect().await.expect("connect");
            loop {
                let due = { rx.lock().await.recv().await };
                let Some(due) = due else { break };
                if due.elapsed() > Duration::from_millis(1) {
                    late.fetch_add(1, Ordering::Relaxed);
                }
                let status = post(&mut conn, routine()).await;
                assert_eq!(status, 204);
                latencies
                    .lock()
                    .expect("lock")
                    .push(due.elapsed().as_micros() as u64);
            }
        }));
    }
    let start = tokio::time::Instant::now();
    let total = rate * duration.as_secs();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due).await;
        let _ = tx.send(due.into_std());
    }
    drop(tx);
    for t in tasks {
        t.await.expect("worker");
    }
    let all = std::mem::take(&mut *latencies.lock().expect("lock"));
    (total, all, late.load(Ordering::Relaxed))
}

/// When the double received the first UpdateNS removing `vnf`.
fn wait_update(agent: &SmAgent, vnf: &str, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let found = agent.nfvo.requests().into_iter().find(|r| {
            r.method == "POST"
                && r.path.ends_with("/update")
                && r.body["removeVnfInstanceId"][0].as_str() == Some(vnf)
        });
        if let Some(r) = found {
            return Some(r.arrived);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// User + system CPU time of the agent so far.
fn cpu_seconds(agent: &SmAgent) -> f64 {
    agent
        .pid()
        .map_or(0.0, |pid| process_cpu_seconds(&pid.to_string()))
}

/// User + system CPU time of /proc/<pid> ("self" for this process).
fn process_cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime is the 12th, stime 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

fn rss_mb(agent: &SmAgent) -> String {
    agent
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or("n/a".into(), |kb| format!("{}", kb / 1024))
}
