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
    let _serial = host_tests();
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

    // 1. Live migration off fakehost1 (once nobody else's server is on either host: both
    // are emptied in turn).
    a_host_of_our_own(cloud, &os, &["fakehost1"], &[]);
    a_host_of_our_own(cloud, &os, &["fakehost2"], &[]);
    let a = boot_on(cloud, &os, &format!("{name}-a"), "fakehost1");
    cleanup.servers.push(a.clone());
    // Again right before the action: another user's server may have come meanwhile
    // (then wait until it is gone).
    a_host_of_our_own(cloud, &os, &["fakehost1"], &cleanup.servers);
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
    // Again right before the action: another user's server may have come meanwhile
    // (then wait until it is gone).
    a_host_of_our_own(cloud, &os, &["fakehost2"], &cleanup.servers);
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

// ---------------------------------------------------------------------------------------
// Host actions that terminate VNFs through the NFVO (HOST_OUT_OF_USE --terminate, the
// SecEnforce.003 same-host option), against the real cloud and the strict SOL 005 double.

/// Tests of this binary that boot servers on chosen hosts or take a host out of use run one
/// at a time: a host action migrates every server on its host.
static HOST_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn host_tests() -> std::sync::MutexGuard<'static, ()> {
    HOST_TESTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the double says the VNFs' servers are at (SOL 005 `vimId`).
const VIM_ID: &str = "openstack-RegionOne";

/// Only the termination rule: a VNF from a package whose checksum is not the pinned one is
/// terminated without options (REMOVE_VNF from each NS, nothing else), so the double's
/// requests are exactly the terminations.
const TERMINATE_TAMPERED: &str = r#"
[[sm.rule]]
on = "package_checksum_mismatch"
action = "terminate"
"#;

/// An SM in `mode` on the cloud (`[sm.vim]`, `[sm.hosts]` with this test's aggregate and
/// `terminate_same_host`), not yet started.
fn vim_sm(cloud: &Cloud, mode: &str, aggregate: &str, same_host: bool) -> SmAgent {
    std::env::set_var("WARDEN_TEST_HOOKS", "1");
    let sm = SmAgent::new(SmSetup {
        mode,
        rules: TERMINATE_TAMPERED,
        ..SmSetup::default()
    });
    let extra =
        vim_config(cloud, sm.dir(), aggregate) + &format!("terminate_same_host = {same_host}\n");
    let mut config = std::fs::read_to_string(&sm.agent.config).expect("config");
    config += &extra;
    std::fs::write(&sm.agent.config, config).expect("config");
    sm
}

/// (NS, VNF) of every REMOVE_VNF the double accepted (202), in order, and every other
/// update or PATCH it received (there must be none).
fn removals(sm: &SmAgent) -> (Vec<(String, String)>, Vec<String>) {
    let mut removed = Vec::new();
    let mut other = Vec::new();
    for (ns, body, _, status) in sm.updates() {
        if body["updateType"] == "REMOVE_VNF" && status == 202 {
            for vnf in body["removeVnfInstanceId"].as_array().into_iter().flatten() {
                removed.push((ns.clone(), vnf.as_str().unwrap_or_default().to_string()));
            }
        } else {
            other.push(format!("{ns} {status} {body}"));
        }
    }
    for p in sm.patches() {
        other.push(format!("PATCH {} {}", p.path, p.body));
    }
    (removed, other)
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    sorted(
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    )
}

