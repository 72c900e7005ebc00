//! An NFVO test double speaking ETSI GS NFV-SOL 005 v3.7.1: NS LCM (subscriptions, NS
//! instances, UpdateNS, op occs, notifications) and VNF package management, over HTTPS on
//! 127.0.0.1. Everything it sends and receives is checked against the derived JSON Schemas
//! (Draft 4); violations are collected for tests to assert on.
//!
//! Tests are plain `#[test]` fns: the double owns a tokio runtime whose worker threads run
//! the listener, the request handlers and the notification sender.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::shell::sh;

/// NS LCM API version (SOL005 v3.7.1) and VNF package management API version.
const NSLCM_VERSION: &str = "2.3.0";
const VNFPKGM_VERSION: &str = "2.4.0";

pub struct NfvoDouble {
    runtime: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
    dir: PathBuf,
}

/// How the next notifications are delivered (chosen when they are queued).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Delivery {
    #[default]
    Normal,
    /// Not sent at all.
    Drop,
    /// Sent twice.
    Duplicate,
    /// Held until the next one, then sent after it.
    Reorder,
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path including the query.
    pub path: String,
    /// First DNS SAN, else CN, of the verified TLS client certificate.
    pub client_identity: Option<String>,
    pub bearer: Option<String>,
    /// The `Version` header.
    pub version: Option<String>,
    /// The JSON body (a form body as a string); `Null` if none.
    pub body: Value,
    /// What the double answered.
    pub status: u16,
    /// When the whole request had arrived (benchmarks: reaction time).
    pub arrived: Instant,
}

/// A response seen by [`NfvoDouble::client_request`].
#[derive(Clone, Debug)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The JSON body; `Null` if empty, a string if not JSON.
    pub body: Value,
}

