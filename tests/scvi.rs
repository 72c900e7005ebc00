//! Sc-Vi against a real OpenStack (tests/common/openstack.rs: one cloud per test binary, or
//! the one `WARDEN_OPENSTACK` names). Every resource is named `vim-<random>-...` and deleted
//! by the test that made it; other users of the shared cloud are never touched.

mod common;

use std::path::PathBuf;

use common::openstack::Cloud;
use nfv_warden::config::VimConfig;
use nfv_warden::vim::hostmap;
use nfv_warden::vim::{query, Operation, QueryAnswer, QueryFilter, Service, VimClient, VimError};
use serde_json::{json, Value};

/// A unique name prefix for this test's resources.
fn unique(what: &str) -> String {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("random");
    format!("vim-{}-{what}", hex::encode(bytes))
}

/// A secret file that lives as long as the test.
struct Secret {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn secret_file(secret: &str) -> Secret {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("secret");
    std::fs::write(&path, format!("{secret}\n")).expect("write secret");
    Secret { _dir: dir, path }
}

fn keystone_url(cloud: &Cloud) -> String {
    cloud.get("KEYSTONE_URL").to_string()
}

/// `[sm.vim]` with a password, as an operator writes it.
fn password_config(
    cloud: &Cloud,
    user: &str,
    project: &str,
    secret: &Secret,
    extra: &str,
) -> VimConfig {
    let text = format!(
        "auth_url = \"{}\"\nregion = \"RegionOne\"\n{extra}\n[password]\nuser = \"{user}\"\nproject = \"{project}\"\nsecret = {{ file = \"{}\" }}\n",
        keystone_url(cloud),
        secret.path.display()
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

async fn admin_with(extra: &str) -> (VimClient, Secret) {
    let cloud = Cloud::shared();
    let secret = secret_file(cloud.get("OS_PASSWORD"));
    let config = password_config(
        cloud,
        cloud.get("OS_USERNAME"),
        cloud.get("OS_PROJECT_NAME"),
        &secret,
        extra,
    );
    let client = VimClient::connect(&config, None)
        .await
        .unwrap_or_else(|e| panic!("connect as admin: {e}"));
    (client, secret)
}

async fn admin() -> (VimClient, Secret) {
    admin_with("").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_token_catalog_and_microversions() {
    let (vim, _s) = admin().await;
    let info = vim.token_info().await.expect("token info");
    assert_eq!(info.auth_method, "password");
    assert!(!info.project_id.is_empty());
    assert!(info.roles.iter().any(|r| r == "admin"), "{:?}", info.roles);
    for service in [
        Service::Compute,
        Service::Placement,
        Service::Network,
        Service::Volume,
        Service::Image,
        Service::Alarm,
        Service::Identity,
    ] {
        assert!(
            vim.has_service(service).await.unwrap(),
            "{service} missing from {:?}",
            info.endpoints
        );
    }
    // Nova 2.79: hypervisors by UUID with their vcpus (gone in 2.88).
    let hypervisors = vim
        .get(Service::Compute, "/os-hypervisors/detail")
        .await
        .expect("hypervisors");
    let first = &hypervisors["hypervisors"][0];
    assert_eq!(first["id"].as_str().map(|s| s.len()), Some(36), "{first}");
    assert!(first["vcpus"].is_u64(), "{first}");
    // Placement 1.39 answers with generations and the microversion it used.
    let providers = vim
        .get(Service::Placement, "/resource_providers")
        .await
        .expect("providers");
    assert!(
        providers["resource_providers"][0]["generation"].is_u64(),
        "{providers}"
    );
    assert_eq!(vim.tokens_issued(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_keep_status_message_and_service() {
    let (vim, _s) = admin().await;
    let missing = "/servers/00000000-0000-4000-8000-000000000000";
    match vim.get(Service::Compute, missing).await {
        Err(e @ VimError::Refused { status: 404, .. }) => {
            assert_eq!(e.service(), Some(Service::Compute));
            assert!(e.message().contains("could not be found"), "{e}");
            assert!(!e.is_transient());
        }
        other => panic!("expected a 404, got {other:?}"),
    }
    match vim
        .get(
            Service::Network,
            "/v2.0/ports/00000000-0000-4000-8000-000000000000",
        )
        .await
    {
        Err(e @ VimError::Refused { status: 404, .. }) => {
            assert!(e.message().contains("could not be found"), "{e}")
        }
        other => panic!("expected a 404, got {other:?}"),
    }
    // A wrong password: Keystone's 401, said as such.
    let cloud = Cloud::shared();
    let wrong = secret_file("not-the-password");
    let config = password_config(
        cloud,
        cloud.get("OS_USERNAME"),
        cloud.get("OS_PROJECT_NAME"),
        &wrong,
        "",
    );
    match VimClient::connect(&config, None).await {
        Err(
            e @ VimError::Auth {
                status: Some(401), ..
            },
        ) => assert!(e.to_string().contains("auth/tokens"), "{e}"),
        Err(other) => panic!("expected Keystone's 401, got {other}"),
        Ok(_) => panic!("a wrong password was accepted"),
    }
    // A region without endpoints: the token is fine, each service is "not in the catalog".
    let secret = secret_file(cloud.get("OS_PASSWORD"));
    let mut config = password_config(
        cloud,
        cloud.get("OS_USERNAME"),
        cloud.get("OS_PROJECT_NAME"),
        &secret,
        "",
    );
    config.region = Some("Nowhere".into());
    let lost = VimClient::connect(&config, None)
        .await
        .expect("token without endpoints");
    match lost.get(Service::Compute, "/servers").await {
        Err(e @ VimError::NoEndpoint { .. }) => {
            assert!(e.to_string().contains("region Nowhere"), "{e}")
        }
        other => panic!("expected NoEndpoint, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_renewed_once() {
    let (vim, _s) = admin().await;
    let (other, _s2) = admin().await;
    vim.get(Service::Compute, "/flavors")
        .await
        .expect("flavors");
    assert_eq!(vim.tokens_issued(), 1);
    let token = vim.token().await.expect("token");
    other
        .revoke_token(&token)
        .await
        .expect("revoke the first client's token");
    // The revoked token is refused with 401 (Keystone checks revocations on validation);
    // the client renews once and the query succeeds.
    // Asked of Keystone itself: the other services' keystonemiddleware may cache a token's
    // validation for minutes (token_cache_time), Keystone never does.
    let projects = vim
        .get(Service::Identity, "/auth/projects")
        .await
        .expect("projects after revocation");
    assert!(projects["projects"].is_array());
    assert_eq!(vim.tokens_issued(), 2);
    // Its own revocation at shutdown: the next call authenticates again.
    vim.revoke().await.expect("revoke own token");
    vim.get(Service::Identity, "/auth/projects")
        .await
        .expect("projects after own revocation");
    assert_eq!(vim.tokens_issued(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_credential_auth() {
    let (vim, _s) = admin().await;
    let info = vim.token_info().await.unwrap();
    let name = unique("appcred");
    let created = vim
        .post(
            Service::Identity,
            &format!("/users/{}/application_credentials", info.user_id),
            &json!({"application_credential": {"name": name, "roles": [{"name": "reader"}]}}),
        )
        .await
        .expect("create an application credential")
        .expect("a body");
    let id = created["application_credential"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let secret = secret_file(
        created["application_credential"]["secret"]
            .as_str()
            .expect("secret"),
    );
    let text = format!(
        "auth_url = \"{}\"\n[application_credential]\nid = \"{id}\"\nsecret = {{ file = \"{}\" }}\n",
        keystone_url(Cloud::shared()),
        secret.path.display()
    );
    let config: VimConfig = toml::from_str(&text).expect("config");
    let outcome = async {
        let reader = VimClient::connect(&config, None).await?;
        let rinfo = reader.token_info().await?;
        assert_eq!(rinfo.auth_method, "application_credential");
        assert_eq!(rinfo.project_id, info.project_id);
        assert_eq!(rinfo.roles, vec!["reader".to_string()]);
        reader.get(Service::Compute, "/servers/detail").await?;
        Ok::<_, VimError>(())
    }
    .await;
    vim.delete(
        Service::Identity,
        &format!("/users/{}/application_credentials/{id}", info.user_id),
    )
    .await
    .expect("delete the application credential");
    outcome.expect("an application-credential session");
    // Deleted: Keystone refuses it.
    match VimClient::connect(&config, None).await {
        // Keystone answers 404 "Could not find Application Credential" (Zed), or 401.
        Err(
            e @ VimError::Auth {
                status: Some(401 | 404),
                ..
            },
        ) => {
            assert!(
                e.to_string().contains(&id) || e.status() == Some(401),
                "{e}"
            )
        }
        Err(other) => panic!("expected Keystone's refusal of a deleted credential, got {other}"),
        Ok(_) => panic!("a deleted application credential was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_gives_the_complete_list() {
    // Pages of 2: Neutron's absolute `networks_links` and Glance's relative `next`.
    let (vim, _s) = admin_with("page_size = 2").await;
    let tag = unique("page");
    let mut networks = Vec::new();
    let mut images = Vec::new();
    let made = async {
        for i in 0..5 {
            let n = vim
                .post(Service::Network, "/v2.0/networks", &json!({"network": {"name": format!("{tag}-{i}")}}))
                .await?
                .expect("network body");
            let id = n["network"]["id"].as_str().expect("id").to_string();
            networks.push(id.clone());
            vim.put(Service::Network, &format!("/v2.0/networks/{id}/tags/{tag}"), &json!({})).await?;
            let image = vim
                .post(Service::Image, "/v2/images", &json!({"name": format!("{tag}-{i}"), "tags": [tag], "container_format": "bare", "disk_format": "raw", "visibility": "private"}))
                .await?
                .expect("image body");
            images.push(image["id"].as_str().expect("id").to_string());
        }
        let listed = vim.get_all(Service::Network, &format!("/v2.0/networks?tags={tag}"), "networks").await?;
        let mut ids: Vec<String> = listed.iter().map(|n| n["id"].as_str().unwrap_or_default().to_string()).collect();
        ids.sort();
        let mut want = networks.clone();
        want.sort();
        assert_eq!(ids, want, "all 5 networks over 3 pages");
        let listed = vim.get_all(Service::Image, &format!("/v2/images?tag={tag}"), "images").await?;
        let mut ids: Vec<String> = listed.iter().map(|n| n["id"].as_str().unwrap_or_default().to_string()).collect();
        ids.sort();
        let mut want = images.clone();
        want.sort();
        assert_eq!(ids, want, "all 5 images over 3 pages");
        Ok::<_, VimError>(())
    }
    .await;
    for id in &networks {
        vim.delete(Service::Network, &format!("/v2.0/networks/{id}"))
            .await
            .expect("delete network");
    }
    for id in &images {
        vim.delete(Service::Image, &format!("/v2/images/{id}"))
            .await
            .expect("delete image");
    }
    made.expect("paging");
}

/// Polls `check` until it gives `Some`, at most `bound` (a failure guard, not a timing test).
async fn until<T, F, Fut>(what: &str, bound: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > bound {
            panic!("{what}: not reached within {bound:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// What the query test made, deleted whatever happens.
#[derive(Default, Clone)]
struct Made {
    flavor: Option<String>,
    network: Option<String>,
    servers: Vec<String>,
    volume: Option<String>,
    aggregate: Option<(u64, String)>,
    alarm: Option<String>,
}

async fn clean(vim: &VimClient, made: &Made) {
    for s in &made.servers {
        let _ = vim.delete(Service::Compute, &format!("/servers/{s}")).await;
    }
    if let Some(v) = &made.volume {
        let _ = vim.delete(Service::Volume, &format!("/volumes/{v}")).await;
    }
    if let Some(a) = &made.alarm {
        let _ = vim.delete(Service::Alarm, &format!("/v2/alarms/{a}")).await;
    }
    if let Some((id, host)) = &made.aggregate {
        let _ = vim
            .post(
                Service::Compute,
                &format!("/os-aggregates/{id}/action"),
                &json!({"remove_host": {"host": host}}),
            )
            .await;
        let _ = vim
            .delete(Service::Compute, &format!("/os-aggregates/{id}"))
            .await;
    }
    for s in &made.servers {
        let path = format!("/servers/{s}");
        until(
            "server deleted",
            std::time::Duration::from_secs(180),
            || async {
                match vim.get(Service::Compute, &path).await {
                    Err(VimError::Refused { status: 404, .. }) => Some(()),
                    _ => None,
                }
            },
        )
        .await;
    }
    if let Some(n) = &made.network {
        let _ = vim
            .delete(Service::Network, &format!("/v2.0/networks/{n}"))
            .await;
    }
    if let Some(f) = &made.flavor {
        let _ = vim.delete(Service::Compute, &format!("/flavors/{f}")).await;
    }
}

async fn answer(vim: &VimClient, op: Operation, filter: &QueryFilter) -> QueryAnswer {
    query(vim, op, filter)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", op.name()))
}

fn provided(a: &QueryAnswer) -> &Value {
    a.result()
        .unwrap_or_else(|| panic!("expected an answer, got {a:?}"))
}

fn not_provided(a: &QueryAnswer, why: &str) {
    match a {
        QueryAnswer::NotProvided { reason, .. } => assert!(reason.contains(why), "{reason}"),
        other => panic!("expected NOT_PROVIDED ({why}), got {other:?}"),
    }
}

/// Every query of IFA 033 8.2.1 against the real cloud, checked against what the test made:
/// two VNFC servers (one per fake host), a network, a volume, a flavour, an aggregate with a
/// location, an Aodh alarm. Then location and the host map over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_against_the_cloud() {
    let cloud = Cloud::shared();
    let (vim, _s) = admin_with("[host_locations]\nfakehost2 = \"lab/rack-2\"").await;
    let tag = unique("q");
    let made = std::sync::Arc::new(tokio::sync::Mutex::new(Made::default()));
    let body = {
        let vim = vim.clone();
        let made = made.clone();
        let image_id = cloud.get("IMAGE_ID").to_string();
        tokio::spawn(async move { queries_body(vim, made, tag, image_id).await })
    };
    let outcome = body.await;
    let made = made.lock().await.clone();
    clean(&vim, &made).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn queries_body(
    vim: VimClient,
    made: std::sync::Arc<tokio::sync::Mutex<Made>>,
    tag: String,
    image_id: String,
) {
    let info = vim.token_info().await.unwrap();
    // A flavour, a network with a subnet, an aggregate holding fakehost1 with a location.
    let flavor = vim
        .post(Service::Compute, "/flavors", &json!({"flavor": {"name": format!("{tag}-flavor"), "ram": 128, "vcpus": 1, "disk": 1}}))
        .await
        .unwrap()
        .unwrap();
    let flavor_id = flavor["flavor"]["id"].as_str().unwrap().to_string();
    made.lock().await.flavor = Some(flavor_id.clone());
    let net = vim
        .post(
            Service::Network,
            "/v2.0/networks",
            &json!({"network": {"name": format!("{tag}-net")}}),
        )
        .await
        .unwrap()
        .unwrap();
    let net_id = net["network"]["id"].as_str().unwrap().to_string();
    made.lock().await.network = Some(net_id.clone());
    vim.post(Service::Network, "/v2.0/subnets", &json!({"subnet": {"network_id": net_id, "ip_version": 4, "cidr": "10.99.7.0/24", "name": format!("{tag}-sub")}}))
        .await
        .unwrap();
    let agg = vim
        .post(
            Service::Compute,
            "/os-aggregates",
            &json!({"aggregate": {"name": format!("{tag}-agg")}}),
        )
        .await
        .unwrap()
        .unwrap();
    let agg_id = agg["aggregate"]["id"].as_u64().unwrap();
    made.lock().await.aggregate = Some((agg_id, "fakehost1".into()));
    vim.post(
        Service::Compute,
        &format!("/os-aggregates/{agg_id}/action"),
        &json!({"add_host": {"host": "fakehost1"}}),
    )
    .await
    .unwrap();
    vim.post(
        Service::Compute,
        &format!("/os-aggregates/{agg_id}/action"),
        &json!({"set_metadata": {"metadata": {"location": format!("{tag}-site/room-1")}}}),
    )
    .await
    .unwrap();
    // Two VNFC servers, one on each fake host (admin: "zone:host" forces the host).
    let mut servers = Vec::new();
    for host in ["fakehost1", "fakehost2"] {
        let s = vim
            .post(
                Service::Compute,
                "/servers",
                &json!({"server": {"name": format!("{tag}-{host}"), "imageRef": image_id, "flavorRef": flavor_id,
                    "networks": [{"uuid": net_id}], "availability_zone": format!("nova:{host}"), "tags": [tag.clone()]}}),
            )
            .await
            .unwrap()
            .unwrap();
        let id = s["server"]["id"].as_str().unwrap().to_string();
        made.lock().await.servers.push(id.clone());
        servers.push(id);
    }
    let volume = vim
        .post(
            Service::Volume,
            "/volumes",
            &json!({"volume": {"size": 1, "name": format!("{tag}-vol")}}),
        )
        .await
        .unwrap()
        .unwrap();
    let volume_id = volume["volume"]["id"].as_str().unwrap().to_string();
    made.lock().await.volume = Some(volume_id.clone());
    let alarm = vim
        .post(Service::Alarm, "/v2/alarms", &json!({"name": format!("{tag}-alarm"), "type": "event",
            "event_rule": {"event_type": "compute.instance.update", "query": []}, "alarm_actions": ["log://"]}))
        .await
        .unwrap()
        .unwrap();
    let alarm_id = alarm["alarm_id"].as_str().unwrap().to_string();
    made.lock().await.alarm = Some(alarm_id.clone());
    for id in &servers {
        let path = format!("/servers/{id}");
        until(
            "server ACTIVE",
            std::time::Duration::from_secs(240),
            || async {
                let s = vim.get(Service::Compute, &path).await.ok()?;
                let status = s["server"]["status"].as_str()?;
                assert_ne!(status, "ERROR", "{s}");
                (status == "ACTIVE" && s["server"]["OS-EXT-STS:task_state"].is_null()).then_some(())
            },
        )
        .await;
    }
    until(
        "volume available",
        std::time::Duration::from_secs(120),
        || async {
            let v = vim
                .get(Service::Volume, &format!("/volumes/{volume_id}"))
                .await
                .ok()?;
            (v["volume"]["status"] == "available").then_some(())
        },
    )
    .await;

    let none = QueryFilter::default();
    let mut seen = std::collections::HashSet::new();
    let mut ask = |op: Operation| {
        seen.insert(op);
        op
    };

    // IFA 005
    let cap = answer(&vim, ask(Operation::ComputeCapacity), &none).await;
    assert!(matches!(
        cap,
        QueryAnswer::Provided {
            scope: "ALL_PROJECTS",
            ..
        }
    ));
    let cap = provided(&cap);
    for host in ["fakehost1", "fakehost2"] {
        let h = cap["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["hostId"] == host)
            .unwrap_or_else(|| panic!("{host} in {cap}"));
        let vcpu = &h["capacityInformation"]["VCPU"];
        assert!(vcpu["allocatedCapacity"].as_f64().unwrap() >= 1.0, "{h}");
        assert_eq!(
            vcpu["availableCapacity"].as_f64().unwrap(),
            vcpu["totalCapacity"].as_f64().unwrap() - vcpu["allocatedCapacity"].as_f64().unwrap()
        );
        assert!(
            h["capacityInformation"]["MEMORY_MB"]["allocatedCapacity"]
                .as_f64()
                .unwrap()
                >= 128.0,
            "{h}"
        );
    }
    let zones = answer(&vim, ask(Operation::ComputeZones), &none).await;
    let zones = provided(&zones)["resourceZone"].as_array().unwrap().clone();
    let nova = zones
        .iter()
        .find(|z| z["zoneId"] == "nova")
        .expect("zone nova");
    assert_eq!(nova["zoneState"], "AVAILABLE");
    assert!(strs(&nova["zoneProperty"]["hosts"]).contains(&"fakehost2".to_string()));
    let aggz = zones
        .iter()
        .find(|z| z["zoneName"] == format!("{tag}-agg"))
        .expect("our aggregate as a zone");
    assert_eq!(aggz["metadata"]["location"], format!("{tag}-site/room-1"));
    assert_eq!(
        strs(&aggz["zoneProperty"]["hosts"]),
        vec!["fakehost1".to_string()]
    );
    let pop = answer(&vim, ask(Operation::NfviPopCompute), &none).await;
    let pop = provided(&pop);
    assert_eq!(pop["nfviPopId"], "RegionOne");
    let hosts: Vec<String> = pop["computeHosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["hostId"].as_str().unwrap().to_string())
        .collect();
    assert!(
        hosts.contains(&"fakehost1".into()) && hosts.contains(&"fakehost2".into()),
        "{hosts:?}"
    );
    assert!(pop["computeHosts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["hypervisorType"] == "fake" && h["zoneId"] == "nova"));
    let ncap = answer(&vim, ask(Operation::NetworkCapacity), &none).await;
    let ours = provided(&ncap)["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["networkResourceId"] == net_id.as_str())
        .cloned()
        .expect("our network's capacity");
    assert_eq!(
        ours["capacityInformation"]["IP_ADDRESS"]["totalCapacity"],
        253.0
    );
    assert!(
        ours["capacityInformation"]["IP_ADDRESS"]["allocatedCapacity"]
            .as_f64()
            .unwrap()
            >= 2.0,
        "{ours}"
    );
    let npop = answer(&vim, ask(Operation::NfviPopNetwork), &none).await;
    assert!(strs(&provided(&npop)["extensions"]).contains(&"segment".to_string()));
    assert!(!provided(&npop)["networkTypes"]
        .as_array()
        .unwrap()
        .is_empty());
    not_provided(&answer(&vim, ask(Operation::Nfp), &none).await, "sfc");
    let spop = answer(&vim, ask(Operation::NfviPopStorage), &none).await;
    assert!(!provided(&spop)["storagePools"]
        .as_array()
        .unwrap()
        .is_empty());
    let sz = answer(&vim, ask(Operation::StorageZones), &none).await;
    assert!(provided(&sz)["resourceZone"]
        .as_array()
        .unwrap()
        .iter()
        .any(|z| z["zoneState"] == "AVAILABLE"));
    for op in [Operation::StorageQuotaPop, Operation::StorageQuota] {
        let q = answer(&vim, ask(op), &none).await;
        let q = provided(&q);
        assert_eq!(q["resourceGroupId"], info.project_id.as_str());
        assert!(
            q["virtualStorageQuota"]["numVolumes"]["inUse"]
                .as_u64()
                .unwrap()
                >= 1,
            "{q}"
        );
        assert!(
            q["virtualStorageQuota"]["storageSize"]["inUse"]
                .as_u64()
                .unwrap()
                >= 1,
            "{q}"
        );
    }
    for op in [
        Operation::ComputeHostReservation,
        Operation::ComputeReservations,
        Operation::NetworkReservations,
        Operation::StorageReservations,
    ] {
        not_provided(&answer(&vim, ask(op), &none).await, "Blazar");
    }

    // IFA 006
    let images = answer(&vim, ask(Operation::Images), &none).await;
    assert!(provided(&images)["softwareImageInformation"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["id"] == image_id.as_str()));
    let one = answer(
        &vim,
        ask(Operation::Image),
        &QueryFilter {
            id: Some(image_id.clone()),
            ..QueryFilter::default()
        },
    )
    .await;
    assert_eq!(
        provided(&one)["softwareImageInformation"]["id"],
        image_id.as_str()
    );
    assert!(provided(&one)["softwareImageInformation"]["diskFormat"].is_string());
    let on1 = answer(
        &vim,
        ask(Operation::ComputeResources),
        &QueryFilter {
            host: Some("fakehost1".into()),
            ..QueryFilter::default()
        },
    )
    .await;
    let vc = provided(&on1)["virtualCompute"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["computeId"] == servers[0].as_str())
        .cloned()
        .expect("server 1 on fakehost1");
    assert_eq!(vc["hostId"], "fakehost1");
    assert_eq!(vc["zoneId"], "nova");
    assert_eq!(vc["flavourId"], format!("{tag}-flavor"));
    assert_eq!(vc["vcImageId"], image_id.as_str());
    assert_eq!(vc["virtualCpu"]["numVirtualCpu"], 1);
    assert_eq!(vc["virtualMemory"]["virtualMemSize"], 128);
    assert_eq!(vc["operationalState"], "ENABLED");
    assert_eq!(
        vc["virtualNetworkInterface"][0]["networkId"],
        net_id.as_str()
    );
    assert!(vc["virtualNetworkInterface"][0]["ipAddress"][0]
        .as_str()
        .unwrap()
        .starts_with("10.99.7."));
    assert!(provided(&on1)["virtualCompute"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["hostId"] == "fakehost1"));
    let s2 = answer(
        &vim,
        Operation::ComputeResources,
        &QueryFilter {
            id: Some(servers[1].clone()),
            ..QueryFilter::default()
        },
    )
    .await;
    assert_eq!(provided(&s2)["virtualCompute"][0]["hostId"], "fakehost2");
    let cri = answer(&vim, ask(Operation::ComputeResourceInfo), &none).await;
    assert!(provided(&cri)["virtualComputeResourceInformation"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["computeResourceTypeId"] == flavor_id.as_str()));
    let fl = answer(&vim, ask(Operation::ComputeFlavours), &none).await;
    let f = provided(&fl)["virtualComputeFlavour"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["flavourId"] == flavor_id.as_str())
        .cloned()
        .expect("our flavour");
    assert_eq!(
        (
            f["virtualCpu"]["numVirtualCpu"].clone(),
            f["virtualMemory"]["virtualMemSize"].clone()
        ),
        (json!(1), json!(128))
    );
    let nr = answer(
        &vim,
        ask(Operation::NetworkResources),
        &QueryFilter {
            id: Some(net_id.clone()),
            ..QueryFilter::default()
        },
    )
    .await;
    let vn = &provided(&nr)["virtualNetwork"][0];
    assert_eq!(vn["networkResourceName"], format!("{tag}-net"));
    let mut owners = strs(&json!(vn["networkPort"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ownerId"].clone())
        .collect::<Vec<_>>()));
    owners.sort();
    let mut want = servers.clone();
    want.sort();
    assert_eq!(owners, want);
    let nri = answer(&vim, ask(Operation::NetworkResourceInfo), &none).await;
    assert!(
        provided(&nri)["virtualNetworkResourceInformation"]
            .as_array()
            .unwrap()
            .len()
            >= 3
    );
    let sr = answer(
        &vim,
        ask(Operation::StorageResources),
        &QueryFilter {
            id: Some(volume_id.clone()),
            ..QueryFilter::default()
        },
    )
    .await;
    let vs = &provided(&sr)["virtualStorage"][0];
    assert_eq!(
        (
            vs["storageName"].clone(),
            vs["sizeOfStorage"].clone(),
            vs["operationalState"].clone()
        ),
        (json!(format!("{tag}-vol")), json!(1), json!("ENABLED"))
    );
    let all_volumes = answer(&vim, Operation::StorageResources, &none).await;
    assert!(provided(&all_volumes)["virtualStorage"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["storageId"] == volume_id.as_str()));
    let sri = answer(&vim, ask(Operation::StorageResourceInfo), &none).await;
    assert!(!provided(&sri)["virtualStorageResourceInformation"]
        .as_array()
        .unwrap()
        .is_empty());
    not_provided(
        &answer(&vim, ask(Operation::PmJobs), &none).await,
        "Gnocchi",
    );
    // Aodh without Gnocchi has no threshold alarms; the answer is the (true) empty list.
    let th = answer(&vim, ask(Operation::Thresholds), &none).await;
    assert!(provided(&th)["threshold"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["thresholdId"] != alarm_id.as_str()));
    let cq = answer(&vim, ask(Operation::ComputeQuota), &none).await;
    assert!(
        provided(&cq)["virtualComputeQuota"]["numVcInstances"]["inUse"]
            .as_u64()
            .unwrap()
            >= 2,
        "{cq:?}"
    );
    assert!(provided(&cq)["virtualComputeQuota"]["numVCPUs"]["limit"].is_i64());
    let nq = answer(&vim, ask(Operation::NetworkQuota), &none).await;
    assert!(
        provided(&nq)["virtualNetworkQuota"]["numPorts"]["inUse"]
            .as_u64()
            .unwrap()
            >= 2,
        "{nq:?}"
    );
    not_provided(
        &answer(&vim, ask(Operation::Policies), &none).await,
        "Congress",
    );
    let subs = answer(&vim, ask(Operation::Subscriptions), &none).await;
    let sub = provided(&subs)["subscriptionInfo"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subscriptionId"] == alarm_id.as_str())
        .cloned()
        .expect("our alarm as a subscription");
    // Aodh stores "log://" normalised as "log:".
    assert!(
        sub["callbackUri"][0].as_str().unwrap().starts_with("log:"),
        "{sub}"
    );
    assert_eq!(
        sub["filter"]["rule"]["event_type"],
        "compute.instance.update"
    );
    assert_eq!(seen.len(), Operation::ALL.len(), "every operation asked");

    // Location (Sc-Vi.Telem.002): HostID, ZoneID, aggregate, physical location.
    let mut host_locations = std::collections::BTreeMap::new();
    host_locations.insert("fakehost2".to_string(), "lab/rack-2".to_string());
    let locations = hostmap::locations(&vim, &host_locations)
        .await
        .expect("locations");
    let l1 = locations
        .iter()
        .find(|l| l.server_id == servers[0])
        .expect("server 1 located");
    assert_eq!(
        (l1.host_id.as_deref(), l1.zone_id.as_deref()),
        (Some("fakehost1"), Some("nova"))
    );
    assert_eq!(
        l1.physical_location.as_deref(),
        Some(format!("{tag}-site/room-1").as_str())
    );
    assert_eq!(
        l1.location_source.as_deref(),
        Some(format!("aggregate:{tag}-agg").as_str())
    );
    assert!(l1.aggregates.iter().any(|a| a.name == format!("{tag}-agg")));
    let l2 = locations
        .iter()
        .find(|l| l.server_id == servers[1])
        .expect("server 2 located");
    assert_eq!(l2.host_id.as_deref(), Some("fakehost2"));
    assert_eq!(
        (
            l2.physical_location.as_deref(),
            l2.location_source.as_deref()
        ),
        (Some("lab/rack-2"), Some("host_locations"))
    );

    // Host map: the NFVO's view (a VNF with two VNFCs on our servers, one whose server is gone).
    let vnf = format!("{tag}-vnf");
    let ns: Vec<nfv_warden::sol::NsInstance> = serde_json::from_value(json!([{"id": format!("{tag}-ns"), "vnfInstance": [
        {"id": vnf, "instantiationState": "INSTANTIATED", "instantiatedVnfInfo": {"vnfcResourceInfo": [
            {"id": "vnfc-1", "vduId": "VDU1", "computeResource": {"resourceId": servers[0], "vimLevelResourceType": "OS::Nova::Server"}},
            {"id": "vnfc-2", "vduId": "VDU1", "computeResource": {"resourceId": servers[1]}},
            {"id": "vnfc-3", "vduId": "VDU2", "computeResource": {"resourceId": "00000000-0000-4000-8000-000000000000"}}]}}]}]))
    .unwrap();
    let map = hostmap::join(&ns, &locations);
    assert_eq!(
        map.host_of_vnf(&vnf),
        vec!["fakehost1".to_string(), "fakehost2".to_string()]
    );
    assert!(map.vnfs_on_host("fakehost1").contains(&vnf));
    assert!(map.vnfs_on_host("fakehost2").contains(&vnf));
    let unplaced = map.unplaced();
    assert_eq!(unplaced.len(), 1);
    assert!(unplaced[0]
        .unplaced
        .as_deref()
        .unwrap()
        .contains("not at this VIM"));
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

/// Least rights: a user with only the `reader` role on the project. What needs admin fails
/// with the VIM's 403 and its message (a clear error, never an empty or partial answer);
/// the rest answers. The README's rights table is this test's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_user_gets_clear_refusals() {
    let cloud = Cloud::shared();
    let (vim, _s) = admin().await;
    let info = vim.token_info().await.unwrap();
    let name = unique("reader");
    let password = unique("pw");
    let user = vim
        .post(
            Service::Identity,
            "/users",
            &json!({"user": {"name": name, "password": password, "domain_id": "default"}}),
        )
        .await
        .expect("create user")
        .expect("user body");
    let user_id = user["user"]["id"].as_str().unwrap().to_string();
    let outcome = async {
        let roles = vim.get(Service::Identity, "/roles?name=reader").await?;
        let role = roles["roles"][0]["id"]
            .as_str()
            .expect("reader role")
            .to_string();
        vim.put(
            Service::Identity,
            &format!("/projects/{}/users/{user_id}/roles/{role}", info.project_id),
            &json!({}),
        )
        .await?;
        let secret = secret_file(&password);
        let config = password_config(cloud, &name, cloud.get("OS_PROJECT_NAME"), &secret, "");
        let reader = VimClient::connect(&config, None).await?;
        assert_eq!(reader.token_info().await?.roles, vec!["reader".to_string()]);
        let mut table = Vec::new();
        for op in Operation::ALL {
            let filter = match op {
                Operation::Image => QueryFilter {
                    id: Some(cloud.get("IMAGE_ID").into()),
                    ..QueryFilter::default()
                },
                _ => QueryFilter::default(),
            };
            let line = match query(&reader, op, &filter).await {
                Ok(QueryAnswer::Provided { scope, .. }) => {
                    // Without admin, lists are the project's own: the answer says so.
                    assert_eq!(scope, "OWN_PROJECT");
                    "answered".to_string()
                }
                Ok(QueryAnswer::NotProvided { .. }) => "not provided".to_string(),
                Err(e) => {
                    // A refusal is the VIM's own, with its status and message.
                    assert!(matches!(e.status(), Some(403)), "{}: {e}", op.name());
                    assert!(
                        !e.message().is_empty() && e.message() != "(no message)",
                        "{}: {e}",
                        op.name()
                    );
                    format!("refused: {e}")
                }
            };
            table.push((op, line));
        }
        for (op, line) in &table {
            eprintln!("reader\t{}\t{line}", op.name());
        }
        let of = |op: Operation| {
            table
                .iter()
                .find(|(o, _)| *o == op)
                .map(|(_, l)| l.clone())
                .unwrap()
        };
        // Admin-only in Nova's default policy: hypervisors (NFVI-PoP compute information).
        assert!(
            of(Operation::NfviPopCompute).starts_with("refused"),
            "{}",
            of(Operation::NfviPopCompute)
        );
        assert!(
            of(Operation::NfviPopCompute).contains("os-hypervisors"),
            "{}",
            of(Operation::NfviPopCompute)
        );
        // Readable by a reader.
        for op in [
            Operation::ComputeFlavours,
            Operation::Images,
            Operation::Image,
            Operation::ComputeQuota,
        ] {
            assert_eq!(of(op), "answered", "{}", op.name());
        }
        Ok::<_, VimError>(())
    }
    .await;
    vim.delete(Service::Identity, &format!("/users/{user_id}"))
        .await
        .expect("delete the reader user");
    outcome.expect("reader session");
}

/// `warden sm vim ...` and `sm status` through a running agent's admin socket: a VNF whose
/// VNFC runs on a server the test booted on fakehost2, as the NFVO (double) reports it.
#[test]
fn the_cli_over_the_admin_socket() {
    use common::sm::{SmAgent, SmSetup};
    let cloud = Cloud::shared();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (vim, _s) = runtime.block_on(admin());
    let tag = unique("cli");
    let server = runtime.block_on(async {
        let flavors = vim
            .get_all(Service::Compute, "/flavors/detail", "flavors")
            .await
            .unwrap();
        let flavor = flavors
            .iter()
            .min_by_key(|f| f["ram"].as_u64().unwrap_or(u64::MAX))
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let s = vim
            .post(
                Service::Compute,
                "/servers",
                &json!({"server": {"name": format!("{tag}-vnfc"), "imageRef": cloud.get("IMAGE_ID"),
                "flavorRef": flavor, "networks": "none", "availability_zone": "nova:fakehost2"}}),
            )
            .await
            .unwrap()
            .unwrap();
        s["server"]["id"].as_str().unwrap().to_string()
    });
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(until(
            "server ACTIVE",
            std::time::Duration::from_secs(240),
            || async {
                let s = vim
                    .get(Service::Compute, &format!("/servers/{server}"))
                    .await
                    .ok()?;
                assert_ne!(s["server"]["status"], "ERROR", "{s}");
                (s["server"]["status"] == "ACTIVE").then_some(())
            },
        ));
        let mut sm = SmAgent::new(SmSetup::default());
        let secret = sm.dir().join("vim-password");
        std::fs::write(&secret, format!("{}\n", cloud.get("OS_PASSWORD"))).unwrap();
        let mut config = std::fs::read_to_string(&sm.agent.config).unwrap();
        config += &format!(
            "\n[sm.vim]\nauth_url = \"{}\"\nregion = \"RegionOne\"\n[sm.vim.password]\nuser = \"{}\"\nproject = \"{}\"\nsecret = {{ file = \"{}\" }}\n",
            cloud.get("KEYSTONE_URL"),
            cloud.get("OS_USERNAME"),
            cloud.get("OS_PROJECT_NAME"),
            secret.display()
        );
        std::fs::write(&sm.agent.config, config).unwrap();
        let vnf = format!("{tag}-vnf");
        sm.nfvo.add_ns("ns-vim", "ns-vim");
        sm.nfvo
            .add_vnf(&["ns-vim"], &vnf, "vnfd-1", "pkg-good", "profile-1");
        sm.nfvo.set_vnfc_resources(&vnf, json!([{"id": "vnfc-1", "vduId": "VDU1", "computeResource": {"resourceId": server, "vimLevelResourceType": "OS::Nova::Server"}}]));
        sm.start();

        let hosts = sm.sm_json(&["vim", "hosts", "--json"]);
        let h2 = hosts["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["hostId"] == "fakehost2")
            .cloned()
            .expect("fakehost2");
        assert!(strs(&h2["vnfInstanceIds"]).contains(&vnf), "{h2}");
        let text = sm.sm(&["vim", "hosts"]);
        assert!(
            text.lines()
                .any(|l| l.starts_with("fakehost2\t") && l.contains(&vnf)),
            "{text}"
        );
        let servers = sm.sm_json(&["vim", "servers", "--vnf", &vnf, "--json"]);
        assert_eq!(servers["hosts"], json!(["fakehost2"]));
        assert_eq!(servers["vnfcs"][0]["location"]["serverId"], server.as_str());
        let zones = sm.sm_json(&["vim", "zones", "--json"]);
        assert!(zones["result"]["resourceZone"]
            .as_array()
            .unwrap()
            .iter()
            .any(|z| z["zoneId"] == "nova"));
        let capacity = sm.sm_json(&["vim", "capacity", "--host", "fakehost2", "--json"]);
        assert!(
            capacity["result"]["hosts"][0]["capacityInformation"]["VCPU"]["allocatedCapacity"]
                .as_f64()
                .unwrap()
                >= 1.0,
            "{capacity}"
        );
        let quotas = sm.sm_json(&["vim", "quotas", "--json"]);
        assert!(
            quotas["compute-quota"]["result"]["virtualComputeQuota"]["numVcInstances"]["inUse"]
                .as_u64()
                .unwrap()
                >= 1,
            "{quotas}"
        );
        let nfp = sm.sm_json(&["vim", "query", "nfp", "--json"]);
        assert_eq!(nfp["answer"], "NOT_PROVIDED");
        let image = sm.sm_json(&[
            "vim",
            "query",
            "image",
            "--id",
            cloud.get("IMAGE_ID"),
            "--json",
        ]);
        assert_eq!(
            image["result"]["softwareImageInformation"]["id"],
            cloud.get("IMAGE_ID")
        );
        let status = sm.sm_json(&["status", "--json"]);
        assert!(
            status["vim"]["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["hostId"] == "fakehost2" && strs(&h["vnfInstanceIds"]).contains(&vnf)),
            "{}",
            status["vim"]
        );
        assert!(status["vim"]["zones"]
            .as_array()
            .unwrap()
            .iter()
            .any(|z| z["zoneId"] == "nova"));
        // Bad input: one line with its cause.
        for (args, cause) in [
            (
                vec!["sm", "vim", "query", "no-such-op"],
                "no query operation 'no-such-op'",
            ),
            (
                vec!["sm", "vim", "servers", "--vnf", "unknown-vnf"],
                "unknown-vnf has no VNFC",
            ),
        ] {
            let out = sm.agent.run(&args);
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(cause) && err.trim().lines().count() == 1,
                "{err}"
            );
        }
    }));
    runtime.block_on(async {
        let _ = vim
            .delete(Service::Compute, &format!("/servers/{server}"))
            .await;
    });
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

/// A loopback TCP relay to `target` that can be taken down and brought back on the same port.
struct Relay {
    port: u16,
    target: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(target: &str) -> Relay {
        let mut relay = Relay {
            port: 0,
            target: target.to_string(),
            task: None,
        };
        relay.up().await;
        relay
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind the relay");
        self.port = listener.local_addr().unwrap().port();
        let target = self.target.clone();
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Stops accepting (the listener is dropped: connections are refused).
    async fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Keystone unreachable when the SM first needs the VIM: a clear, transient error; once it
/// is back the same link connects, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keystone_unreachable_then_back() {
    let cloud = Cloud::shared();
    let keystone = cloud.get("KEYSTONE_URL");
    let authority = keystone
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut relay = Relay::start(&authority).await;
    relay.down().await;
    let secret = secret_file(cloud.get("OS_PASSWORD"));
    let mut config = password_config(
        cloud,
        cloud.get("OS_USERNAME"),
        cloud.get("OS_PROJECT_NAME"),
        &secret,
        "timeout_seconds = 60",
    );
    config.auth_url = format!("http://127.0.0.1:{}/v3", relay.port);
    let link = nfv_warden::vim::VimLink::new(config, None);
    match link.client().await {
        Err(e @ VimError::Auth { status: None, .. }) => {
            assert!(e.is_transient(), "{e}");
            assert!(
                e.to_string().contains(&format!("127.0.0.1:{}", relay.port)),
                "{e}"
            );
        }
        Err(other) => panic!("expected an unreachable Keystone, got {other}"),
        Ok(_) => panic!("connected through a relay that is down"),
    }
    relay.up().await;
    let vim = link
        .client()
        .await
        .expect("Keystone back: the same link connects");
    vim.get(Service::Compute, "/flavors")
        .await
        .expect("a query");
    relay.down().await;
}