/// Wait (generously: the machine is shared) until the action is in `state`.
fn wait_state(sm: &SmAgent, id: &str, state: &str) -> Value {
    let mut last = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while std::time::Instant::now() < deadline {
        last = sm.action(id);
        if let Some(a) = &last {
            if a["state"] == state {
                return a.clone();
            }
            // Another final state will not change: fail now, with the action.
            if matches!(
                a["state"].as_str(),
                Some("FAILED" | "CANCELLED" | "COMPLETED")
            ) {
                panic!("action {id} ended {} instead of {state}: {a:#}", a["state"]);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("action {id} did not reach {state}: {last:#?}");
}

fn no_violations(sm: &SmAgent) {
    let v = sm.nfvo.violations();
    assert!(v.is_empty(), "SOL 005 schema violations: {v:#?}");
}

/// The servers of the same-host tests: `bad` (the offending VNF) and `peer` on fakehost1,
/// `peer` also on fakehost2 with `far` there, and `ghost`, whose VNFC names a server this
/// VIM does not have.
struct SameHostScene {
    bad: String,
    peer: String,
    far: String,
    ghost: String,
    servers: [String; 4],
}

impl SameHostScene {
    fn boot(cloud: &Cloud, os: &Os, name: &str) -> (SameHostScene, Vec<String>) {
        let s_bad = boot_on(cloud, os, &format!("{name}-bad"), "fakehost1");
        let s_peer1 = boot_on(cloud, os, &format!("{name}-peer1"), "fakehost1");
        let s_peer2 = boot_on(cloud, os, &format!("{name}-peer2"), "fakehost2");
        let s_far = boot_on(cloud, os, &format!("{name}-far"), "fakehost2");
        let created = vec![
            s_bad.clone(),
            s_peer1.clone(),
            s_peer2.clone(),
            s_far.clone(),
        ];
        (
            SameHostScene {
                bad: format!("{name}-vnf-bad"),
                peer: format!("{name}-vnf-peer"),
                far: format!("{name}-vnf-far"),
                ghost: format!("{name}-vnf-ghost"),
                servers: [s_bad, s_peer1, s_peer2, s_far],
            },
            created,
        )
    }

    /// The NSs and the good VNFs (before the SM starts): `peer` in two NSs, neither of them
    /// `bad`'s: the two terminations run at once, and an NFVO refuses (409) a second
    /// operation on an NS while one is in progress, which would make the requests the
    /// double sees depend on timing.
    fn inventory(&self, sm: &SmAgent) {
        let [_, s_peer1, s_peer2, s_far] = &self.servers;
        sm.nfvo.add_ns("ns-core", "core");
        sm.nfvo.add_ns("ns-edge", "edge");
        sm.nfvo.add_ns("ns-peer", "peer");
        sm.nfvo.add_vnf(
            &["ns-edge", "ns-peer"],
            &self.peer,
            "vnfd-1",
            "pkg-good",
            "profile-peer",
        );
        sm.nfvo.set_vnfc_servers(
            &self.peer,
            VIM_ID,
            &[("peer-vnfc-1", s_peer1), ("peer-vnfc-2", s_peer2)],
        );
        sm.nfvo
            .add_vnf(&["ns-core"], &self.far, "vnfd-1", "pkg-good", "profile-far");
        sm.nfvo
            .set_vnfc_servers(&self.far, VIM_ID, &[("far-vnfc-1", s_far)]);
        sm.nfvo.add_vnf(
            &["ns-core"],
            &self.ghost,
            "vnfd-1",
            "pkg-good",
            "profile-ghost",
        );
        // A server id this VIM does not have: absent from the VIM's list is no evidence of
        // being on any host.
        sm.nfvo.set_vnfc_servers(
            &self.ghost,
            VIM_ID,
            &[("ghost-vnfc-1", "00000000-0000-4000-8000-00000000dead")],
        );
    }

    /// The offending VNF appears from the tampered package on fakehost1 and the NFVO tells
    /// the SM: its rule terminates it.
    fn offend(&self, sm: &SmAgent) {
        sm.nfvo.add_vnf(
            &["ns-core"],
            &self.bad,
            "vnfd-1",
            "pkg-tampered",
            "profile-bad",
        );
        sm.nfvo
            .set_vnfc_servers(&self.bad, VIM_ID, &[("bad-vnfc-1", &self.servers[0])]);
        sm.nfvo.notify_lcm("ns-core", &self.bad, "INSTANTIATE");
    }
}

/// SecEnforce.003 same-host option in the three modes: FULLY_ACTIVE terminates (through
/// the NFVO) exactly the other VNFs with a server on the offending VNF's host, once each
/// and from every NS holding them; SEMI_ACTIVE terminates the offending VNF and only
/// records the same-host action; PASSIVE records both and sends nothing.
#[test]
fn the_same_host_option_terminates_exactly_the_other_vnfs_on_that_host() {
    let _serial = host_tests();
    let cloud = Cloud::shared();
    let os = Os::admin(cloud);
    let name = format!("hostact-{}", unique());
    let mut cleanup = HostCleanup {
        cloud,
        os: &os,
        aggregate: format!("{name}-quarantine"),
        servers: Vec::new(),
    };
    let (scene, created) = SameHostScene::boot(cloud, &os, &name);
    cleanup.servers.extend(created);

    // FULLY_ACTIVE: enforced.
    let mut sm = vim_sm(cloud, "FULLY_ACTIVE", &cleanup.aggregate, true);
    scene.inventory(&sm);
    sm.start();
    scene.offend(&sm);
    let same = wait_state(&sm, &format!("same-host:{}", scene.bad), "COMPLETED");
    assert_eq!(same["kind"], "SAME_HOST_TERMINATE", "{same:#}");
    assert_eq!(same["host"], "fakehost1", "{same:#}");
    let steps = same["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 1, "{same:#}");
    assert_eq!(steps[0]["kind"]["op"], "terminateVnf");
    assert_eq!(steps[0]["kind"]["vnfInstanceId"], scene.peer.as_str());
    assert_eq!(steps[0]["attempts"], 1, "{same:#}");
    wait_state(&sm, &format!("terminate:{}", scene.bad), "COMPLETED");
    let peer = wait_state(&sm, &format!("terminate:{}", scene.peer), "COMPLETED");
    assert_eq!(peer["trigger"], format!("same-host:{}", scene.bad));
    let (removed, other) = removals(&sm);
    assert_eq!(
        sorted(removed),
        pairs(&[
            ("ns-core", &scene.bad),
            ("ns-edge", &scene.peer),
            ("ns-peer", &scene.peer),
        ]),
        "exactly the offending VNF and the other VNF on its host, from every NS"
    );
    assert!(other.is_empty(), "{other:#?}");
    assert!(sm.nfvo.vnf_in_ns("ns-core", &scene.far));
    assert!(sm.nfvo.vnf_in_ns("ns-core", &scene.ghost));
    // Nothing in the VIM was touched: the NFVO owns VNFs.
    for id in &scene.servers {
        assert_eq!(server(cloud, &os, id)["status"], "ACTIVE");
    }
    no_violations(&sm);
    sm.kill9();

    // SEMI_ACTIVE: SecEnforce.003 is Fully-Active only.
    let mut sm = vim_sm(cloud, "SEMI_ACTIVE", &cleanup.aggregate, true);
    scene.inventory(&sm);
    sm.start();
    scene.offend(&sm);
    wait_state(&sm, &format!("terminate:{}", scene.bad), "COMPLETED");
    let same = wait_state(&sm, &format!("same-host:{}", scene.bad), "RECORDED");
    assert_eq!(
        same["steps"][0]["kind"]["vnfInstanceId"],
        scene.peer.as_str()
    );
    assert_eq!(same["steps"][0]["state"], "PENDING", "{same:#}");
    let (removed, other) = removals(&sm);
    assert_eq!(sorted(removed), pairs(&[("ns-core", &scene.bad)]));
    assert!(other.is_empty(), "{other:#?}");
    assert!(sm.action(&format!("terminate:{}", scene.peer)).is_none());
    no_violations(&sm);
    sm.kill9();

    // PASSIVE: recorded, nothing sent.
    let mut sm = vim_sm(cloud, "PASSIVE", &cleanup.aggregate, true);
    scene.inventory(&sm);
    sm.start();
    scene.offend(&sm);
    wait_state(&sm, &format!("terminate:{}", scene.bad), "RECORDED");
    wait_state(&sm, &format!("same-host:{}", scene.bad), "RECORDED");
    let (removed, other) = removals(&sm);
    assert!(
        removed.is_empty() && other.is_empty(),
        "PASSIVE sent {removed:?} {other:?}"
    );
    no_violations(&sm);
    drop(sm);
    drop(cleanup);
}

/// The same-host action survives kill -9 around its step: (1) journaled with the rule's
/// Terminate, before anything of it was sent; (2) the other VNF's termination journaled
/// (its REMOVE_VNF in flight or not), the step still SENDING; (3) the step ACCEPTED. After
/// each restart the journal is followed: every REMOVE_VNF reaches the NFVO exactly once,
/// nothing is lost.
#[test]
fn the_same_host_action_is_exactly_once_across_kill_9() {
    let _serial = host_tests();
    let cloud = Cloud::shared();
    let os = Os::admin(cloud);
    let name = format!("hostact-{}", unique());
    let mut cleanup = HostCleanup {
        cloud,
        os: &os,
        aggregate: format!("{name}-quarantine"),
        servers: Vec::new(),
    };
    let (scene, created) = SameHostScene::boot(cloud, &os, &name);
    cleanup.servers.extend(created);
    let mut sm = vim_sm(cloud, "FULLY_ACTIVE", &cleanup.aggregate, true);
    scene.inventory(&sm);
    let hook = sm.dir().join("host-pause-after");
    std::fs::write(&hook, "before:TerminateVnf").expect("hook file");
    sm.start();
    scene.offend(&sm);
    let id = format!("same-host:{}", scene.bad);
    // (1) The same-host action is in the journal (with the Terminate, one commit) and its
    // step has not been journaled SENDING: the hook holds it there.
    wait_for("the same-host action", Duration::from_secs(120), || {
        sm.action(&id).is_some()
    });
    let journaled = sm.action(&id).expect("journaled");
    assert_eq!(journaled["steps"][0]["state"], "PENDING", "{journaled:#}");
    sm.kill9();
    // (2) Resumed; killed once the other VNF's termination is journaled (and started: its
    // REMOVE_VNF may be on its way) but the step still says SENDING: after the restart the
    // journaled termination is adopted, not created again.
    let child = format!("terminate:{}", scene.peer);
    std::fs::write(&hook, "journaled:TerminateVnf").expect("hook file");
    sm.start();
    wait_for("the child termination", Duration::from_secs(120), || {
        sm.action(&child).is_some()
    });
    let sending = sm.action(&id).expect("journaled");
    assert_eq!(sending["steps"][0]["state"], "SENDING", "{sending:#}");
    sm.kill9();
    // (3) Resumed; killed right after its step was ACCEPTED.
    std::fs::write(&hook, "TerminateVnf").expect("hook file");
    sm.start();
    wait_for("the step ACCEPTED", Duration::from_secs(120), || {
        sm.action(&id)
            .is_some_and(|a| a["steps"][0]["state"] == "ACCEPTED")
    });
    sm.kill9();
    std::fs::remove_file(&hook).expect("hook file");
    sm.start();
    let done = wait_state(&sm, &id, "COMPLETED");
    assert_eq!(done["steps"][0]["attempts"], 1, "{done:#}");
    assert_eq!(done["steps"][0]["opOccId"], child.as_str(), "{done:#}");
    wait_state(&sm, &format!("terminate:{}", scene.bad), "COMPLETED");
    wait_state(&sm, &child, "COMPLETED");
    let (removed, other) = removals(&sm);
    assert_eq!(
        sorted(removed),
        pairs(&[
            ("ns-core", &scene.bad),
            ("ns-edge", &scene.peer),
            ("ns-peer", &scene.peer),
        ]),
        "each REMOVE_VNF exactly once across two crashes"
    );
    assert!(other.is_empty(), "{other:#?}");
    assert!(sm.nfvo.vnf_in_ns("ns-core", &scene.far));
    assert!(sm.nfvo.vnf_in_ns("ns-core", &scene.ghost));
    no_violations(&sm);
    drop(sm);
    drop(cleanup);
}

/// Whether a server other than `ours` runs on `host` (all projects).
fn others_on(cloud: &Cloud, os: &Os, host: &str, ours: &[String]) -> Vec<String> {
    let all = os.ok(
        "GET",
        &format!("{}/servers/detail?all_tenants=1", cloud.get("NOVA_URL")),
        None,
    );
    all["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["OS-EXT-SRV-ATTR:host"] == host)
        .filter(|s| !ours.iter().any(|o| s["id"] == o.as_str()))
        .map(|s| format!("{} {}", s["id"], s["name"]))
        .collect()
}

/// The first of `hosts` where no server but this test's own runs: the cloud may be shared,
/// and a host action migrates every server on its host, which must never be another user's.
/// Waits for one (bounded; on a cloud of its own, as in CI, there is one at once).
fn a_host_of_our_own(cloud: &Cloud, os: &Os, hosts: &[&str], ours: &[String]) -> String {
    let mut last = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while std::time::Instant::now() < deadline {
        for host in hosts {
            last = others_on(cloud, os, host, ours);
            if last.is_empty() {
                return host.to_string();
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("no host of {hosts:?} is free of other users' servers, which a host action would migrate: {last:?}");
}

/// SecEnforce.004 with the VNFs terminated: PASSIVE records it and sends nothing; then
/// SEMI_ACTIVE (SecEnforce.004 is S and F) disables the host, terminates through the NFVO
/// exactly the VNFs with a server on it (once each, from each NS), migrates the server of
/// no VNF, quarantines the host, and sends nothing for the VNF on the other host or for a
/// VNF whose server the VIM does not list.
#[test]
fn a_host_out_of_use_with_terminate_terminates_exactly_its_vnfs() {
    let _serial = host_tests();
    let cloud = Cloud::shared();
    let os = Os::admin(cloud);
    let name = format!("hostact-{}", unique());
    let aggregate = format!("{name}-quarantine");
    let mut cleanup = HostCleanup {
        cloud,
        os: &os,
        aggregate: aggregate.clone(),
        servers: Vec::new(),
    };
    let reason = format!("warden test {aggregate}");
    // Servers are placed once the host is known: boot on the other host first.
    let probe = a_host_of_our_own(cloud, &os, &["fakehost1", "fakehost2"], &[]);
    let other_host = if probe == "fakehost1" {
        "fakehost2"
    } else {
        "fakehost1"
    };
    let s_b2 = boot_on(cloud, &os, &format!("{name}-b2"), other_host);
    cleanup.servers.push(s_b2.clone());
    let s_c = boot_on(cloud, &os, &format!("{name}-c"), other_host);
    cleanup.servers.push(s_c.clone());
    let s_a = boot_on(cloud, &os, &format!("{name}-a"), &probe);
    cleanup.servers.push(s_a.clone());
    let s_b1 = boot_on(cloud, &os, &format!("{name}-b1"), &probe);
    cleanup.servers.push(s_b1.clone());
    let s_n = boot_on(cloud, &os, &format!("{name}-n"), &probe);
    cleanup.servers.push(s_n.clone());
    let host = probe;
    let (vnf_a, vnf_b, vnf_c, ghost) = (
        format!("{name}-vnf-a"),
        format!("{name}-vnf-b"),
        format!("{name}-vnf-c"),
        format!("{name}-vnf-ghost"),
    );
    let inventory = |sm: &SmAgent| {
        sm.nfvo.add_ns("ns-core", "core");
        sm.nfvo.add_ns("ns-edge", "edge");
        sm.nfvo
            .add_vnf(&["ns-core"], &vnf_a, "vnfd-1", "pkg-good", "profile-a");
        sm.nfvo
            .set_vnfc_servers(&vnf_a, VIM_ID, &[("a-vnfc-1", &s_a)]);
        sm.nfvo.add_vnf(
            &["ns-core", "ns-edge"],
            &vnf_b,
            "vnfd-1",
            "pkg-good",
            "profile-b",
        );
        sm.nfvo
            .set_vnfc_servers(&vnf_b, VIM_ID, &[("b-vnfc-1", &s_b1), ("b-vnfc-2", &s_b2)]);
        sm.nfvo
            .add_vnf(&["ns-edge"], &vnf_c, "vnfd-1", "pkg-good", "profile-c");
        sm.nfvo
            .set_vnfc_servers(&vnf_c, VIM_ID, &[("c-vnfc-1", &s_c)]);
        sm.nfvo
            .add_vnf(&["ns-core"], &ghost, "vnfd-1", "pkg-good", "profile-g");
        sm.nfvo.set_vnfc_servers(
            &ghost,
            VIM_ID,
            &[("g-vnfc-1", "00000000-0000-4000-8000-00000000beef")],
        );
    };
    let request = [
        "host",
        host.as_str(),
        "--out-of-use",
        "--terminate",
        "--reason",
        reason.as_str(),
    ];

    // PASSIVE: recorded only.
    let mut sm = vim_sm(cloud, "PASSIVE", &aggregate, false);
    inventory(&sm);
    sm.start();
    let recorded: Value = serde_json::from_str(&sm.sm(&request)).expect("JSON");
    assert_eq!(recorded["state"], "RECORDED", "{recorded:#}");
    let (removed, other) = removals(&sm);
    assert!(
        removed.is_empty() && other.is_empty(),
        "PASSIVE sent {removed:?} {other:?}"
    );
    assert_eq!(service_on(cloud, &os, &host)["status"], "enabled");
    assert_eq!(
        server(cloud, &os, &s_n)["OS-EXT-SRV-ATTR:host"],
        host.as_str()
    );
    drop(sm);

    // SEMI_ACTIVE: enforced.
    let mut sm = vim_sm(cloud, "SEMI_ACTIVE", &aggregate, false);
    inventory(&sm);
    sm.start();
    // Again right before the action: another user's server may have come meanwhile
    // (then wait until it is gone).
    a_host_of_our_own(cloud, &os, &[host.as_str()], &cleanup.servers);
    let started: Value = serde_json::from_str(&sm.sm(&request)).expect("JSON");
    assert_eq!(started["id"], format!("host:{host}"));
    let action = wait_state(&sm, &format!("host:{host}"), "COMPLETED");
    let ops: Vec<(String, String)> = action["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            assert_eq!(s["state"], "COMPLETED", "{action:#}");
            assert_eq!(s["attempts"], 1, "{action:#}");
            let k = &s["kind"];
            let what = k["vnfInstanceId"]
                .as_str()
                .or(k["server"].as_str())
                .unwrap_or_default();
            (
                k["op"].as_str().unwrap_or_default().to_string(),
                what.to_string(),
            )
        })
        .collect();
    assert_eq!(
        sorted(ops),
        pairs(&[
            ("disableService", ""),
            ("migrateServer", &s_n),
            ("quarantine", ""),
            ("terminateVnf", &vnf_a),
            ("terminateVnf", &vnf_b),
        ]),
        "{action:#}"
    );
    for vnf in [&vnf_a, &vnf_b] {
        let child = wait_state(&sm, &format!("terminate:{vnf}"), "COMPLETED");
        assert_eq!(child["trigger"], format!("host:{host}"));
    }
    let (removed, other) = removals(&sm);
    assert_eq!(
        sorted(removed),
        pairs(&[
            ("ns-core", &vnf_a),
            ("ns-core", &vnf_b),
            ("ns-edge", &vnf_b),
        ]),
        "exactly the VNFs with a server on {host}"
    );
    assert!(other.is_empty(), "{other:#?}");
    assert!(sm.nfvo.vnf_in_ns("ns-edge", &vnf_c));
    assert!(sm.nfvo.vnf_in_ns("ns-core", &ghost));
    let service = service_on(cloud, &os, &host);
    assert_eq!(service["status"], "disabled", "{service}");
    assert_eq!(service["disabled_reason"], reason.as_str());
    let moved = server(cloud, &os, &s_n);
    assert_eq!(moved["status"], "ACTIVE", "{moved}");
    assert_eq!(moved["OS-EXT-SRV-ATTR:host"], other_host, "{moved}");
    // The VNFs' servers are the NFVO's to delete: the SM left them alone.
    for id in [&s_a, &s_b1] {
        assert_eq!(
            server(cloud, &os, id)["OS-EXT-SRV-ATTR:host"],
            host.as_str()
        );
    }
    assert!(aggregate_hosts(cloud, &os, &aggregate).contains(&host));
    no_violations(&sm);
    drop(sm);
    drop(cleanup);
}