impl ClientResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl NfvoDouble {
    /// Make (with openssl in `dir`) an NFVO root, a server certificate for
    /// 127.0.0.1/localhost and an NFVO notification client certificate ("nfvo-notifier",
    /// clientAuth) under the same root; listen HTTPS on 127.0.0.1:0. Client certificates are
    /// requested and verified against `sm_client_ca` but not required; `agent_ca` is what
    /// the double trusts when it calls the SM.
    pub fn start(dir: &Path, sm_client_ca: &Path, agent_ca: &Path) -> NfvoDouble {
        make_pki(dir);
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let mut client_roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(sm_client_ca).expect("sm_client_ca") {
            client_roots
                .add(cert.expect("sm_client_ca"))
                .expect("sm_client_ca");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(client_roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .expect("client verifier");
        let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                chain(&dir.join("nfvo-server.pem")),
                PrivateKeyDer::from_pem_file(dir.join("nfvo-server.key")).expect("server key"),
            )
            .expect("server config");

        let mut agent_roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(agent_ca).expect("agent_ca") {
            agent_roots.add(cert.expect("agent_ca")).expect("agent_ca");
        }
        let mut own_roots = rustls::RootCertStore::empty();
        own_roots
            .add(chain(&dir.join("nfvo-root.pem")).remove(0))
            .expect("own root");
        let client_builder = || {
            rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
        };
        let plain_client = client_builder()
            .with_root_certificates(agent_roots.clone())
            .with_no_client_auth();
        let notifier_client = client_builder()
            .with_root_certificates(agent_roots)
            .with_client_auth_cert(
                chain(&dir.join("nfvo-notifier.pem")),
                PrivateKeyDer::from_pem_file(dir.join("nfvo-notifier.key")).expect("key"),
            )
            .expect("notifier client config");
        let own_client = client_builder()
            .with_root_certificates(own_roots)
            .with_no_client_auth();

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            base: format!("https://127.0.0.1:{port}"),
            port,
            server_tls: Arc::new(server_tls),
            plain_client: Arc::new(plain_client),
            notifier_client: Arc::new(notifier_client),
            own_client: Arc::new(own_client),
            notify_tx,
            tasks: Mutex::new(Vec::new()),
            token_cache: tokio::sync::Mutex::new(HashMap::new()),
            ops_held: tokio::sync::watch::Sender::new(false),
            responses_released: tokio::sync::watch::Sender::new(0),
        });
        {
            let mut state = inner.state.lock().unwrap();
            state.op_duration = Duration::from_millis(50);
            state.page_size = 2;
        }
        runtime.spawn(sender(inner.clone(), notify_rx));
        let double = NfvoDouble {
            runtime: Some(runtime),
            inner,
            dir: dir.to_path_buf(),
        };
        double.listen(listener);
        double
    }

    /// "https://127.0.0.1:PORT", the apiRoot.
    pub fn base(&self) -> String {
        self.inner.base.clone()
    }

    /// The PEM the SM trusts for the NFVO (also the root of the notifier certificate).
    pub fn root_ca(&self) -> PathBuf {
        self.dir.join("nfvo-root.pem")
    }

    /// Register an OAuth2 client; from then on every API request needs a Bearer token from
    /// `POST /oauth2/token`.
    pub fn oauth_client(&self, client_id: &str, secret: &str) {
        self.state()
            .oauth_clients
            .insert(client_id.into(), secret.into());
    }

    pub fn add_package(&self, id: &str, vnfd_id: &str, sha256_hex: &str, enabled: bool) {
        self.state().packages.insert(
            id.into(),
            Package {
                vnfd_id: vnfd_id.into(),
                hash: sha256_hex.into(),
                enabled,
                user_defined: None,
            },
        );
    }

    pub fn add_ns(&self, id: &str, name: &str) {
        self.state().ns.insert(
            id.into(),
            Ns {
                name: name.into(),
                vnfs: Vec::new(),
                snapshots: Vec::new(),
            },
        );
    }

    /// An INSTANTIATED VNF (vnfState STARTED, flavourId "default", one extVirtualLinkInfo)
    /// in each of `ns_ids`.
    pub fn add_vnf(
        &self,
        ns_ids: &[&str],
        vnf_id: &str,
        vnfd_id: &str,
        pkg_id: &str,
        vnf_profile_id: &str,
    ) {
        let mut state = self.state();
        state.vnfs.insert(
            vnf_id.into(),
            Vnf::new(vnf_id, vnfd_id, pkg_id, vnf_profile_id),
        );
        for ns in ns_ids {
            let ns = state.ns.get_mut(*ns).expect("add_ns first");
            if !ns.vnfs.iter().any(|v| v == vnf_id) {
                ns.vnfs.push(vnf_id.into());
            }
        }
    }

    /// Set the VNF's `instantiatedVnfInfo.vnfcResourceInfo` (SOL 005 VnfcResourceInfo list:
    /// `id`, `vduId`, `computeResource.resourceId` = a VIM server id) for the Sc-Vi host map.
    pub fn set_vnfc_resources(&self, vnf_id: &str, vnfcs: Value) {
        let mut state = self.state();
        let vnf = state.vnfs.get_mut(vnf_id).expect("add_vnf first");
        vnf.instance["instantiatedVnfInfo"]["vnfcResourceInfo"] = vnfcs;
    }

    /// The VNF's VNFCs as SOL 005 v3.7.1 structures them for a VIM's servers: the VNF
    /// instance's `vimId`, and per VNFC a VnfcResourceInfo (`id`, `vduId`, `computeResource`
    /// ResourceHandle with `vimId`, `resourceId` = the Nova server id and
    /// `vimLevelResourceType` "OS::Nova::Server"). `vnfcs`: (VNFC id, server id).
    #[allow(dead_code)]
    pub fn set_vnfc_servers(&self, vnf_id: &str, vim_id: &str, vnfcs: &[(&str, &str)]) {
        let list: Vec<Value> = vnfcs
            .iter()
            .map(|(vnfc, server)| {
                json!({
                    "id": vnfc,
                    "vduId": "VDU1",
                    "computeResource": {
                        "vimId": vim_id,
                        "resourceId": server,
                        "vimLevelResourceType": "OS::Nova::Server",
                    },
                })
            })
            .collect();
        self.set_vnfc_resources(vnf_id, Value::Array(list));
        let mut state = self.state();
        let vnf = state.vnfs.get_mut(vnf_id).expect("add_vnf first");
        vnf.instance["vimId"] = json!(vim_id);
    }

    /// Take `vnf_id` out of `ns_id` behind the SM's back (another consumer's REMOVE_VNF); a
    /// VNF in no NS any more is terminated. Tell the SM with [`NfvoDouble::notify_lcm`].
    pub fn remove_vnf(&self, ns_id: &str, vnf_id: &str) {
        let mut state = self.state();
        if let Some(ns) = state.ns.get_mut(ns_id) {
            ns.vnfs.retain(|v| v != vnf_id);
        }
        if !state
            .ns
            .values()
            .any(|ns| ns.vnfs.iter().any(|v| v == vnf_id))
        {
            if let Some(vnf) = state.vnfs.remove(vnf_id) {
                state.terminated.insert(vnf_id.into(), vnf);
            }
        }
    }

    /// The NsInstance as served.
    pub fn ns(&self, id: &str) -> Option<Value> {
        self.state().ns_instance(&self.inner.base, id)
    }

    pub fn vnf_in_ns(&self, ns_id: &str, vnf_id: &str) -> bool {
        self.state()
            .ns
            .get(ns_id)
            .is_some_and(|ns| ns.vnfs.iter().any(|v| v == vnf_id))
    }

    /// The VnfPkgInfo as served.
    pub fn package(&self, id: &str) -> Option<Value> {
        self.state().package_info(&self.inner.base, id)
    }

    /// Send an NsLcmOperationOccurrenceNotification RESULT/COMPLETED about `vnf_id` with
    /// that change type, after recording a matching COMPLETED op occ; the notification id.
    pub fn notify_lcm(&self, ns_id: &str, vnf_id: &str, change_type: &str) -> String {
        let base = &self.inner.base;
        let mut state = self.state();
        let operation = if change_type == "INSTANTIATE" {
            "INSTANTIATE"
        } else {
            "UPDATE"
        };
        let params = match change_type {
            "INSTANTIATE" => json!({"nsFlavourId": "default"}),
            "REMOVE" => json!({"updateType": "REMOVE_VNF", "removeVnfInstanceId": [vnf_id]}),
            "ADD" => json!({"updateType": "ADD_VNF", "addVnfIstance": [{
                "vnfInstanceId": vnf_id,
                "vnfProfileId": state.vnf_any(vnf_id).map(|v| v.profile.clone()).unwrap_or_default(),
            }]}),
            _ => json!({"updateType": "MODIFY_VNF_INFORMATION",
                        "modifyVnfInfoData": [{"vnfInstanceId": vnf_id}]}),
        };
        let op_id = state.next_id("op");
        let now = timestamp();
        let affected = state.affected_vnf(vnf_id, change_type);
        state.op_occs.insert(
            op_id.clone(),
            OpOcc {
                ns_id: ns_id.into(),
                operation: operation.into(),
                state: "COMPLETED".into(),
                params,
                start: now.clone(),
                entered: now,
                affected: vec![affected.clone()],
            },
        );
        let mut notification = op_notification(
            base,
            &state.next_id("notification"),
            ns_id,
            &op_id,
            operation,
            "RESULT",
            "COMPLETED",
        );
        notification["affectedVnf"] = json!([affected]);
        let id = notification["id"].as_str().unwrap_or_default().to_string();
        let delivery = state.delivery;
        drop(state);
        self.queue(notification, delivery);
        id
    }

    /// Send any notification; `subscriptionId` and `_links.subscription` are filled per
    /// matching subscription.
    pub fn notify(&self, notification: Value) {
        let delivery = self.state().delivery;
        self.queue(notification, delivery);
    }

    /// A valid skeleton of `kind` (NsIdentifierCreationNotification,
    /// NsIdentifierDeletionNotification, NsChangeNotification,
    /// NsLcmCapacityShortageNotification, NsLcmOperationOccurrenceNotification) about `ns_id`.
    pub fn notification(&self, kind: &str, ns_id: &str) -> Value {
        let base = &self.inner.base;
        let mut state = self.state();
        let id = state.next_id("notification");
        let ns_link = json!({"href": format!("{base}/nslcm/v2/ns_instances/{ns_id}")});
        match kind {
            "NsIdentifierCreationNotification" | "NsIdentifierDeletionNotification" => json!({
                "id": id, "notificationType": kind, "subscriptionId": "",
                "timestamp": timestamp(), "nsInstanceId": ns_id,
                "_links": {"nsInstance": ns_link},
            }),
            "NsChangeNotification" => {
                let op_id = state.next_id("op");
                // The v3.7.1 schema requires the truncated "lcmOpOccStatusImpactingNsCompon"
                // (a spelling error in SOL005 6.5.2.8); the full name is typed there with the
                // op-name enum, so the status goes into the required, untyped one.
                json!({
                    "id": id, "notificationType": kind, "subscriptionId": "",
                    "timestamp": timestamp(), "nsInstanceId": ns_id,
                    "nsComponentType": "VNF", "nsComponentId": "",
                    "lcmOpOccIdImpactingNsComponent": op_id,
                    "lcmOpNameImpactingNsComponent": "VNF_INSTANTIATE",
                    "lcmOpOccStatusImpactingNsCompon": "COMPLETED",
                    "_links": {"nsInstance": ns_link,
                               "nslcmOpOcc": {"href": format!("{base}/nslcm/v2/ns_lcm_op_occs/{op_id}")}},
                })
            }
            "NsLcmCapacityShortageNotification" => json!({
                "id": id, "notificationType": kind, "subscriptionId": "",
                "timestamp": timestamp(), "status": "LCM_RESOURCES_NOT_AVAILABLE",
                "shortageType": "RESOURCE_SHORTAGE",
                "_links": {"subscription": {"href": ""}},
            }),
            "NsLcmOperationOccurrenceNotification" => {
                let op_id = state.next_id("op");
                op_notification(base, &id, ns_id, &op_id, "UPDATE", "RESULT", "COMPLETED")
            }
            other => panic!("unknown notification type {other}"),
        }
    }

    pub fn set_delivery(&self, delivery: Delivery) {
        self.state().delivery = delivery;
    }

    /// (notification id, status the SM answered; 0 = connection failed), in sending order.
    pub fn deliveries(&self) -> Vec<(String, u16)> {
        self.state().deliveries.clone()
    }

    /// Ids of the notifications dropped (`Delivery::Drop`) so far: the sender has passed them.
    pub fn dropped(&self) -> Vec<String> {
        self.state().dropped.clone()
    }

    /// The deliveries once there are at least `n`, or when `timeout` has passed.
    /// The deliveries once `n` have been made, or whatever arrived by `timeout` (a failure
    /// guard: callers compare what they got).
    pub fn wait_deliveries(&self, n: usize, timeout: Duration) -> Vec<(String, u16)> {
        let deadline = Instant::now() + timeout;
        loop {
            let deliveries = self.deliveries();
            if deliveries.len() >= n || Instant::now() >= deadline {
                return deliveries;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// LccnSubscription as stored.
    pub fn subscriptions(&self) -> Vec<Value> {
        self.state()
            .subscriptions
            .iter()
            .map(|s| s.resource.clone())
            .collect()
    }

    /// The mode the SM announced in its last subscription's callbackUri (`mode=`).
    pub fn announced_mode(&self) -> Option<String> {
        self.state().announced_mode.clone()
    }

    /// Answer ProblemDetails with `status` to the next `times` requests with `method` whose
    /// path contains `path_contains` (still recorded).
    pub fn fail(
        &self,
        method: &str,
        path_contains: &str,
        status: u16,
        times: usize,
        retry_after: Option<u64>,
    ) {
        self.state().faults.push(Fault {
            method: method.into(),
            path: path_contains.into(),
            status,
            times,
            retry_after: retry_after.map(RetryAfter::Seconds),
            oversize: None,
        });
    }

    /// As [`NfvoDouble::fail`], with `Retry-After` in either form.
    pub fn fail_retry(
        &self,
        method: &str,
        path_contains: &str,
        status: u16,
        times: usize,
        retry_after: RetryAfter,
    ) {
        self.state().faults.push(Fault {
            method: method.into(),
            path: path_contains.into(),
            status,
            times,
            retry_after: Some(retry_after),
            oversize: None,
        });
    }

    /// Forget every fault still to be injected ([`NfvoDouble::fail`], [`NfvoDouble::oversize`]).
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Answer 200 with a JSON body of more than `bytes` bytes (an array holding one long
    /// string) to the next `times` requests with `method` whose path contains `path_contains`.
    pub fn oversize(&self, method: &str, path_contains: &str, bytes: usize, times: usize) {
        self.state().faults.push(Fault {
            method: method.into(),
            path: path_contains.into(),
            status: 200,
            times,
            retry_after: None,
            oversize: Some(bytes),
        });
    }

    /// Items per page of every list (default 2: every list of more than two pages).
    pub fn page_size(&self, size: usize) {
        self.state().page_size = size.max(1);
    }

    /// An NFVO starting up: while `true` its lists of NS instances and operation
    /// occurrences are empty and single NS instances and occurrences are unknown (404).
    pub fn set_restarting(&self, restarting: bool) {
        self.state().restarting = restarting;
    }

    /// Leave `operationParams` (and the other `exclude_default` attributes) out of the
    /// operation occurrences in lists, whatever the query asks for.
    pub fn omit_op_params(&self, omit: bool) {
        self.state().omit_op_params = omit;
    }

    /// Record and apply the next `times` matching requests at once, answer after `delay`.
    pub fn delay_response(&self, method: &str, path_contains: &str, delay: Duration, times: usize) {
        self.state().delays.push(Delay {
            method: method.into(),
            path: path_contains.into(),
            delay: Some(delay),
            times,
        });
    }

    /// Record and apply the next `times` matching requests at once, and answer them only
    /// when the test calls release_responses(): "the agent dies waiting for the answer"
    /// without depending on how fast the test kills it.
    #[allow(dead_code)]
    pub fn hold_response(&self, method: &str, path_contains: &str, times: usize) {
        self.state().delays.push(Delay {
            method: method.into(),
            path: path_contains.into(),
            delay: None,
            times,
        });
    }

    /// Answer every response held by hold_response().
    #[allow(dead_code)]
    pub fn release_responses(&self) {
        self.inner.responses_released.send_modify(|n| *n += 1);
    }

    /// How long an UpdateNS op occ stays PROCESSING (default 50 ms).
    pub fn op_duration(&self, duration: Duration) {
        self.state().op_duration = duration;
    }

    /// Hold every UpdateNS op occ in PROCESSING (its effects not applied) until released:
    /// what a test checks "while processing" must not depend on how fast the machine is.
    #[allow(dead_code)]
    pub fn hold_ops(&self, held: bool) {
        self.inner.ops_held.send_replace(held);
    }

    /// Down: drop the listener and every open connection (new connections are refused).
    /// Up: listen again on the same port.
    pub fn set_down(&self, down: bool) {
        if down {
            let tasks = std::mem::take(&mut *self.inner.tasks.lock().unwrap());
            tasks.iter().for_each(AbortHandle::abort);
            // Aborting is asynchronous: wait until the listener is closed for real.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !tasks.iter().all(AbortHandle::is_finished) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        } else if self.inner.tasks.lock().unwrap().is_empty() {
            let listener =
                std::net::TcpListener::bind(("127.0.0.1", self.inner.port)).expect("rebind");
            self.listen(listener);
        }
    }

    /// Schema violations seen, each naming the message and the schema error.
    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    /// A request to the double as a client without a certificate would make it, trusting
    /// [`NfvoDouble::root_ca`]: for tests of the double itself.
    pub fn client_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> ClientResponse {
        let tls = self.inner.own_client.clone();
        self.request_over(tls, method, path, headers, body)
    }

    /// The same, presenting the client certificate `cert_pem` (a chain) with `key_pem`.
    pub fn client_request_with_cert(
        &self,
        cert_pem: &Path,
        key_pem: &Path,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> ClientResponse {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(chain(&self.root_ca()).remove(0))
            .expect("own root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(
                chain(cert_pem),
                PrivateKeyDer::from_pem_file(key_pem).expect("client key"),
            )
            .expect("client config");
        self.request_over(Arc::new(tls), method, path, headers, body)
    }

    fn request_over(
        &self,
        tls: Arc<rustls::ClientConfig>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> ClientResponse {
        let headers = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect::<Vec<_>>();
        let url = format!("{}{path}", self.inner.base);
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let body = body.unwrap_or_default().to_vec();
        let (status, headers, bytes) = self
            .runtime()
            .block_on(send(method, &url, &headers, body, tls))
            .expect("request to the double");
        ClientResponse {
            status,
            headers,
            body: body_value(&bytes),
        }
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime lives until drop")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap()
    }

    fn queue(&self, notification: Value, delivery: Delivery) {
        let _ = self.inner.notify_tx.send((notification, delivery));
    }

    fn listen(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).expect("nonblocking");
        let _guard = self.runtime().enter();
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let inner = self.inner.clone();
        let accept = self.runtime().spawn(accept_loop(inner, listener));
        self.inner.tasks.lock().unwrap().push(accept.abort_handle());
    }
}

impl Drop for NfvoDouble {
    fn drop(&mut self) {
        for task in self.inner.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------------------
// State

struct Inner {
    state: Mutex<State>,
    base: String,
    port: u16,
    server_tls: Arc<rustls::ServerConfig>,
    /// Trusts the agent CA, no client certificate.
    plain_client: Arc<rustls::ClientConfig>,
    /// Trusts the agent CA, presents the nfvo-notifier certificate (TLS_CERT).
    notifier_client: Arc<rustls::ClientConfig>,
    /// Trusts the double's own root (client_request).
    own_client: Arc<rustls::ClientConfig>,
    notify_tx: mpsc::UnboundedSender<(Value, Delivery)>,
    /// The accept loop and the open connections, aborted by set_down(true).
    tasks: Mutex<Vec<AbortHandle>>,
    /// (tokenEndpoint, clientId) -> access token, for OAUTH2_CLIENT_CREDENTIALS.
    token_cache: tokio::sync::Mutex<HashMap<(String, String), String>>,
    /// While true, UpdateNS op occs stay PROCESSING however long they have run (hold_ops).
    ops_held: tokio::sync::watch::Sender<bool>,
    /// Bumped by release_responses(); a held response waits for a bump after it was taken.
    responses_released: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    counter: u64,
    packages: BTreeMap<String, Package>,
    ns: BTreeMap<String, Ns>,
    vnfs: BTreeMap<String, Vnf>,
    /// Terminated VNFs, kept so that later notifications can still describe them.
    terminated: BTreeMap<String, Vnf>,
    subscriptions: Vec<Subscription>,
    op_occs: BTreeMap<String, OpOcc>,
    requests: Vec<Recorded>,
    faults: Vec<Fault>,
    delays: Vec<Delay>,
    op_duration: Duration,
    oauth_clients: HashMap<String, String>,
    tokens: Vec<String>,
    announced_mode: Option<String>,
    delivery: Delivery,
    deliveries: Vec<(String, u16)>,
    /// Ids of the notifications the sender dropped (`Delivery::Drop`), once it did.
    dropped: Vec<String>,
    violations: Vec<String>,
    /// Items per page of every list (SOL 013 5.4.2); `Link: <...>; rel="next"` to the rest.
    page_size: usize,
    /// Starting up: the lists of NS instances and operation occurrences are empty.
    restarting: bool,
    /// Leave `operationParams` (and the other attributes `exclude_default` drops) out of
    /// the NsLcmOpOcc entries of lists even without `exclude_default`, as NFVOs were seen to.
    omit_op_params: bool,
}

struct Package {
    vnfd_id: String,
    hash: String,
    enabled: bool,
    user_defined: Option<Value>,
}

struct Ns {
    name: String,
    vnfs: Vec<String>,
    snapshots: Vec<String>,
}

#[derive(Clone)]
struct Vnf {
    instance: Value,
    profile: String,
}

impl Vnf {
    fn new(id: &str, vnfd_id: &str, pkg_id: &str, profile: &str) -> Vnf {
        Vnf {
            instance: json!({
                "id": id,
                "vnfInstanceName": id,
                "vnfdId": vnfd_id,
                "vnfProvider": "ETSI NFV test double",
                "vnfProductName": format!("product-{vnfd_id}"),
                "vnfSoftwareVersion": "1.0",
                "vnfdVersion": "1.0",
                "vnfPkgId": pkg_id,
                "instantiationState": "INSTANTIATED",
                "instantiatedVnfInfo": {
                    "flavourId": "default",
                    "vnfState": "STARTED",
                    "extCpInfo": [{
                        "id": format!("{id}-ext-cp"),
                        "cpdId": "ext-cp",
                        "associatedVnfcCpId": format!("{id}-vnfc-cp"),
                    }],
                    "extVirtualLinkInfo": [{
                        "id": format!("{id}-ext-vl"),
                        "resourceHandle": {"resourceId": format!("net-{id}")},
                    }],
                },
            }),
            profile: profile.into(),
        }
    }
}

struct Subscription {
    id: String,
    callback: String,
    filter: Option<Value>,
    authentication: Option<Value>,
    resource: Value,
}

struct OpOcc {
    ns_id: String,
    operation: String,
    state: String,
    params: Value,
    start: String,
    entered: String,
    /// `resourceChanges.affectedVnfs` (SOL005 6.5.2.3), once the operation has completed.
    affected: Vec<Value>,
}

struct Fault {
    method: String,
    path: String,
    status: u16,
    times: usize,
    retry_after: Option<RetryAfter>,
    /// Answer 200 with a body of more than this many bytes instead of a problem.
    oversize: Option<usize>,
}

/// The two forms of `Retry-After` (RFC 9110 10.2.3).
#[derive(Clone, Copy, Debug)]
pub enum RetryAfter {
    Seconds(u64),
    /// An HTTP-date this far in the future (rounded up to whole seconds).
    Date(Duration),
}

struct Delay {
    method: String,
    path: String,
    /// `None`: until release_responses().
    delay: Option<Duration>,
    times: usize,
}

impl State {
    fn next_id(&mut self, kind: &str) -> String {
        self.counter += 1;
        format!("nfvo-{kind}-{}", self.counter)
    }

    fn vnf_any(&self, id: &str) -> Option<&Vnf> {
        self.vnfs.get(id).or_else(|| self.terminated.get(id))
    }

    fn ns_instance(&self, base: &str, id: &str) -> Option<Value> {
        let ns = self.ns.get(id)?;
        let vnfs = ns
            .vnfs
            .iter()
            .filter_map(|v| self.vnfs.get(v))
            .map(|v| v.instance.clone())
            .collect::<Vec<_>>();
        let mut instance = json!({
            "id": id,
            "nsInstanceName": ns.name,
            "nsInstanceDescription": format!("NS {}", ns.name),
            "nsdId": format!("nsd-{id}"),
            "nsdInfoId": format!("nsd-info-{id}"),
            "flavourId": "default",
            "nsState": "INSTANTIATED",
            "vnfInstance": vnfs,
            "_links": {
                "self": {"href": format!("{base}/nslcm/v2/ns_instances/{id}")},
                "update": {"href": format!("{base}/nslcm/v2/ns_instances/{id}/update")},
            },
        });
        if !ns.snapshots.is_empty() {
            instance["vnfSnapshotInfoIds"] = json!(ns.snapshots);
        }
        Some(instance)
    }

    fn package_info(&self, base: &str, id: &str) -> Option<Value> {
        let pkg = self.packages.get(id)?;
        let in_use = self
            .vnfs
            .values()
            .any(|v| v.instance["vnfPkgId"].as_str() == Some(id));
        let mut info = json!({
            "id": id,
            "vnfdId": pkg.vnfd_id,
            "vnfProvider": "ETSI NFV test double",
            "vnfProductName": format!("product-{}", pkg.vnfd_id),
            "vnfSoftwareVersion": "1.0",
            "vnfdVersion": "1.0",
            "checksum": {"algorithm": "SHA-256", "hash": pkg.hash},
            "onboardingState": "ONBOARDED",
            "operationalState": if pkg.enabled { "ENABLED" } else { "DISABLED" },
            "usageState": if in_use { "IN_USE" } else { "NOT_IN_USE" },
            "_links": {
                "self": {"href": format!("{base}/vnfpkgm/v2/vnf_packages/{id}")},
                "vnfd": {"href": format!("{base}/vnfpkgm/v2/vnf_packages/{id}/vnfd")},
                "packageContent": {"href": format!("{base}/vnfpkgm/v2/vnf_packages/{id}/package_content")},
            },
        });
        if let Some(user) = &pkg.user_defined {
            info["userDefinedData"] = user.clone();
        }
        Some(info)
    }

    fn op_occ(&self, base: &str, id: &str) -> Option<Value> {
        let op = self.op_occs.get(id)?;
        Some(json!({
            "id": id,
            "operationState": op.state,
            "stateEnteredTime": op.entered,
            "nsInstanceId": op.ns_id,
            "operation": op.operation,
            "isAutomaticInvocation": false,
            "operationParams": op.params,
            "startTime": op.start,
            "isCancelPending": false,
            "resourceChanges": {"affectedVnfs": op.affected},
            "_links": {
                "self": {"href": format!("{base}/nslcm/v2/ns_lcm_op_occs/{id}")},
                "nsInstance": {"href": format!("{base}/nslcm/v2/ns_instances/{}", op.ns_id)},
            },
        }))
    }

    /// An affectedVnf entry (SOL005 6.5.3.2) for `vnf_id`.
    fn affected_vnf(&self, vnf_id: &str, change_type: &str) -> Value {
        let (vnfd_id, profile, name) = match self.vnf_any(vnf_id) {
            Some(v) => (
                v.instance["vnfdId"].clone(),
                v.profile.clone(),
                v.instance["vnfInstanceName"].clone(),
            ),
            None => (json!("unknown"), String::new(), json!(vnf_id)),
        };
        let changed = json!({"vnfInstanceId": vnf_id});
        // The derived v3.7.1 schema puts AffectedVnf's anyOf (changedExtConnectivity, or one
        // of changedVnfInfo / modificationsTriggeredByVnfPkgChange) on the item itself
        // rather than on changedInfo; changedVnfInfo is therefore given in both places.
        json!({
            "vnfInstanceId": vnf_id,
            "vnfdId": vnfd_id,
            "vnfProfileId": profile,
            "vnfName": name,
            "changeType": change_type,
            "changeResult": "COMPLETED",
            "changedInfo": {"changedVnfInfo": changed},
            "changedVnfInfo": changed,
        })
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }
}

/// An NsLcmOperationOccurrenceNotification (SOL005 6.5.2.5) without affected entities.
fn op_notification(
    base: &str,
    id: &str,
    ns_id: &str,
    op_id: &str,
    operation: &str,
    status: &str,
    op_state: &str,
) -> Value {
    json!({
        "id": id,
        "nsInstanceId": ns_id,
        "nsLcmOpOccId": op_id,
        "operation": operation,
        "notificationType": "NsLcmOperationOccurrenceNotification",
        "subscriptionId": "",
        "timestamp": timestamp(),
        "notificationStatus": status,
        "operationState": op_state,
        "isAutomaticInvocation": false,
        "_links": {
            "nsInstance": {"href": format!("{base}/nslcm/v2/ns_instances/{ns_id}")},
            "nslcmOpOcc": {"href": format!("{base}/nslcm/v2/ns_lcm_op_occs/{op_id}")},
        },
    })
}

// ---------------------------------------------------------------------------------------
// Schemas

const SCHEMA_NAMES: &[&str] = &[
    "ApiVersionInformation",
    "LccnSubscription",
    "LccnSubscriptionRequest",
    "NsChangeNotification",
    "NsIdentifierCreationNotification",
    "NsIdentifierDeletionNotification",
    "NsInstance",
    "NsLcmCapacityShortageNotification",
    "NsLcmOperationOccurrenceNotification",
    "ProblemDetails",
    "UpdateNsRequest",
    "VnfPkgInfo",
    "VnfPkgInfoModifications",
];

/// Each schema compiled once per test process (Draft 4, no remote references).
fn schemas() -> &'static HashMap<&'static str, jsonschema::Validator> {
    static SCHEMAS: OnceLock<HashMap<&'static str, jsonschema::Validator>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/etsi/derived-jsonschema"
        ));
        SCHEMA_NAMES
            .iter()
            .map(|name| {
                let path = dir.join(format!("SOL005_v3.7.1_{name}.json"));
                let text = std::fs::read_to_string(&path).expect("schema file");
                let mut schema: Value = serde_json::from_str(&text).expect("schema JSON");
                repair(&mut schema);
                let validator = jsonschema::draft4::new(&schema).expect("Draft 4 schema");
                (*name, validator)
            })
            .collect()
    })
}

/// Two defects of the derived NsInstance schema make it no Draft 4 schema: `"items": null`
/// (IpOverEthernetAddressInfo.addresses, whose item type was lost in the derivation) and
/// keywords cut off at the derivation's depth limit as `{"...": "depth"}` (deep inside
/// cpConfig). Both are dropped, i.e. left unconstrained, which is all they can mean.
fn repair(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let cut = json!({"...": "depth"});
            map.retain(|key, value| !(key == "items" && value.is_null()) && *value != cut);
            map.values_mut().for_each(repair);
        }
        Value::Array(list) => list.iter_mut().for_each(repair),
        _ => {}
    }
}

