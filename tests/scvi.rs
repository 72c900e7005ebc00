//! Sc-Vi against a real OpenStack (tests/common/openstack.rs: one cloud per test binary, or
//! the one `WARDEN_OPENSTACK` names). Every resource is named `vim-<random>-...` and deleted
//! by the test that made it; other users of the shared cloud are never touched.

mod common;

use std::path::PathBuf;

use common::openstack::Cloud;
use nfv_warden::config::VimConfig;
use nfv_warden::vim::{Service, VimClient, VimError};
use serde_json::json;

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
