//! Sc-Vi notifications and host-wide enforcement against the real OpenStack of
//! tests/common/openstack.rs (`WARDEN_OPENSTACK=DIR` reuses a running one): Nova, Neutron and
//! Cinder notifications from its RabbitMQ journaled as SM events; the consumer reconnecting
//! after the broker closed its connection; stale and duplicate messages; a host taken out of
//! use (SecEnforce.004).
//!
//! The cloud may be shared with other test binaries and developers: every resource here has
//! a unique name, is deleted at the end, and the AMQP queue is the test's own (auto-delete).

mod common;

use std::process::Command;
use std::time::Duration;

use common::openstack::Cloud;
use common::sm::{wait_for, SmAgent, SmSetup};
use serde_json::{json, Value};

/// A unique suffix for names in the shared cloud.
fn unique() -> String {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("random");
    format!("{}-{}", std::process::id(), hex::encode(bytes))
}

/// Admin calls to the cloud (curl: the tests need no HTTP client of their own).
struct Os {
    token: String,
}

impl Os {
    fn admin(cloud: &Cloud) -> Os {
        let body = json!({ "auth": {
            "identity": { "methods": ["password"], "password": { "user": {
                "name": cloud.get("OS_USERNAME"), "domain": { "name": "Default" },
                "password": cloud.get("OS_PASSWORD") } } },
            "scope": { "project": { "name": cloud.get("OS_PROJECT_NAME"),
                                    "domain": { "name": "Default" } } } } });
        let out = Command::new("curl")
            .args(["-sS", "-D", "-", "-o", "/dev/null", "-X", "POST"])
            .arg(format!("{}/auth/tokens", cloud.get("OS_AUTH_URL")))
            .args(["-H", "Content-Type: application/json", "-d"])
            .arg(body.to_string())
            .output()
            .expect("curl");
        let headers = String::from_utf8_lossy(&out.stdout).to_string();
        let token = headers
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("x-subject-token:")
                    .then(|| l[16..].trim().to_string())
            })
            .unwrap_or_else(|| panic!("no token from Keystone: {headers}"));
        Os { token }
    }

    /// (status, JSON body or Null).
    fn call(&self, method: &str, url: &str, body: Option<&Value>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-w", "\n%{http_code}", "-X", method, url])
            .args(["-H", &format!("X-Auth-Token: {}", self.token)])
            .args(["-H", "OpenStack-API-Version: compute 2.60, volume 3.0"])
            .args(["-H", "Content-Type: application/json"]);
        if let Some(body) = body {
            cmd.arg("-d").arg(body.to_string());
        }
        let out = cmd.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (
            status.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    fn ok(&self, method: &str, url: &str, body: Option<&Value>) -> Value {
        let (status, v) = self.call(method, url, body);
        assert!((200..300).contains(&status), "{method} {url}: {status} {v}");
        v
    }
}

/// `rabbitmqctl` of the cloud's own RabbitMQ node (its env file names node, cookie home, epmd).
fn rabbitmqctl(cloud: &Cloud, args: &[&str]) -> String {
    let script = format!(
        ". {}/rabbitmq/env.sh && exec /usr/lib/rabbitmq/bin/rabbitmqctl -q \"$@\"",
        cloud.dir.display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The SM's `[sm.telemetry]` against the cloud's RabbitMQ, with its own auto-delete queue.
fn telemetry_config(cloud: &Cloud, dir_password: &std::path::Path, queue: &str) -> String {
    let url = cloud.get("AMQP_URL"); // amqp://user:pw@host:port/
    let rest = url.strip_prefix("amqp://").expect("amqp url");
    let (credentials, host) = rest.split_once('@').expect("credentials in AMQP_URL");
    let (user, password) = credentials.split_once(':').expect("user:password");
    std::fs::write(dir_password, format!("{password}\n")).expect("password file");
    let aodh = dir_password.with_file_name("aodh-secret");
    std::fs::write(&aodh, "aodh-webhook-secret\n").expect("aodh secret");
    format!(
        r#"
[sm.telemetry]
clock_bound_seconds = 300

[sm.telemetry.aodh]
user = "aodh"
secret = {{ file = "{aodh}" }}

[sm.telemetry.amqp]
url = "amqp://{host}"
user = "{user}"
password = {{ file = "{pw}" }}
queue = "{queue}"
durable_queue = false
"#,
        pw = dir_password.display(),
        aodh = aodh.display()
    )
}

fn events(sm: &SmAgent) -> Vec<Value> {
    sm.sm_json(&["events", "--json", "--limit", "100000"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn telemetry(sm: &SmAgent) -> Value {
    sm.sm_json(&["status", "--json"])["telemetry"].clone()
}

fn has_event(events: &[Value], event_type: &str, resource: &str) -> bool {
    events
        .iter()
        .any(|e| e["eventType"] == event_type && e["resourceId"] == resource)
}

/// Publish `body` straight into the SM's own queue (default exchange): nothing reaches the
/// shared exchanges other consumers read.
fn publish(cloud: &Cloud, queue: &str, body: &Value) {
    // The default vhost "/" is "%2f" in an AMQP URI (an empty path is the empty vhost).
    let url = format!(
        "{}%2f",
        cloud.get("AMQP_URL").trim_end_matches('/').to_string() + "/"
    );
    let queue = queue.to_string();
    let payload = body.to_string().into_bytes();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                &payload,
                lapin::BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("published");
        let _ = conn.close(200, "done".into()).await;
    });
}

/// An oslo.messaging 2.0 envelope around a versioned Nova notification.
fn oslo(message_id: &str, timestamp: &str, event_type: &str, uuid: &str) -> Value {
    let inner = json!({
        "message_id": message_id, "publisher_id": "nova-compute:warden-test-host",
        "event_type": event_type, "priority": "INFO", "timestamp": timestamp,
        "payload": { "nova_object.name": "InstanceActionPayload",
                     "nova_object.data": { "uuid": uuid, "host": "warden-test-host", "state": "active" } }
    });
    json!({ "oslo.version": "2.0", "oslo.message": inner.to_string() })
}

fn oslo_time(offset: Duration, past: bool) -> String {
    let now = std::time::SystemTime::now();
    let t = if past { now - offset } else { now + offset };
    humantime::format_rfc3339_micros(t)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

fn start_sm(cloud: &Cloud, queue: &str, extra: &str) -> SmAgent {
    // The crash hook of src/sm/hosts.rs reads its file only with this set; every agent of
    // this binary may have it (the file decides).
    std::env::set_var("WARDEN_TEST_HOOKS", "1");
    let agent_dir = tempfile::tempdir().expect("tmp");
    let pw = agent_dir.path().join("amqp-password");
    let rules = format!(
        "{}{}{}",
        common::sm::TERMINATE_ALL,
        telemetry_config(cloud, &pw, queue),
        extra
    );
    // The password file must outlive the agent: keep the temp dir alive for the test.
    std::mem::forget(agent_dir);
    let mut sm = SmAgent::new(SmSetup {
        rules: &rules,
        ..SmSetup::default()
    });
    sm.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let t = telemetry(&sm);
        if t["connected"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the AMQP consumer did not connect: {t}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sm
}

#[test]
fn nova_neutron_and_cinder_notifications_become_journaled_events() {
    let cloud = Cloud::shared();
    let os = Os::admin(cloud);
    let name = format!("hosts-notify-{}", unique());
    let queue = format!("warden-test-{name}");
    let sm = start_sm(cloud, &queue, "");

    let nova = cloud.get("NOVA_URL");
    let flavor = os.ok("GET", &format!("{nova}/flavors"), None)["flavors"][0]["id"]
        .as_str()
        .expect("a flavor")
        .to_string();
    let server = os.ok(
        "POST",
        &format!("{nova}/servers"),
        Some(&json!({ "server": { "name": name, "flavorRef": flavor,
            "imageRef": cloud.get("IMAGE_ID"), "networks": "none" } })),
    )["server"]["id"]
        .as_str()
        .expect("server id")
        .to_string();
    let neutron = cloud.get("NEUTRON_URL");
    let port = os.ok(
        "POST",
        &format!("{neutron}/v2.0/ports"),
        Some(&json!({ "port": { "name": name, "network_id": cloud.get("NETWORK_ID") } })),
    )["port"]["id"]
        .as_str()
        .expect("port id")
        .to_string();
    let cinder = cloud.get("CINDER_URL");
    let volume = os.ok(
        "POST",
        &format!("{cinder}/{}/volumes", cloud.get("ADMIN_PROJECT_ID")),
        Some(&json!({ "volume": { "name": name, "size": 1 } })),
    )["volume"]["id"]
        .as_str()
        .expect("volume id")
        .to_string();

    let mut seen = Vec::new();
    let wait = std::time::Instant::now() + Duration::from_secs(180);
    while std::time::Instant::now() < wait {
        seen = events(&sm);
        if has_event(&seen, "instance.create.end", &server)
            && has_event(&seen, "port.create.end", &port)
            && has_event(&seen, "volume.create.end", &volume)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // Clean up before asserting: the cloud is shared.
    os.call("DELETE", &format!("{nova}/servers/{server}"), None);
    os.call("DELETE", &format!("{neutron}/v2.0/ports/{port}"), None);
    os.call(
        "DELETE",
        &format!(
            "{cinder}/{}/volumes/{volume}",
            cloud.get("ADMIN_PROJECT_ID")
        ),
        None,
    );
    for (kind, id, interface) in [
        ("instance.create.end", &server, "7.3.2"),
        ("port.create.end", &port, "7.4.2"),
        ("volume.create.end", &volume, "7.5.2"),
    ] {
        let event = seen
            .iter()
            .find(|e| e["eventType"] == kind && e["resourceId"] == id.as_str())
            .unwrap_or_else(|| panic!("no {kind} for {id} in {seen:#?}"));
        assert!(event["suspect"].is_null(), "{event}");
        assert!(
            event["interface"]
                .as_str()
                .unwrap_or("")
                .contains(interface),
            "{event}"
        );
        assert!(event["timestamp"].is_string(), "{event}");
    }
    let server_event = seen
        .iter()
        .find(|e| e["eventType"] == "instance.create.end" && e["resourceId"] == server.as_str())
        .expect("checked above");
    assert_eq!(server_event["source"], "nova");
    assert!(server_event["host"]
        .as_str()
        .is_some_and(|h| h.starts_with("fakehost")));
    // Integrity: each journaled event is in the store's audit chain, and the chain verifies.
    let verify = sm.warden(&["audit", "verify"]);
    assert!(!verify.is_empty());
}

#[test]
fn the_consumer_reconnects_dedupes_and_distrusts_stale_messages() {
    let cloud = Cloud::shared();
    let name = format!("hosts-amqp-{}", unique());
    let queue = format!("warden-test-{name}");
    let sm = start_sm(cloud, &queue, "");
    let before = telemetry(&sm)["connections"].as_u64().expect("connections");

    // The broker closes our connection (as on a broker restart or a network cut).
    let connections = rabbitmqctl(
        cloud,
        &[
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ],
    );
    let ours: Vec<&str> = connections
        .lines()
        .filter(|l| l.contains(&queue))
        .filter_map(|l| l.split('\t').next())
        .collect();
    assert_eq!(ours.len(), 1, "our connection in {connections}");
    rabbitmqctl(
        cloud,
        &["close_connection", ours[0], "warden test: connection cut"],
    );
    wait_for("the consumer to reconnect", Duration::from_secs(60), || {
        let t = telemetry(&sm);
        t["connected"] == true && t["connections"].as_u64().unwrap_or(0) > before
    });

    // A fresh message after the reconnection is journaled, once, however often it comes.
    let fresh_id = format!("{name}-fresh");
    let body = oslo(
        &fresh_id,
        &oslo_time(Duration::ZERO, true),
        "instance.update",
        &format!("{name}-srv"),
    );
    publish(cloud, &queue, &body);
    publish(cloud, &queue, &body);
    wait_for("the duplicate", Duration::from_secs(60), || {
        telemetry(&sm)["duplicates"].as_u64().unwrap_or(0) >= 1
    });
    let all = events(&sm);
    let fresh: Vec<&Value> = all
        .iter()
        .filter(|e| e["messageId"] == fresh_id.as_str())
        .collect();
    assert_eq!(fresh.len(), 1, "{all:#?}");
    assert!(fresh[0]["suspect"].is_null(), "{}", fresh[0]);

    // Two hours old: journaled as suspect, not trusted.
    let stale_id = format!("{name}-stale");
    publish(
        cloud,
        &queue,
        &oslo(
            &stale_id,
            &oslo_time(Duration::from_secs(7200), true),
            "instance.delete.end",
            &format!("{name}-srv"),
        ),
    );
    wait_for("the stale message", Duration::from_secs(60), || {
        events(&sm)
            .iter()
            .any(|e| e["messageId"] == stale_id.as_str())
    });
    let all = events(&sm);
    let stale = all
        .iter()
        .find(|e| e["messageId"] == stale_id.as_str())
        .expect("journaled");
    assert!(
        stale["suspect"]
            .as_str()
            .is_some_and(|s| s.contains("from the local clock")),
        "{stale}"
    );
    assert!(telemetry(&sm)["suspect"].as_u64().unwrap_or(0) >= 1);
}

/// `[sm.vim]` (admin password of the test cloud) and `[sm.hosts]` with a quarantine aggregate
/// of this test's own.
fn vim_config(cloud: &Cloud, dir: &std::path::Path, aggregate: &str) -> String {
    let secret = dir.join("vim-password");
    std::fs::write(&secret, format!("{}\n", cloud.get("OS_PASSWORD"))).expect("secret");
    format!(
        r#"
[sm.vim]
auth_url = "{auth}"
region = "RegionOne"

[sm.vim.password]
user = "{user}"
project = "{project}"
secret = {{ file = "{secret}" }}

[sm.hosts]
quarantine_aggregate = "{aggregate}"
migration_timeout_seconds = 300
"#,
        auth = cloud.get("KEYSTONE_URL"),
        user = cloud.get("OS_USERNAME"),
        project = cloud.get("OS_PROJECT_NAME"),
        secret = secret.display(),
    )
}

/// Boot a server on `host` (admin: availability zone `nova:HOST`) and wait until ACTIVE.
fn boot_on(cloud: &Cloud, os: &Os, name: &str, host: &str) -> String {
    let nova = cloud.get("NOVA_URL");
    let flavor = os.ok("GET", &format!("{nova}/flavors"), None)["flavors"][0]["id"]
        .as_str()
        .expect("a flavor")
        .to_string();
    let id = os.ok(
        "POST",
        &format!("{nova}/servers"),
        Some(&json!({ "server": { "name": name, "flavorRef": flavor,
            "imageRef": cloud.get("IMAGE_ID"), "networks": "none",
            "availability_zone": format!("nova:{host}") } })),
    )["server"]["id"]
        .as_str()
        .expect("server id")
        .to_string();
    wait_for("the server ACTIVE", Duration::from_secs(180), || {
        server(cloud, os, &id)["status"] == "ACTIVE"
    });
    id
}

fn server(cloud: &Cloud, os: &Os, id: &str) -> Value {
    os.call(
        "GET",
        &format!("{}/servers/{id}", cloud.get("NOVA_URL")),
        None,
    )
    .1["server"]
        .clone()
}

fn actions_named(cloud: &Cloud, os: &Os, id: &str, name: &str) -> usize {
    os.ok(
        "GET",
        &format!("{}/servers/{id}/os-instance-actions", cloud.get("NOVA_URL")),
        None,
    )["instanceActions"]
        .as_array()
        .map(|a| a.iter().filter(|x| x["action"] == name).count())
        .unwrap_or(0)
}

/// Undo a host action on the shared cloud: service enabled again, host out of the test's
/// aggregate, the aggregate deleted, servers deleted. Runs even when the test failed (Drop).
struct HostCleanup<'a> {
    cloud: &'a Cloud,
    os: &'a Os,
    aggregate: String,
    servers: Vec<String>,
}

impl Drop for HostCleanup<'_> {
    fn drop(&mut self) {
        let nova = self.cloud.get("NOVA_URL");
        for id in &self.servers {
            self.os
                .call("DELETE", &format!("{nova}/servers/{id}"), None);
        }
        let services = self
            .os
            .call(
                "GET",
                &format!("{nova}/os-services?binary=nova-compute"),
                None,
            )
            .1;
        let aggregates = self
            .os
            .call("GET", &format!("{nova}/os-aggregates"), None)
            .1;
        let ours = aggregates["aggregates"].as_array().and_then(|a| {
            a.iter()
                .find(|x| x["name"] == self.aggregate.as_str())
                .cloned()
        });
        for s in services["services"].as_array().into_iter().flatten() {
            let reason = s["disabled_reason"].as_str().unwrap_or_default();
            // Only what this test disabled (its reason names the test's aggregate).
            if reason.contains(&self.aggregate) {
                self.os.call(
                    "PUT",
                    &format!(
                        "{nova}/os-services/{}",
                        s["id"].as_str().unwrap_or_default()
                    ),
                    Some(&json!({ "status": "enabled" })),
                );
            }
        }
        if let Some(agg) = ours {
            for host in agg["hosts"].as_array().into_iter().flatten() {
                self.os.call(
                    "POST",
                    &format!("{nova}/os-aggregates/{}/action", agg["id"]),
                    Some(&json!({ "remove_host": { "host": host } })),
                );
            }
            self.os.call(
                "DELETE",
                &format!("{nova}/os-aggregates/{}", agg["id"]),
                None,
            );
        }
    }
}

fn service_on(cloud: &Cloud, os: &Os, host: &str) -> Value {
    os.ok(
        "GET",
        &format!(
            "{}/os-services?binary=nova-compute&host={host}",
            cloud.get("NOVA_URL")
        ),
        None,
    )["services"][0]
        .clone()
}

fn aggregate_hosts(cloud: &Cloud, os: &Os, name: &str) -> Vec<String> {
    os.ok(
        "GET",
        &format!("{}/os-aggregates", cloud.get("NOVA_URL")),
        None,
    )["aggregates"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name).cloned())
        .map(|a| {
            a["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// SecEnforce.004 end to end: fakehost1 out of use with its servers live-migrated; then
/// fakehost2 with cold migration, the agent killed (-9) right after the migration request
/// left, and the action completed after the restart with each migration sent once.
/// One test, in sequence: both hosts of the shared cloud are involved, never at once.
#[test]
fn a_host_taken_out_of_use_is_emptied_quarantined_and_resumes_after_kill_9() {
    let cloud = Cloud::shared();
    let os = Os::admin(cloud);
    let name = format!("hosts-ooo-{}", unique());
    let aggregate = format!("warden-quarantine-{name}");
    let dir = tempfile::tempdir().expect("tmp");
    let mut sm = start_sm(
        cloud,
        &format!("warden-test-{name}"),
        &vim_config(cloud, dir.path(), &aggregate),
    );
    let mut cleanup = HostCleanup {
        cloud,
        os: &os,
        aggregate: aggregate.clone(),
        servers: Vec::new(),
    };
    let reason = format!("warden test {aggregate}");

    // 1. Live migration off fakehost1.
    let a = boot_on(cloud, &os, &format!("{name}-a"), "fakehost1");
    cleanup.servers.push(a.clone());
    let out = sm.sm(&[
        "host",
        "fakehost1",
        "--out-of-use",
        "--migrate",
        "--reason",
        &reason,
        "--wait",
    ]);
    let action: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(action["state"], "COMPLETED", "{action:#}");
    assert_eq!(action["kind"], "HOST_OUT_OF_USE");
    let service = service_on(cloud, &os, "fakehost1");
    assert_eq!(service["status"], "disabled", "{service}");
    assert_eq!(service["disabled_reason"], reason.as_str());
    let moved = server(cloud, &os, &a);
    assert_eq!(moved["status"], "ACTIVE");
    assert_eq!(moved["OS-EXT-SRV-ATTR:host"], "fakehost2", "{moved}");
    assert_eq!(actions_named(cloud, &os, &a, "live-migration"), 1);
    assert!(aggregate_hosts(cloud, &os, &aggregate).contains(&"fakehost1".to_string()));
    let listed = sm.sm(&["actions"]);
    assert!(listed.contains("host:fakehost1"), "{listed}");

    // Put fakehost1 back in use before emptying fakehost2 (the servers need a destination).
    os.ok(
        "PUT",
        &format!(
            "{}/os-services/{}",
            cloud.get("NOVA_URL"),
            service["id"].as_str().unwrap()
        ),
        Some(&json!({ "status": "enabled" })),
    );

    // 2. Cold migration off fakehost2, killed right after the request left.
    std::fs::write(sm.dir().join("host-pause-after"), "MigrateServer").expect("hook file");
    let b = boot_on(cloud, &os, &format!("{name}-b"), "fakehost2");
    cleanup.servers.push(b.clone());
    let out = sm.sm(&[
        "host",
        "fakehost2",
        "--out-of-use",
        "--migrate",
        "--cold",
        "--reason",
        &reason,
    ]);
    let started: Value = serde_json::from_str(&out).expect("JSON");
    let id = started["id"].as_str().expect("id").to_string();
    wait_for(
        "the migration step ACCEPTED",
        Duration::from_secs(120),
        || {
            sm.action(&id).is_some_and(|a| {
                a["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["kind"]["op"] == "migrateServer" && s["state"] == "ACCEPTED")
            })
        },
    );
    sm.kill9();
    std::fs::remove_file(sm.dir().join("host-pause-after")).expect("hook file");
    sm.start();
    let done = sm.wait_action(&id, "COMPLETED");
    for s in done["steps"].as_array().into_iter().flatten() {
        assert_eq!(s["state"], "COMPLETED", "{done:#}");
        assert_eq!(s["attempts"], 1, "each step sent once: {done:#}");
    }
    for server_id in [&a, &b] {
        let s = server(cloud, &os, server_id);
        assert_eq!(s["status"], "ACTIVE", "{s}");
        assert_eq!(s["OS-EXT-SRV-ATTR:host"], "fakehost1", "{s}");
    }
    // Exactly once: one cold migration of each server on fakehost2, whatever the crash.
    assert_eq!(actions_named(cloud, &os, &a, "migrate"), 1);
    assert_eq!(actions_named(cloud, &os, &b, "migrate"), 1);
    assert_eq!(service_on(cloud, &os, "fakehost2")["status"], "disabled");
    assert!(aggregate_hosts(cloud, &os, &aggregate).contains(&"fakehost2".to_string()));
    drop(cleanup);
}

/// The Aodh webhook: HTTP basic authentication, then the alarm is a journaled event.
fn post_alarm(sm: &SmAgent, credentials: &str, body: &Value) -> u16 {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(sm.dir().join("ca.pem"))
        .args([
            "-u",
            credentials,
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(body.to_string())
        .arg(format!("https://127.0.0.1:{}/sm/v1/vim/alarms", sm.port))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn aodh_alarms_need_the_webhook_credentials() {
    let cloud = Cloud::shared();
    let name = format!("hosts-aodh-{}", unique());
    let sm = start_sm(cloud, &format!("warden-test-{name}"), "");
    let alarm = json!({ "alarm_id": name, "alarm_name": name, "current": "alarm",
                        "previous": "ok", "reason": "threshold crossed", "severity": "critical" });
    assert_eq!(post_alarm(&sm, "aodh:wrong", &alarm), 401);
    assert!(!events(&sm).iter().any(|e| e["resourceId"] == name.as_str()));
    assert_eq!(post_alarm(&sm, "aodh:aodh-webhook-secret", &alarm), 204);
    let all = events(&sm);
    let event = all
        .iter()
        .find(|e| e["resourceId"] == name.as_str())
        .unwrap_or_else(|| panic!("no alarm event in {all:#?}"));
    assert_eq!(event["eventType"], "alarm.state_transition");
    assert_eq!(event["state"], "alarm");
    assert!(event["interface"].as_str().unwrap_or("").contains("7.6"));
    // The same transition posted again is the same event.
    assert_eq!(post_alarm(&sm, "aodh:aodh-webhook-secret", &alarm), 204);
    let again = events(&sm)
        .iter()
        .filter(|e| e["resourceId"] == name.as_str())
        .count();
    assert_eq!(again, 1);
}