/// The schema errors of `value` as `name`, joined; `None` if it is valid.
fn schema_errors(name: &str, value: &Value) -> Option<String> {
    let Some(validator) = schemas().get(name) else {
        return Some(format!("no schema {name}"));
    };
    let errors = validator
        .iter_errors(value)
        .map(|e| format!("{} (at '{}')", e, e.instance_path()))
        .collect::<Vec<_>>();
    (!errors.is_empty()).then(|| errors.join("; "))
}

/// Check a message; a violation is recorded as "<direction> <schema> <context>: <errors>".
fn check(inner: &Inner, direction: &str, name: &str, context: &str, value: &Value) -> bool {
    match schema_errors(name, value) {
        None => true,
        Some(errors) => {
            inner
                .state
                .lock()
                .unwrap()
                .violation(format!("{direction} {name} {context}: {errors}"));
            false
        }
    }
}

// ---------------------------------------------------------------------------------------
// Server

async fn accept_loop(inner: Arc<Inner>, listener: tokio::net::TcpListener) {
    let acceptor = tokio_rustls::TlsAcceptor::from(inner.server_tls.clone());
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let conn_inner = inner.clone();
        let task = tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|der| nfv_warden::api::ClientIdentity::from_certificate(der).0);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let inner = conn_inner.clone();
                let identity = identity.clone();
                async move { Ok::<_, Infallible>(serve(inner, req, identity).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
        inner.tasks.lock().unwrap().push(task.abort_handle());
    }
}

