//! The CMF's HTTP edges against hostile or broken input (issue 10 §4, issue 9 §4): a corrupt
//! stored record is a permanent 500, not a 503 to retry for ever; the SOL 013 `Version`
//! header; per-role client trust; security events in logs, counters and the audit chain.
//! The CA key is in a real SoftHSM token; clients are real TLS clients (ours, or curl).

mod common;

use common::cmf::CmfAgent;
use serde_json::json;

const REGISTRATIONS: &str = "/certmgmt/v1/registrations";

fn register_body(subjects: &[&str]) -> serde_json::Value {
    json!({
        "certType": "VNFCI_CERT",
        "subjectIds": subjects,
        "typeOfVnfcCertHandling": "DELEGATION_MODE",
    })
}

/// A record that no longer decodes (written with the store API as a value of another shape)
/// is a permanent fault: 500 with a ProblemDetails that says so, never 503 + Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_record_is_500_not_503() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let mut vnfm = agent
        .client(Some("vnfm-a"))
        .connect()
        .await
        .expect("connect");
    let created = vnfm
        .post_json(REGISTRATIONS, &register_body(&["corrupt-1.vnf.example"]))
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.problem_detail());
    let id = created.json().unwrap()["id"].as_str().unwrap().to_string();
    drop(vnfm);
    agent.stop();

    // Garbage where a registration was: valid JSON of the wrong shape, as a bug or a bad
    // restore would leave it.
    {
        const RAW: nfv_warden::store::Table<serde_json::Value> =
            nfv_warden::store::Table::new("cmf_registrations");
        let store = nfv_warden::store::Store::open(&agent.store_path()).expect("store");
        store
            .write(|tx| tx.put(&RAW, &id, &json!({ "not": "a registration" })))
            .expect("write garbage");
    }

    agent.start();
    let mut vnfm = agent
        .client(Some("vnfm-a"))
        .connect()
        .await
        .expect("connect");
    let read = vnfm.get(&format!("{REGISTRATIONS}/{id}")).await.unwrap();
    assert_eq!(read.status, 500, "{}", read.problem_detail());
    assert!(read.headers.get("retry-after").is_none());
    assert_eq!(read.headers["content-type"], "application/problem+json");
    let detail = read.problem_detail();
    assert!(
        detail.contains("permanent") && detail.contains("cmf_registrations"),
        "{detail}"
    );
    // The agent still serves everything else.
    let other = vnfm
        .post_json(REGISTRATIONS, &register_body(&["corrupt-2.vnf.example"]))
        .await
        .unwrap();
    assert_eq!(other.status, 201, "{}", other.problem_detail());
}