/// What a handler answers: status, extra headers, body (content type, JSON).
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Option<(&'static str, Value)>,
}

impl Reply {
    fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Some(("application/json", body)),
        }
    }

    fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: None,
        }
    }

    fn problem(status: u16, detail: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Some((
                "application/problem+json",
                json!({"status": status, "detail": detail.into()}),
            )),
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// The request as the handlers see it.
struct Call {
    method: Method,
    path: String,
    query: String,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Call {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The path with its query, as recorded and as fail()/delay_response() match it.
    fn full_path(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }

    fn json(&self) -> Result<Value, Reply> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Reply::problem(400, format!("body is not JSON: {e}")))
    }
}

async fn serve(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    identity: Option<String>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let arrived = Instant::now();
    // Handled in a task of its own: a request takes effect even if the client goes away.
    let task = tokio::spawn(process(inner, parts, body, identity, arrived));
    task.await.unwrap_or_else(|_| {
        Response::builder()
            .status(500)
            .body(Full::new(Bytes::new()))
            .expect("static response")
    })
}

async fn process(
    inner: Arc<Inner>,
    parts: hyper::http::request::Parts,
    body: Bytes,
    identity: Option<String>,
    arrived: Instant,
) -> Response<Full<Bytes>> {
    let call = Call {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        headers: parts.headers,
        body,
    };
    let full_path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let bearer = call
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::to_string);
    let delay = take_delay(&inner, &call);
    let mut released = inner.responses_released.subscribe();
    released.mark_unchanged();
    let reply = route(&inner, &call, bearer.as_deref()).await;

    if let Some((_, body)) = &reply.body {
        if reply.body.as_ref().map(|b| b.0) == Some("application/problem+json") {
            check(&inner, "sent", "ProblemDetails", &full_path, body);
        }
    }
    let recorded_body = if call.body.is_empty() {
        Value::Null
    } else {
        body_value(&call.body)
    };
    inner.state.lock().unwrap().requests.push(Recorded {
        method: call.method.to_string(),
        path: full_path,
        client_identity: identity,
        bearer,
        version: call.header("version").map(str::to_string),
        body: recorded_body,
        status: reply.status,
        arrived,
    });
    match delay {
        Some(Some(delay)) => tokio::time::sleep(delay).await,
        // The sender lives in `inner`, which this task holds: changed() cannot fail.
        Some(None) => drop(released.changed().await),
        None => {}
    }

    let mut response = Response::builder().status(reply.status);
    let api_version = if call.path.starts_with("/vnfpkgm") {
        VNFPKGM_VERSION
    } else {
        NSLCM_VERSION
    };
    response = response.header("Version", api_version);
    for (name, value) in &reply.headers {
        response = response.header(name, value);
    }
    let bytes = match reply.body {
        Some((content_type, body)) => {
            response = response.header("Content-Type", content_type);
            Bytes::from(serde_json::to_vec(&body).expect("JSON"))
        }
        None => Bytes::new(),
    };
    response.body(Full::new(bytes)).expect("valid response")
}

/// `Some(None)`: held until released.
fn take_delay(inner: &Inner, call: &Call) -> Option<Option<Duration>> {
    let mut state = inner.state.lock().unwrap();
    let delay = state.delays.iter_mut().find(|d| {
        d.times > 0
            && d.method.eq_ignore_ascii_case(call.method.as_str())
            && call.full_path().contains(&d.path)
    })?;
    delay.times -= 1;
    Some(delay.delay)
}

fn take_fault(inner: &Inner, call: &Call) -> Option<Reply> {
    let mut state = inner.state.lock().unwrap();
    let fault = state.faults.iter_mut().find(|f| {
        f.times > 0
            && f.method.eq_ignore_ascii_case(call.method.as_str())
            && call.full_path().contains(&f.path)
    })?;
    fault.times -= 1;
    if let Some(bytes) = fault.oversize {
        return Some(Reply::json(200, json!(["x".repeat(bytes)])));
    }
    let mut reply = Reply::problem(fault.status, "injected fault");
    match fault.retry_after {
        Some(RetryAfter::Seconds(seconds)) => {
            reply = reply.header("Retry-After", seconds.to_string());
        }
        Some(RetryAfter::Date(after)) => {
            // IMF-fixdate has whole seconds: round up so the wait is at least `after`.
            let at = SystemTime::now() + after + Duration::from_secs(1);
            reply = reply.header("Retry-After", httpdate::fmt_http_date(at));
        }
        None => {}
    }
    Some(reply)
}

/// Which methods a path allows; `None` for an unknown path.
fn allowed(segments: &[&str]) -> Option<&'static [&'static str]> {
    Some(match segments {
        ["nslcm" | "vnfpkgm", "api_versions"] | ["nslcm" | "vnfpkgm", "v2", "api_versions"] => {
            &["GET"]
        }
        ["nslcm", "v2", "subscriptions"] => &["GET", "POST"],
        ["nslcm", "v2", "subscriptions", _] => &["GET", "DELETE"],
        ["nslcm", "v2", "ns_instances"] | ["nslcm", "v2", "ns_instances", _] => &["GET"],
        ["nslcm", "v2", "ns_instances", _, "update"] => &["POST"],
        ["nslcm", "v2", "ns_lcm_op_occs"] | ["nslcm", "v2", "ns_lcm_op_occs", _] => &["GET"],
        ["vnfpkgm", "v2", "vnf_packages", _] => &["GET", "PATCH"],
        _ => return None,
    })
}

async fn route(inner: &Arc<Inner>, call: &Call, bearer: Option<&str>) -> Reply {
    if call.path == "/oauth2/token" {
        if let Some(fault) = take_fault(inner, call) {
            return fault;
        }
        if call.method != Method::POST {
            return Reply::problem(405, "POST only").header("Allow", "POST");
        }
        return token(inner, call);
    }
    {
        let state = inner.state.lock().unwrap();
        if !state.oauth_clients.is_empty()
            && !bearer.is_some_and(|b| state.tokens.iter().any(|t| t == b))
        {
            return Reply::problem(401, "a Bearer access token from /oauth2/token is required")
                .header("WWW-Authenticate", "Bearer");
        }
    }
    if let Some(fault) = take_fault(inner, call) {
        return fault;
    }
    let segments = call
        .path
        .trim_start_matches('/')
        .split('/')
        .collect::<Vec<_>>();
    let Some(methods) = allowed(&segments) else {
        return Reply::problem(404, format!("no resource {}", call.path));
    };
    if !methods.contains(&call.method.as_str()) {
        return Reply::problem(405, format!("{} not allowed on {}", call.method, call.path))
            .header("Allow", methods.join(", "));
    }
    let versioned = !matches!(segments.last(), Some(&"api_versions"));
    // SOL013 4.9: every request except to the API versions resource carries `Version`.
    if versioned && call.header("version").is_none() {
        return Reply::problem(400, "the Version header is missing (SOL013 4.9)");
    }
    let base = &inner.base;
    match (call.method.as_str(), segments.as_slice()) {
        ("GET", [api, ..]) if !versioned => {
            let version = if *api == "nslcm" {
                NSLCM_VERSION
            } else {
                VNFPKGM_VERSION
            };
            sent(
                inner,
                "ApiVersionInformation",
                200,
                json!({"uriPrefix": format!("/{api}/v2"), "apiVersions": [{"version": version}]}),
            )
        }
        ("POST", [_, _, "subscriptions"]) => subscribe(inner, call).await,
        ("GET", [_, _, "subscriptions"]) => {
            let list = inner
                .state
                .lock()
                .unwrap()
                .subscriptions
                .iter()
                .map(|s| s.resource.clone())
                .collect::<Vec<_>>();
            for s in &list {
                check(inner, "sent", "LccnSubscription", &call.path, s);
            }
            paged(inner, call, list)
        }
        (method, [_, _, "subscriptions", id]) => {
            let mut state = inner.state.lock().unwrap();
            let Some(pos) = state.subscriptions.iter().position(|s| s.id == *id) else {
                return Reply::problem(404, format!("no subscription {id}"));
            };
            if method == "DELETE" {
                state.subscriptions.remove(pos);
                return Reply::empty(204);
            }
            let resource = state.subscriptions[pos].resource.clone();
            drop(state);
            sent(inner, "LccnSubscription", 200, resource)
        }
        ("GET", [_, _, "ns_instances"]) => {
            let selector = match Selector::parse(&call.query) {
                Ok(s) => s,
                Err(reply) => return reply,
            };
            let state = inner.state.lock().unwrap();
            let list = if state.restarting {
                Vec::new()
            } else {
                state
                    .ns
                    .keys()
                    .filter_map(|id| state.ns_instance(base, id))
                    .map(|mut ns| {
                        selector.apply(&mut ns, NS_DEFAULT_EXCLUDED, NS_OPTIONAL_COMPLEX);
                        ns
                    })
                    .collect::<Vec<_>>()
            };
            drop(state);
            for ns in &list {
                check(inner, "sent", "NsInstance", &call.path, ns);
            }
            paged(inner, call, list)
        }
        ("GET", [_, _, "ns_instances", id]) => {
            let state = inner.state.lock().unwrap();
            let ns = if state.restarting {
                None
            } else {
                state.ns_instance(base, id)
            };
            drop(state);
            match ns {
                Some(ns) => sent(inner, "NsInstance", 200, ns),
                None => Reply::problem(404, format!("no NS instance {id}")),
            }
        }
        ("POST", [_, _, "ns_instances", id, "update"]) => update(inner, call, id),
        ("GET", [_, _, "ns_lcm_op_occs"]) => {
            let filter = query_param(&call.query, "filter");
            let ns_filter = match filter.as_deref() {
                None => None,
                Some(f) => match f
                    .strip_prefix("(eq,nsInstanceId,")
                    .and_then(|f| f.strip_suffix(')'))
                {
                    Some(ns) => Some(ns.to_string()),
                    None => {
                        return Reply::problem(
                            400,
                            format!("unsupported filter {f}; only (eq,nsInstanceId,X)"),
                        )
                    }
                },
            };
            let mut selector = match Selector::parse(&call.query) {
                Ok(s) => s,
                Err(reply) => return reply,
            };
            if selector.all {
                return Reply::problem(
                    400,
                    "GET /ns_lcm_op_occs has no all_fields (SOL005 6.4.9.3.2)",
                );
            }
            let state = inner.state.lock().unwrap();
            if state.omit_op_params {
                selector = Selector {
                    exclude_default: true,
                    ..Selector::default()
                };
            } else if selector.fields.is_empty()
                && selector.exclude.is_empty()
                && !selector.exclude_default
            {
                // Unlike NsInstance, NsLcmOpOcc excludes nothing by default.
                selector.all = true;
            }
            let list = if state.restarting {
                Vec::new()
            } else {
                state
                    .op_occs
                    .iter()
                    .filter(|(_, op)| ns_filter.as_ref().is_none_or(|ns| &op.ns_id == ns))
                    .filter_map(|(id, _)| state.op_occ(base, id))
                    .map(|mut op| {
                        selector.apply(&mut op, OP_DEFAULT_EXCLUDED, OP_DEFAULT_EXCLUDED);
                        op
                    })
                    .collect::<Vec<_>>()
            };
            drop(state);
            for op in &list {
                check_op_occ(inner, op);
            }
            paged(inner, call, list)
        }
        ("GET", [_, _, "ns_lcm_op_occs", id]) => {
            let state = inner.state.lock().unwrap();
            let op = if state.restarting {
                None
            } else {
                state.op_occ(base, id)
            };
            drop(state);
            match op {
                Some(op) => {
                    check_op_occ(inner, &op);
                    Reply::json(200, op)
                }
                None => Reply::problem(404, format!("no NS LCM op occ {id}")),
            }
        }
        ("GET", [_, _, "vnf_packages", id]) => {
            let pkg = inner.state.lock().unwrap().package_info(base, id);
            match pkg {
                Some(pkg) => sent(inner, "VnfPkgInfo", 200, pkg),
                None => Reply::problem(404, format!("no VNF package {id}")),
            }
        }
        ("PATCH", [_, _, "vnf_packages", id]) => patch_package(inner, call, id),
        _ => Reply::problem(404, format!("no resource {}", call.path)),
    }
}

/// SOL005 6.4.2.3.2 (GET /ns_instances, `exclude_default`): the NsInstance attributes left
/// out unless `all_fields`, `fields` or `exclude_fields` say otherwise. (The text spells the
/// first "vnfInstances"; the attribute is `vnfInstance`.)
const NS_DEFAULT_EXCLUDED: &[&str] = &[
    "vnfInstance",
    "pnfInfo",
    "virtualLinkInfo",
    "vnffgInfo",
    "sapInfo",
    "nsScaleStatus",
    "additionalAffinityOrAntiAffinityRule",
    "wanConnectionInfo",
];

/// NsInstance attributes that are complex with a minimum cardinality of zero: what `fields`
/// alone leaves out unless listed (SOL013 5.3.2).
const NS_OPTIONAL_COMPLEX: &[&str] = &[
    "vnfInstance",
    "pnfInfo",
    "virtualLinkInfo",
    "vnffgInfo",
    "sapInfo",
    "nsScaleStatus",
    "additionalAffinityOrAntiAffinityRule",
    "wanConnectionInfo",
    "vnfSnapshotInfoIds",
    "nestedNsInstanceId",
];

/// SOL005 6.4.9.3.2 (GET /ns_lcm_op_occs, `exclude_default`).
const OP_DEFAULT_EXCLUDED: &[&str] = &[
    "operationParams",
    "changedVnfInfo",
    "error",
    "resourceChanges",
    "lcmCoordinations",
    "warnings",
];

/// The attribute selectors of SOL013 5.3 in a query.
#[derive(Default)]
struct Selector {
    all: bool,
    fields: Vec<String>,
    exclude: Vec<String>,
    exclude_default: bool,
}

impl Selector {
    fn parse(query: &str) -> Result<Selector, Reply> {
        let list = |name: &str| -> Vec<String> {
            query_param(query, name)
                .map(|v| v.split(',').map(|f| f.trim().to_string()).collect())
                .unwrap_or_default()
        };
        let selector = Selector {
            all: query_param(query, "all_fields").is_some(),
            fields: list("fields"),
            exclude: list("exclude_fields"),
            exclude_default: query_param(query, "exclude_default").is_some(),
        };
        // SOL013 5.3.2: all_fields stands alone; fields and exclude_fields exclude each other.
        let others =
            !selector.fields.is_empty() || !selector.exclude.is_empty() || selector.exclude_default;
        if (selector.all && others) || (!selector.fields.is_empty() && !selector.exclude.is_empty())
        {
            return Err(Reply::problem(
                400,
                "conflicting attribute selectors (SOL013 5.3.2)",
            ));
        }
        Ok(selector)
    }

    /// Drop from `item` what the selectors leave out (top-level attributes only; a name in
    /// `fields` keeps the whole attribute).
    fn apply(&self, item: &mut Value, default_excluded: &[&str], optional: &[&str]) {
        let Some(map) = item.as_object_mut() else {
            return;
        };
        let listed = |name: &str| {
            self.fields
                .iter()
                .any(|f| f.split('/').next() == Some(name))
        };
        let drop: Vec<&str> = if self.all {
            Vec::new()
        } else if !self.exclude.is_empty() {
            self.exclude.iter().map(String::as_str).collect()
        } else if !self.fields.is_empty() && !self.exclude_default {
            optional.iter().copied().filter(|a| !listed(a)).collect()
        } else {
            default_excluded
                .iter()
                .copied()
                .filter(|a| !listed(a))
                .collect()
        };
        for name in drop {
            map.remove(name);
        }
    }
}

/// One page of `items` (SOL013 5.4.2): `nextpage_opaque_marker` is where it starts; a
/// `Link: <...>; rel="next"` header points to the rest.
fn paged(inner: &Inner, call: &Call, items: Vec<Value>) -> Reply {
    let size = inner.state.lock().unwrap().page_size.max(1);
    let start = match query_param(&call.query, "nextpage_opaque_marker") {
        None => 0,
        Some(marker) => match marker
            .strip_prefix("page-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if n <= items.len() => n,
            // SOL013 5.4.2.2: an invalid or expired marker is a 400.
            _ => return Reply::problem(400, format!("invalid nextpage_opaque_marker {marker}")),
        },
    };
    let end = (start + size).min(items.len());
    let page = items[start..end].to_vec();
    let mut reply = Reply::json(200, Value::Array(page));
    if end < items.len() {
        let kept: Vec<String> = call
            .query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("nextpage_opaque_marker="))
            .map(str::to_string)
            .chain(std::iter::once(format!(
                "nextpage_opaque_marker=page-{end}"
            )))
            .collect();
        reply = reply.header(
            "Link",
            format!(
                "<{}{}?{}>; rel=\"next\"",
                inner.base,
                call.path,
                kept.join("&")
            ),
        );
    }
    reply
}

/// NsLcmOpOcc has no derived schema; its operationParams of an UPDATE are an UpdateNsRequest.
fn check_op_occ(inner: &Inner, op: &Value) {
    if op["operation"] == "UPDATE" && op.get("operationParams").is_some() {
        let context = format!("operationParams of NsLcmOpOcc {}", op["id"]);
        check(
            inner,
            "sent",
            "UpdateNsRequest",
            &context,
            &op["operationParams"],
        );
    }
}

/// A JSON answer, checked against `schema` first.
fn sent(inner: &Inner, schema: &str, status: u16, body: Value) -> Reply {
    check(inner, "sent", schema, "response", &body);
    Reply::json(status, body)
}

/// Parse a received JSON body of `schema`; an invalid one is a recorded violation and 400.
fn received(inner: &Inner, call: &Call, schema: &str) -> Result<Value, Reply> {
    let body = call.json()?;
    if check(inner, "received", schema, &call.path, &body) {
        Ok(body)
    } else {
        Err(Reply::problem(
            400,
            format!("the body is not a valid {schema}"),
        ))
    }
}

fn require_json(call: &Call, expected: &str) -> Result<(), Reply> {
    let content_type = call.header("content-type").unwrap_or_default();
    if content_type.split(';').next().map(str::trim) == Some(expected) {
        Ok(())
    } else {
        Err(Reply::problem(
            415,
            format!("Content-Type must be {expected}, not '{content_type}'"),
        ))
    }
}

/// POST /oauth2/token, client credentials grant (RFC 6749 4.4), client authentication by
/// HTTP Basic or form parameters (RFC 6749 2.3.1).
fn token(inner: &Inner, call: &Call) -> Reply {
    let form = form_params(&String::from_utf8_lossy(&call.body));
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let basic = call
        .header("authorization")
        .and_then(|a| a.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(id, secret)| (decode_form(id), decode_form(secret)))
        });
    let (client_id, secret) = match basic {
        Some(pair) => pair,
        None => (
            field("client_id").unwrap_or_default(),
            field("client_secret").unwrap_or_default(),
        ),
    };
    let mut state = inner.state.lock().unwrap();
    if state.oauth_clients.get(&client_id) != Some(&secret) {
        return Reply::json(401, json!({"error": "invalid_client"}))
            .header("WWW-Authenticate", "Basic");
    }
    if field("grant_type").as_deref() != Some("client_credentials") {
        return Reply::json(400, json!({"error": "unsupported_grant_type"}));
    }
    let token = format!(
        "{}-{}",
        state.next_id("token"),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    state.tokens.push(token.clone());
    Reply::json(
        200,
        json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600}),
    )
    .header("Cache-Control", "no-store")
}

/// POST /nslcm/v2/subscriptions (SOL005 6.4.16.3.1).
async fn subscribe(inner: &Arc<Inner>, call: &Call) -> Reply {
    if let Err(reply) = require_json(call, "application/json") {
        return reply;
    }
    let request = match received(inner, call, "LccnSubscriptionRequest") {
        Ok(request) => request,
        Err(reply) => return reply,
    };
    let callback = request["callbackUri"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let filter = request.get("filter").cloned();
    let authentication = request.get("authentication").cloned();
    let existing = inner
        .state
        .lock()
        .unwrap()
        .subscriptions
        .iter()
        .find(|s| s.callback == callback && s.filter == filter)
        .map(|s| s.id.clone());
    if let Some(id) = existing {
        return Reply::empty(303).header(
            "Location",
            format!("{}/nslcm/v2/subscriptions/{id}", inner.base),
        );
    }
    // SOL005 6.4.18.3.2: the NFVO tests the notification endpoint before creating it.
    match call_callback(inner, Method::GET, &callback, &authentication, None).await {
        Ok(204) => {}
        Ok(status) => {
            return Reply::problem(
                422,
                format!("the test GET to {callback} answered {status}, not 204"),
            )
        }
        Err(e) => return Reply::problem(422, format!("the test GET to {callback} failed: {e}")),
    }
    let mut state = inner.state.lock().unwrap();
    let id = state.next_id("subscription");
    let location = format!("{}/nslcm/v2/subscriptions/{id}", inner.base);
    let mut resource = json!({
        "id": id,
        "callbackUri": callback,
        "verbosity": request.get("verbosity").cloned().unwrap_or(json!("FULL")),
        "_links": {"self": {"href": location}},
    });
    if let Some(filter) = &filter {
        resource["filter"] = filter.clone();
    }
    // IFA 033 Sc-Or.NsLcm.008: the SM announces its mode of operation.
    if let Ok(uri) = callback.parse::<Uri>() {
        if let Some(mode) = query_param(uri.query().unwrap_or_default(), "mode") {
            state.announced_mode = Some(mode);
        }
    }
    state.subscriptions.push(Subscription {
        id,
        callback,
        filter,
        authentication,
        resource: resource.clone(),
    });
    drop(state);
    sent(inner, "LccnSubscription", 201, resource).header("Location", location)
}

/// What an UpdateNS does to the inventory, decided when it is accepted and applied when
/// its op occ completes.
enum Effect {
    Remove(Vec<String>),
    Snapshot(String),
    Instantiate(Vec<Value>),
    Add(Vec<(String, String)>),
    Modify(Vec<Value>),
}

/// POST /nslcm/v2/ns_instances/{id}/update (SOL005 6.4.6.3.1).
fn update(inner: &Arc<Inner>, call: &Call, ns_id: &str) -> Reply {
    if inner.state.lock().unwrap().announced_mode.as_deref() == Some("PASSIVE") {
        return Reply::problem(
            403,
            "a PASSIVE security manager may not update NS instances",
        );
    }
    if let Err(reply) = require_json(call, "application/json") {
        return reply;
    }
    let request = match received(inner, call, "UpdateNsRequest") {
        Ok(request) => request,
        Err(reply) => return reply,
    };
    let mut state = inner.state.lock().unwrap();
    let Some(ns) = state.ns.get(ns_id) else {
        return Reply::problem(404, format!("no NS instance {ns_id}"));
    };
    if state
        .op_occs
        .values()
        .any(|op| op.ns_id == ns_id && op.state == "PROCESSING")
    {
        return Reply::problem(
            409,
            format!("another LCM operation on {ns_id} is in progress"),
        );
    }
    let in_ns = |id: &str| ns.vnfs.iter().any(|v| v == id);
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let update_type = request["updateType"].as_str().unwrap_or_default();
    let effect = match update_type {
        "REMOVE_VNF" => {
            let ids = strings(&request["removeVnfInstanceId"]);
            if ids.is_empty() {
                return Reply::problem(422, "REMOVE_VNF without removeVnfInstanceId");
            }
            if let Some(id) = ids.iter().find(|id| !in_ns(id)) {
                return Reply::problem(422, format!("VNF instance {id} is not in {ns_id}"));
            }
            Effect::Remove(ids)
        }
        "CREATE_VNF_SNAPSHOT" => {
            let id = request["createSnapshotData"]["vnfInstanceId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if !in_ns(&id) {
                return Reply::problem(422, format!("VNF instance {id} is not in {ns_id}"));
            }
            Effect::Snapshot(id)
        }
        "INSTANTIATE_VNF" => match request["instantiateVnfData"].as_array() {
            Some(data) if !data.is_empty() => Effect::Instantiate(data.clone()),
            _ => return Reply::problem(422, "INSTANTIATE_VNF without instantiateVnfData"),
        },
        "ADD_VNF" => match request["addVnfIstance"].as_array() {
            Some(data) if !data.is_empty() => Effect::Add(
                data.iter()
                    .map(|d| {
                        (
                            d["vnfInstanceId"].as_str().unwrap_or_default().to_string(),
                            d["vnfProfileId"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect(),
            ),
            _ => return Reply::problem(422, "ADD_VNF without addVnfIstance"),
        },
        "MODIFY_VNF_INFORMATION" => match request["modifyVnfInfoData"].as_array() {
            Some(data) if !data.is_empty() => {
                if let Some(d) = data.iter().find(|d| {
                    !state
                        .vnfs
                        .contains_key(d["vnfInstanceId"].as_str().unwrap_or_default())
                }) {
                    return Reply::problem(422, format!("no VNF instance {}", d["vnfInstanceId"]));
                }
                Effect::Modify(data.clone())
            }
            _ => return Reply::problem(422, "MODIFY_VNF_INFORMATION without modifyVnfInfoData"),
        },
        other => return Reply::problem(422, format!("updateType {other} is not supported")),
    };
    let op_id = state.next_id("op");
    let now = timestamp();
    state.op_occs.insert(
        op_id.clone(),
        OpOcc {
            ns_id: ns_id.into(),
            operation: "UPDATE".into(),
            state: "PROCESSING".into(),
            params: request,
            start: now.clone(),
            entered: now,
            affected: Vec::new(),
        },
    );
    let start = op_notification(
        &inner.base,
        &state.next_id("notification"),
        ns_id,
        &op_id,
        "UPDATE",
        "START",
        "PROCESSING",
    );
    let delivery = state.delivery;
    let duration = state.op_duration;
    drop(state);
    let _ = inner.notify_tx.send((start, delivery));
    tokio::spawn(complete(
        inner.clone(),
        ns_id.to_string(),
        op_id.clone(),
        effect,
        duration,
    ));
    Reply::empty(202).header(
        "Location",
        format!("{}/nslcm/v2/ns_lcm_op_occs/{op_id}", inner.base),
    )
}

/// The op occ turns COMPLETED after `duration`; its effects apply then.
async fn complete(
    inner: Arc<Inner>,
    ns_id: String,
    op_id: String,
    effect: Effect,
    after: Duration,
) {
    tokio::time::sleep(after).await;
    let mut held = inner.ops_held.subscribe();
    // The sender lives in `inner`, which this task holds: wait_for cannot fail.
    let _ = held.wait_for(|held| !*held).await;
    let mut state = inner.state.lock().unwrap();
    let mut affected = Vec::new();
    match effect {
        Effect::Remove(ids) => {
            for id in ids {
                affected.push(state.affected_vnf(&id, "REMOVE"));
                if let Some(ns) = state.ns.get_mut(&ns_id) {
                    ns.vnfs.retain(|v| *v != id);
                }
                // A VNF removed from its last NS is terminated.
                if !state.ns.values().any(|ns| ns.vnfs.contains(&id)) {
                    if let Some(vnf) = state.vnfs.remove(&id) {
                        state.terminated.insert(id, vnf);
                    }
                }
            }
        }
        Effect::Snapshot(_) => {
            let snapshot = state.next_id("snapshot");
            if let Some(ns) = state.ns.get_mut(&ns_id) {
                ns.snapshots.push(snapshot);
            }
        }
        Effect::Instantiate(data) => {
            for d in data {
                let id = state.next_id("vnf");
                let vnfd_id = d["vnfdId"].as_str().unwrap_or("unknown").to_string();
                let pkg_id = state
                    .packages
                    .iter()
                    .find(|(_, p)| p.vnfd_id == vnfd_id)
                    .map(|(id, _)| id.clone())
                    .unwrap_or_else(|| "unknown".into());
                let profile = d["vnfProfileId"].as_str().unwrap_or("default");
                let mut vnf = Vnf::new(&id, &vnfd_id, &pkg_id, profile);
                if let Some(name) = d.get("vnfInstanceName") {
                    vnf.instance["vnfInstanceName"] = name.clone();
                }
                state.vnfs.insert(id.clone(), vnf);
                if let Some(ns) = state.ns.get_mut(&ns_id) {
                    ns.vnfs.push(id.clone());
                }
                affected.push(state.affected_vnf(&id, "INSTANTIATE"));
            }
        }
        Effect::Add(entries) => {
            for (id, profile) in entries {
                let vnf = match state.vnfs.get(&id).or_else(|| state.terminated.get(&id)) {
                    Some(existing) => Vnf {
                        instance: existing.instance.clone(),
                        profile,
                    },
                    None => Vnf::new(&id, "unknown", "unknown", &profile),
                };
                state.terminated.remove(&id);
                state.vnfs.insert(id.clone(), vnf);
                if let Some(ns) = state.ns.get_mut(&ns_id) {
                    if !ns.vnfs.contains(&id) {
                        ns.vnfs.push(id.clone());
                    }
                }
                affected.push(state.affected_vnf(&id, "ADD"));
            }
        }
        Effect::Modify(data) => {
            for d in data {
                let id = d["vnfInstanceId"].as_str().unwrap_or_default().to_string();
                if let Some(vnf) = state.vnfs.get_mut(&id) {
                    for field in ["vnfInstanceName", "vnfInstanceDescription"] {
                        if let Some(v) = d.get(field) {
                            vnf.instance[field] = v.clone();
                        }
                    }
                    if let Some(Value::Object(changes)) = d.get("metadata") {
                        let metadata = &mut vnf.instance["metadata"];
                        if !metadata.is_object() {
                            *metadata = json!({});
                        }
                        // JSON Merge Patch (RFC 7396) of the metadata.
                        for (k, v) in changes {
                            if v.is_null() {
                                metadata.as_object_mut().map(|m| m.remove(k));
                            } else {
                                metadata[k] = v.clone();
                            }
                        }
                    }
                }
                affected.push(state.affected_vnf(&id, "MODIFY_INFORMATION"));
            }
        }
    }
    let now = timestamp();
    if let Some(op) = state.op_occs.get_mut(&op_id) {
        op.state = "COMPLETED".into();
        op.entered = now;
        op.affected = affected.clone();
    }
    let mut result = op_notification(
        &inner.base,
        &state.next_id("notification"),
        &ns_id,
        &op_id,
        "UPDATE",
        "RESULT",
        "COMPLETED",
    );
    if !affected.is_empty() {
        result["affectedVnf"] = Value::Array(affected);
    }
    let delivery = state.delivery;
    drop(state);
    let _ = inner.notify_tx.send((result, delivery));
}

/// PATCH /vnfpkgm/v2/vnf_packages/{id} (SOL005 9.4.3.3.4), JSON Merge Patch.
fn patch_package(inner: &Inner, call: &Call, id: &str) -> Reply {
    let mode = inner.state.lock().unwrap().announced_mode.clone();
    if matches!(mode.as_deref(), Some("PASSIVE" | "SEMI_ACTIVE")) {
        // IFA 033 SecEnforce.003: disabling packages is a Fully-Active option.
        return Reply::problem(
            403,
            format!(
                "a {} security manager may not modify VNF packages",
                mode.unwrap_or_default()
            ),
        );
    }
    if let Err(reply) = require_json(call, "application/merge-patch+json") {
        return reply;
    }
    let modifications = match received(inner, call, "VnfPkgInfoModifications") {
        Ok(m) => m,
        Err(reply) => return reply,
    };
    let mut state = inner.state.lock().unwrap();
    let Some(pkg) = state.packages.get_mut(id) else {
        return Reply::problem(404, format!("no VNF package {id}"));
    };
    if let Some(wanted) = modifications["operationalState"].as_str() {
        let enable = wanted == "ENABLED";
        if pkg.enabled == enable {
            return Reply::problem(409, format!("VNF package {id} is already {wanted}"));
        }
        pkg.enabled = enable;
    }
    if let Some(Value::Object(changes)) = modifications.get("userDefinedData") {
        let data = pkg.user_defined.get_or_insert_with(|| json!({}));
        for (k, v) in changes {
            if v.is_null() {
                data.as_object_mut().map(|m| m.remove(k));
            } else {
                data[k] = v.clone();
            }
        }
    }
    drop(state);
    Reply::json(200, modifications)
}

// ---------------------------------------------------------------------------------------
// Notifications

/// Sends queued notifications one at a time, in order, to every matching subscription.
async fn sender(inner: Arc<Inner>, mut queue: mpsc::UnboundedReceiver<(Value, Delivery)>) {
    let mut held: Vec<(String, Option<Value>, Value)> = Vec::new();
    while let Some((notification, delivery)) = queue.recv().await {
        let copies = addressed(&inner, &notification);
        match delivery {
            Delivery::Drop => {
                let id = notification["id"].as_str().unwrap_or_default().to_string();
                inner.state.lock().unwrap().dropped.push(id);
            }
            Delivery::Normal => deliver_all(&inner, &copies, 1).await,
            Delivery::Duplicate => deliver_all(&inner, &copies, 2).await,
            Delivery::Reorder if held.is_empty() => {
                held = copies;
                continue;
            }
            Delivery::Reorder => deliver_all(&inner, &copies, 1).await,
        }
        let earlier = std::mem::take(&mut held);
        deliver_all(&inner, &earlier, 1).await;
    }
}

/// One copy per matching subscription: (callbackUri, authentication, notification with
/// subscriptionId and _links.subscription filled), each checked against its schema.
fn addressed(inner: &Inner, notification: &Value) -> Vec<(String, Option<Value>, Value)> {
    let kind = notification["notificationType"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let subscriptions = {
        let state = inner.state.lock().unwrap();
        state
            .subscriptions
            .iter()
            .filter(|s| matches(s.filter.as_ref(), notification))
            .map(|s| {
                (
                    s.id.clone(),
                    s.callback.clone(),
                    s.authentication.clone(),
                    s.resource["_links"]["self"]["href"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    subscriptions
        .into_iter()
        .map(|(id, callback, authentication, href)| {
            let mut copy = notification.clone();
            copy["subscriptionId"] = json!(id);
            if !copy["_links"].is_object() {
                copy["_links"] = json!({});
            }
            copy["_links"]["subscription"] = json!({ "href": href });
            check(inner, "sent", &kind, &format!("to {callback}"), &copy);
            (callback, authentication, copy)
        })
        .collect()
}

/// Whether a subscription's filter (SOL005 6.5.3.8) selects the notification.
fn matches(filter: Option<&Value>, notification: &Value) -> bool {
    let Some(filter) = filter else {
        return true;
    };
    let kind = notification["notificationType"]
        .as_str()
        .unwrap_or_default();
    // The v3.7.1 enum spells it "NsLcmOperationOccurenceNotification".
    let kind_in_filter = if kind == "NsLcmOperationOccurrenceNotification" {
        "NsLcmOperationOccurenceNotification"
    } else {
        kind
    };
    let contains = |list: &Value, item: &str| {
        list.as_array()
            .is_none_or(|l| l.iter().any(|v| v.as_str() == Some(item)))
    };
    if !contains(&filter["notificationTypes"], kind_in_filter) {
        return false;
    }
    if let Some(ns_id) = notification["nsInstanceId"].as_str() {
        if !contains(
            &filter["nsInstanceSubscriptionFilter"]["nsInstanceIds"],
            ns_id,
        ) {
            return false;
        }
    }
    kind != "NsLcmOperationOccurrenceNotification"
        || (contains(
            &filter["operationTypes"],
            notification["operation"].as_str().unwrap_or_default(),
        ) && contains(
            &filter["operationStates"],
            notification["operationState"].as_str().unwrap_or_default(),
        ))
}

async fn deliver_all(inner: &Inner, copies: &[(String, Option<Value>, Value)], times: usize) {
    for (callback, authentication, notification) in copies {
        for _ in 0..times {
            let body = serde_json::to_vec(notification).expect("JSON");
            let status = call_callback(inner, Method::POST, callback, authentication, Some(body))
                .await
                .unwrap_or(0);
            let id = notification["id"].as_str().unwrap_or_default().to_string();
            inner.state.lock().unwrap().deliveries.push((id, status));
        }
    }
}

/// A request to the SM's callbackUri with the subscription's authentication (SOL005
/// 4.5.3.4 / SOL013 8.3.4); connection failures are errors, HTTP statuses are not.
async fn call_callback(
    inner: &Inner,
    method: Method,
    url: &str,
    authentication: &Option<Value>,
    body: Option<Vec<u8>>,
) -> Result<u16, String> {
    let mut headers = vec![("Version".to_string(), NSLCM_VERSION.to_string())];
    if body.is_some() {
        headers.push(("Content-Type".into(), "application/json".into()));
    }
    let types = authentication
        .as_ref()
        .map(|a| {
            a["authType"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|v| v.as_str())
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let auth = authentication.clone().unwrap_or(Value::Null);
    let mut oauth_key = None;
    if types.iter().any(|t| t == "BASIC") {
        let basic = &auth["paramsBasic"];
        let pair = format!(
            "{}:{}",
            basic["userName"].as_str().unwrap_or_default(),
            basic["password"].as_str().unwrap_or_default()
        );
        headers.push((
            "Authorization".into(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            ),
        ));
    } else if types.iter().any(|t| t == "OAUTH2_CLIENT_CREDENTIALS") {
        let params = &auth["paramsOauth2ClientCredentials"];
        let key = (
            params["tokenEndpoint"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            params["clientId"].as_str().unwrap_or_default().to_string(),
        );
        let token = access_token(
            inner,
            &key,
            params["clientPassword"].as_str().unwrap_or_default(),
        )
        .await?;
        headers.push(("Authorization".into(), format!("Bearer {token}")));
        oauth_key = Some(key);
    }
    let tls = if types.iter().any(|t| t == "TLS_CERT") {
        inner.notifier_client.clone()
    } else {
        inner.plain_client.clone()
    };
    let (status, _, _) = send(method, url, &headers, body.unwrap_or_default(), tls).await?;
    if status == 401 {
        // The token may have expired: fetch a new one next time.
        if let Some(key) = oauth_key {
            inner.token_cache.lock().await.remove(&key);
        }
    }
    Ok(status)
}

/// A cached or new access token from the SM's token endpoint (RFC 6749 4.4).
async fn access_token(
    inner: &Inner,
    key: &(String, String),
    password: &str,
) -> Result<String, String> {
    let mut cache = inner.token_cache.lock().await;
    if let Some(token) = cache.get(key) {
        return Ok(token.clone());
    }
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:{password}", key.1));
    let headers = vec![
        (
            "Content-Type".to_string(),
            "application/x-www-form-urlencoded".to_string(),
        ),
        ("Authorization".to_string(), format!("Basic {basic}")),
    ];
    let (status, _, body) = send(
        Method::POST,
        &key.0,
        &headers,
        b"grant_type=client_credentials".to_vec(),
        inner.plain_client.clone(),
    )
    .await?;
    if status != 200 {
        return Err(format!("token endpoint {} answered {status}", key.0));
    }
    let token = body_value(&body)["access_token"]
        .as_str()
        .ok_or_else(|| format!("token endpoint {} sent no access_token", key.0))?
        .to_string();
    cache.insert(key.clone(), token.clone());
    Ok(token)
}

// ---------------------------------------------------------------------------------------
// HTTP client and small helpers

/// One request on a fresh HTTP/1.1 connection (TLS for https URLs); 10 s at most.
async fn send(
    method: Method,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(u16, Vec<(String, String)>, Bytes), String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let mut request = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header("Host", authority);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let host_name = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tcp = tokio::net::TcpStream::connect((host_name.as_str(), port))
            .await
            .map_err(|e| format!("connect {url}: {e}"))?;
        if https {
            let name = ServerName::try_from(host_name).map_err(|e| e.to_string())?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS to {url}: {e}"))?;
            exchange(TokioIo::new(stream), request).await
        } else {
            exchange(TokioIo::new(tcp), request).await
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("{url}: timed out"))?
}

async fn exchange<T>(
    io: T,
    request: Request<Full<Bytes>>,
) -> Result<(u16, Vec<(String, String)>, Bytes), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, body))
}

fn body_value(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// RFC 3339 UTC time (the SOL005 DateTime).
fn timestamp() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn decode_form(text: &str) -> String {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn form_params(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode_form(k), decode_form(v))
        })
        .collect()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    form_params(query)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn chain(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("certificate file")
        .map(|c| c.expect("certificate"))
        .collect()
}

/// The NFVO's root, its server certificate and its notification client certificate.
fn make_pki(dir: &Path) {
    sh(
        dir,
        r#"set -e
ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
openssl req -x509 $ec -keyout nfvo-root.key -out nfvo-root.pem -days 30 \
  -subj "/CN=NFVO test root" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req $ec -keyout nfvo-server.key -out nfvo-server.csr -subj "/CN=nfvo" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' > nfvo-server.ext
openssl x509 -req -in nfvo-server.csr -CA nfvo-root.pem -CAkey nfvo-root.key -CAcreateserial \
  -days 30 -extfile nfvo-server.ext -out nfvo-server.pem 2>/dev/null
openssl req $ec -keyout nfvo-notifier.key -out nfvo-notifier.csr -subj "/CN=nfvo-notifier" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:nfvo-notifier\n' > nfvo-notifier.ext
openssl x509 -req -in nfvo-notifier.csr -CA nfvo-root.pem -CAkey nfvo-root.key -CAcreateserial \
  -days 30 -extfile nfvo-notifier.ext -out nfvo-notifier.pem 2>/dev/null
"#,
    );
}
