//! Behaviour of the durable store: transactions, audit chain, schema, group commit, and
//! acknowledged writes surviving a SIGKILL; creating and opening (a lost store is refused);
//! a full disk, in the library and under `warden serve`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::Duration;

use nfv_warden::keys::{rfc3339_now, BackendKind, KeyAlgorithm};
use nfv_warden::store::{
    AuditEvent, ErasureEntry, KeyPurpose, KeyRecord, Store, StoreError, Table, ERASURES, KEYS,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Note {
    body: String,
}

const NOTES: Table<Note> = Table::new("notes");

const AUDIT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

fn store_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("state").join("warden.redb")
}

fn note(body: &str) -> Note {
    Note {
        body: body.to_string(),
    }
}

fn ca_key() -> KeyRecord {
    KeyRecord {
        reference: "tpm:handle=0x81000100".parse().unwrap(),
        backend: BackendKind::Tpm,
        label: "issuing-ca".into(),
        algorithm: KeyAlgorithm::EcP384,
        purpose: KeyPurpose::Ca,
        created: rfc3339_now(),
        vnf_instance_id: None,
    }
}

fn write_note(store: &Store, key: &str) {
    let key = key.to_string();
    store
        .write(|tx| {
            tx.put(&NOTES, &key, &note(&key))?;
            tx.audit(AuditEvent::new("test", "note.put", key.as_str()));
            Ok(())
        })
        .unwrap();
}

/// Our own failure type, carried through `StoreError::Rejected`.
#[derive(Debug, thiserror::Error)]
#[error("refused by the test")]
struct Refused;

#[test]
fn write_survives_reopen_and_a_failed_closure_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    let key = ca_key();
    let erasure = ErasureEntry {
        object: "tpm:handle=0x81000200".into(),
        kind: "persistent key".into(),
        device: "swtpm".into(),
        erased_at: rfc3339_now(),
        verified: true,
        vnf_instance_id: Some("vnf-1".into()),
    };
    {
        let store = Store::open(&path).unwrap();
        let reference = key.reference.to_string();
        let (k, e) = (key.clone(), erasure.clone());
        store
            .write(move |tx| {
                tx.put(&KEYS, &reference, &k)?;
                tx.put(&ERASURES, "erasure-1", &e)?;
                tx.audit(AuditEvent::new(
                    "warden",
                    "key.generate",
                    reference.as_str(),
                ));
                Ok(())
            })
            .unwrap();
    }

    let store = Store::open(&path).unwrap();
    let reference = key.reference.to_string();
    let (read_key, read_erasure, keys) = store
        .read(|tx| {
            Ok((
                tx.get(&KEYS, &reference)?,
                tx.get(&ERASURES, "erasure-1")?,
                tx.count(&KEYS)?,
            ))
        })
        .unwrap();
    assert_eq!(read_key, Some(key.clone()));
    assert_eq!(read_erasure, Some(erasure));
    assert_eq!(keys, 1);
    assert_eq!(store.verify_audit_chain().unwrap(), 1);

    // A closure that writes, audits, then fails: none of it lands.
    let result = store.write(|tx| {
        tx.put(&NOTES, "doomed", &note("doomed"))?;
        tx.delete(&KEYS, &reference)?;
        tx.audit(AuditEvent::new("test", "note.put", "doomed"));
        Err::<(), _>(StoreError::Rejected(Box::new(Refused)))
    });
    match result {
        Err(StoreError::Rejected(source)) => assert!(source.downcast_ref::<Refused>().is_some()),
        other => panic!("expected the closure's own error, got {other:?}"),
    }
    let (doomed, still_there) = store
        .read(|tx| Ok((tx.get(&NOTES, "doomed")?, tx.get(&KEYS, &reference)?)))
        .unwrap();
    assert_eq!(doomed, None);
    assert_eq!(still_there, Some(key));
    assert_eq!(store.audit_entries(1, 100).unwrap().len(), 1);
    assert_eq!(store.verify_audit_chain().unwrap(), 1);

    // A closure sees its own staged writes.
    store
        .write(|tx| {
            tx.put(&NOTES, "seen", &note("v1"))?;
            assert_eq!(tx.get(&NOTES, "seen")?, Some(note("v1")));
            assert!(tx.delete(&NOTES, "seen")?);
            assert!(!tx.contains(&NOTES, "seen")?);
            Ok(())
        })
        .unwrap();
}

#[test]
fn list_scans_a_prefix_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&store_path(&dir)).unwrap();
    for key in ["vnf-2/b", "vnf-1/b", "vnf-1/a", "vnf-10/a", "other"] {
        write_note(&store, key);
    }
    let (vnf1, all, empty) = store
        .read(|tx| {
            Ok((
                tx.list(&NOTES, "vnf-1/")?,
                tx.list(&NOTES, "")?,
                tx.list(&KEYS, "")?,
            ))
        })
        .unwrap();
    let keys: Vec<&str> = vnf1.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["vnf-1/a", "vnf-1/b"]);
    assert_eq!(vnf1[0].1, note("vnf-1/a"));
    assert_eq!(all.len(), 5);
    assert!(empty.is_empty(), "a table never written reads as empty");
}

#[test]
fn insert_new_on_an_existing_key_conflicts_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&store_path(&dir)).unwrap();
    store
        .write(|tx| {
            tx.insert_new(&NOTES, "serial-01", &note("first"))?;
            tx.audit(AuditEvent::new("test", "cert.issue", "serial-01"));
            Ok(())
        })
        .unwrap();

    let result = store.write(|tx| {
        tx.put(&NOTES, "other", &note("side effect"))?;
        tx.audit(AuditEvent::new("test", "cert.issue", "serial-01"));
        tx.insert_new(&NOTES, "serial-01", &note("second"))
    });
    assert!(
        matches!(&result, Err(StoreError::Conflict { table: "notes", key }) if key == "serial-01"),
        "{result:?}"
    );
    let (serial, other) = store
        .read(|tx| Ok((tx.get(&NOTES, "serial-01")?, tx.get(&NOTES, "other")?)))
        .unwrap();
    assert_eq!(serial, Some(note("first")));
    assert_eq!(other, None);
    assert_eq!(store.verify_audit_chain().unwrap(), 1);

    // A key staged earlier in the same closure conflicts too.
    let result = store.write(|tx| {
        tx.insert_new(&NOTES, "serial-02", &note("a"))?;
        tx.insert_new(&NOTES, "serial-02", &note("b"))
    });
    assert!(matches!(result, Err(StoreError::Conflict { .. })));
    assert_eq!(store.read(|tx| tx.get(&NOTES, "serial-02")).unwrap(), None);
}

#[test]
fn audit_chain_verifies_and_detects_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    {
        let store = Store::open(&path).unwrap();
        for i in 0..50 {
            store
                .write(|tx| {
                    let key = format!("note-{i}");
                    tx.put(&NOTES, &key, &note("x"))?;
                    // Two entries in one transaction: both chained in order.
                    tx.audit(AuditEvent::new("test", "note.put", key.as_str()));
                    tx.audit(
                        AuditEvent::new("test", "note.check", key.as_str())
                            .with_detail(serde_json::json!({"i": i, "tags": ["a", "b"]})),
                    );
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(store.verify_audit_chain().unwrap(), 100);
        let entries = store.audit_entries(10, 3).unwrap();
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [10, 11, 12]);
        assert_eq!(entries[1].prev_hash, entries[0].hash);
        assert_eq!(entries[0].time.len(), "2025-01-01T00:00:00.000Z".len());
    }

    let original = raw_audit_value(&path, 37);

    // An edit that keeps the JSON valid: the entry's hash no longer matches.
    let mut edited: serde_json::Value = serde_json::from_slice(&original).unwrap();
    edited["subject"] = "note-forged".into();
    put_raw_audit_value(&path, 37, &serde_json::to_vec(&edited).unwrap());
    assert_chain_broken_at(&path, 37);

    // One flipped byte anywhere in the value.
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    put_raw_audit_value(&path, 37, &flipped);
    assert_chain_broken_at(&path, 37);

    // Restored: verifies again.
    put_raw_audit_value(&path, 37, &original);
    assert_eq!(
        Store::open(&path).unwrap().verify_audit_chain().unwrap(),
        100
    );

    // Dropping the newest entry is caught by the recorded head.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(AUDIT).unwrap().remove(100).unwrap();
        txn.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert!(matches!(
        store.verify_audit_chain(),
        Err(StoreError::AuditChainBroken { .. })
    ));
}

fn raw_audit_value(path: &Path, seq: u64) -> Vec<u8> {
    use redb::ReadableDatabase;
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(AUDIT).unwrap();
    let value = table.get(seq).unwrap().unwrap().value().to_vec();
    value
}

fn put_raw_audit_value(path: &Path, seq: u64, bytes: &[u8]) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(AUDIT).unwrap().insert(seq, bytes).unwrap();
    txn.commit().unwrap();
}

fn assert_chain_broken_at(path: &Path, expected: u64) {
    let store = Store::open(path).unwrap();
    match store.verify_audit_chain() {
        Err(StoreError::AuditChainBroken { seq, .. }) => assert_eq!(seq, expected),
        other => panic!("tampering not detected: {other:?}"),
    }
}

#[test]
fn a_newer_schema_is_refused_and_an_unknown_older_one_is_not_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    {
        let store = Store::open(&path).unwrap();
        write_note(&store, "kept");
    }
    set_schema_version(&path, nfv_warden::store::SCHEMA_VERSION + 1);
    match Store::open(&path) {
        Err(StoreError::SchemaTooNew { found, supported }) => {
            assert_eq!(found, nfv_warden::store::SCHEMA_VERSION + 1);
            assert_eq!(supported, nfv_warden::store::SCHEMA_VERSION);
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }

    // Version 0 never existed, so there is no migration from it: refused, nothing changed.
    set_schema_version(&path, 0);
    assert!(matches!(
        Store::open(&path),
        Err(StoreError::MigrationMissing { from: 0 })
    ));

    set_schema_version(&path, nfv_warden::store::SCHEMA_VERSION);
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.read(|tx| tx.get(&NOTES, "kept")).unwrap(),
        Some(note("kept"))
    );
}

fn set_schema_version(path: &Path, version: u64) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert("schema_version", version)
        .unwrap();
    txn.commit().unwrap();
}

/// Holds the committer inside a batch until released, so the test decides what the next
/// batch holds instead of the scheduler.
fn hold_committer(
    group: &nfv_warden::store::GroupCommit,
) -> (mpsc::Sender<()>, thread::JoinHandle<()>) {
    let (release, released) = mpsc::channel::<()>();
    let (entered, inside) = mpsc::channel::<()>();
    let gate = group.clone();
    let handle = thread::spawn(move || {
        gate.write(move |_tx| {
            entered.send(()).unwrap();
            released.recv().unwrap();
            Ok(())
        })
        .unwrap();
    });
    inside.recv().unwrap();
    (release, handle)
}

fn wait_until_queued(group: &nfv_warden::store::GroupCommit, n: usize) {
    while group.queued() < n {
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn group_commit_batches_many_threads_and_isolates_a_failing_closure() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&store_path(&dir)).unwrap());
    let group = store.group_commit(64).unwrap();
    let commits_before = store.commit_count();

    // The committer is held until every writer thread has queued its first write, so at
    // least one batch holds several writes whatever the scheduler does.
    let (release, gate) = hold_committer(&group);
    const THREADS: usize = 8;
    const WRITES: usize = 200;
    let start = Arc::new(Barrier::new(THREADS));
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let group = group.clone();
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                let mut failed = Vec::new();
                for i in 0..WRITES {
                    let key = format!("t{t}-{i:03}");
                    let fail = t == 3 && i == 100;
                    let result = group.write({
                        let key = key.clone();
                        move |tx| {
                            tx.put(&NOTES, &key, &note(&key))?;
                            tx.audit(AuditEvent::new("test", "note.put", key.as_str()));
                            if fail {
                                return Err(StoreError::Rejected(Box::new(Refused)));
                            }
                            Ok(key.len())
                        }
                    });
                    match result {
                        Ok(len) => assert_eq!(len, key.len()),
                        Err(StoreError::Rejected(_)) if fail => failed.push(key),
                        Err(err) => panic!("{key}: {err:?}"),
                    }
                }
                failed
            })
        })
        .collect();
    wait_until_queued(&group, THREADS);
    release.send(()).unwrap();
    gate.join().unwrap();
    let failed: Vec<String> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert_eq!(failed, ["t3-100"]);

    let writes = (THREADS * WRITES + 1) as u64; // + the gate
    let commits = store.commit_count() - commits_before;
    assert!(commits < writes, "{commits} commits for {writes} writes");

    let (count, failed_key) = store
        .read(|tx| Ok((tx.count(&NOTES)?, tx.get(&NOTES, "t3-100")?)))
        .unwrap();
    assert_eq!(count, (THREADS * WRITES - 1) as u64);
    assert_eq!(failed_key, None);
    for t in 0..THREADS {
        let listed = store.read(|tx| tx.list(&NOTES, &format!("t{t}-"))).unwrap();
        let expected = if t == 3 { WRITES - 1 } else { WRITES };
        assert_eq!(listed.len(), expected, "thread {t}");
    }
    let audited = store.verify_audit_chain().unwrap();
    assert_eq!(audited, (THREADS * WRITES - 1) as u64);
    let entries = store.audit_entries(1, usize::MAX).unwrap();
    assert!(entries.iter().all(|e| e.subject != "t3-100"));
}

#[test]
fn one_batch_commits_the_good_closures_and_drops_the_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&store_path(&dir)).unwrap());
    let group = store.group_commit(16).unwrap();
    write_note(&store, "taken");
    let commits_before = store.commit_count();

    let (release, gate) = hold_committer(&group);
    // Queued in this order, all while the committer is held: one batch.
    let mut callers = Vec::new();
    let specs: [(&str, &str); 5] = [
        ("a", "ok"),
        ("b", "reject"),
        ("c", "panic"),
        ("taken", "conflict"),
        ("d", "ok"),
    ];
    for (n, (key, behaviour)) in specs.into_iter().enumerate() {
        let group2 = group.clone();
        callers.push(thread::spawn(move || {
            group2.write(move |tx| {
                tx.put(&NOTES, &format!("{key}-side"), &note("side"))?;
                tx.audit(AuditEvent::new("test", "note.put", key));
                match behaviour {
                    "reject" => Err(StoreError::Rejected(Box::new(Refused))),
                    "panic" => panic!("closure bug"),
                    "conflict" => tx.insert_new(&NOTES, key, &note(key)),
                    _ => tx.insert_new(&NOTES, key, &note(key)),
                }
            })
        }));
        wait_until_queued(&group, n + 1);
    }
    release.send(()).unwrap();
    gate.join().unwrap();
    let results: Vec<_> = callers.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(StoreError::Rejected(_))));
    assert!(matches!(results[2], Err(StoreError::ClosurePanicked)));
    assert!(matches!(results[3], Err(StoreError::Conflict { .. })));
    assert!(results[4].is_ok());
    // The gate's batch and the batch of five: two commits.
    assert_eq!(store.commit_count() - commits_before, 2);

    let present = |key: &str| {
        let key = key.to_string();
        store.read(move |tx| tx.contains(&NOTES, &key)).unwrap()
    };
    for key in ["a", "a-side", "d", "d-side", "taken"] {
        assert!(present(key), "{key} missing");
    }
    for key in ["b", "b-side", "c", "c-side", "taken-side"] {
        assert!(!present(key), "{key} landed");
    }
    let subjects: Vec<String> = store
        .audit_entries(1, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.subject)
        .collect();
    assert_eq!(subjects, ["taken", "a", "d"]);
    assert_eq!(store.verify_audit_chain().unwrap(), 3);
}

/// The closures of one batch run against one transaction whose writes are applied at its
/// end: each closure still reads what the accepted closures before it wrote and deleted
/// (gets, uniqueness, prefix listings), and nothing of a refused one.
#[test]
fn later_closures_of_a_batch_read_the_earlier_ones_writes_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&store_path(&dir)).unwrap());
    let group = store.group_commit(16).unwrap();
    write_note(&store, "p/old");
    let commits_before = store.commit_count();

    let (release, gate) = hold_committer(&group);
    type Check = Box<
        dyn FnOnce(&mut nfv_warden::store::WriteTx<'_>) -> Result<Vec<String>, StoreError> + Send,
    >;
    let steps: Vec<Check> = vec![
        // 1. writes p/new, deletes p/old.
        Box::new(|tx| {
            tx.insert_new(&NOTES, "p/new", &note("new"))?;
            assert!(tx.delete(&NOTES, "p/old")?);
            tx.audit(AuditEvent::new("test", "note.put", "p/new"));
            Ok(Vec::new())
        }),
        // 2. refused after writing p/refused: none of it is seen later.
        Box::new(|tx| {
            tx.put(&NOTES, "p/refused", &note("refused"))?;
            Err(StoreError::Rejected(Box::new(Refused)))
        }),
        // 3. sees 1's write and delete, not 2's.
        Box::new(|tx| {
            assert!(matches!(
                tx.insert_new(&NOTES, "p/new", &note("again")),
                Err(StoreError::Conflict { .. })
            ));
            assert_eq!(tx.get(&NOTES, "p/new")?.map(|n| n.body), Some("new".into()));
            assert!(!tx.contains(&NOTES, "p/old")?);
            assert!(!tx.contains(&NOTES, "p/refused")?);
            tx.put(&NOTES, "p/third", &note("third"))?;
            tx.keys_with_prefix(&NOTES, "p/")
        }),
    ];
    let mut callers = Vec::new();
    for (n, step) in steps.into_iter().enumerate() {
        let group2 = group.clone();
        callers.push(thread::spawn(move || group2.write(step)));
        wait_until_queued(&group, n + 1);
    }
    release.send(()).unwrap();
    gate.join().unwrap();
    let results: Vec<_> = callers.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(matches!(results[1], Err(StoreError::Rejected(_))));
    assert_eq!(
        results[2].as_ref().expect("third closure"),
        &["p/new".to_string(), "p/third".to_string()]
    );
    assert_eq!(
        store.commit_count() - commits_before,
        2,
        "one batch after the gate's"
    );
    let keys: Vec<String> = store
        .read(|tx| tx.list(&NOTES, "p/"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["p/new", "p/third"]);
    assert_eq!(store.verify_audit_chain().unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_serves_async_callers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&store_path(&dir)).unwrap());
    let group = store.group_commit(32).unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let group = group.clone();
            tokio::spawn(async move {
                group
                    .write_async(move |tx| {
                        let key = format!("async-{i:02}");
                        tx.put(&NOTES, &key, &note(&key))?;
                        tx.audit(AuditEvent::new("test", "note.put", key.as_str()));
                        Ok(i)
                    })
                    .await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), i);
    }
    assert_eq!(store.read(|tx| tx.count(&NOTES)).unwrap(), 64);
    assert_eq!(store.verify_audit_chain().unwrap(), 64);
}

#[test]
fn dropping_the_last_group_handle_releases_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    let store = Arc::new(Store::open(&path).unwrap());
    let group = store.group_commit(8).unwrap();
    group.write(|tx| tx.put(&NOTES, "x", &note("x"))).unwrap();
    drop(group);
    drop(store);
    let reopened = Store::open(&path).unwrap();
    assert!(reopened.read(|tx| tx.contains(&NOTES, "x")).unwrap());
}

const CRASH_ENV: &str = "NFV_WARDEN_TEST_CRASH_STORE";
const CRASH_ACKS: usize = 300;

/// The parent runs this very test binary again, running only `crash_child`, kills it with
/// SIGKILL once it has acknowledged `CRASH_ACKS` writes, and checks that every write the
/// child acknowledged is in the store.
#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--ignored"])
        .env(CRASH_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut acknowledged = Vec::new();
    let mut killed = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(key) = line.strip_prefix("committed ") {
            acknowledged.push(key.to_string());
        }
        if !killed && acknowledged.len() >= CRASH_ACKS {
            child.kill().unwrap(); // SIGKILL on Unix
            killed = true;
        }
        // Lines already in the pipe were acknowledged before the kill: keep reading to EOF.
    }
    let status = child.wait().unwrap();
    assert!(
        killed,
        "child ended after {} acknowledgements: {status}",
        acknowledged.len()
    );
    assert!(!status.success());
    assert!(acknowledged.iter().any(|k| k.starts_with("plain-")));
    assert!(acknowledged.iter().any(|k| k.starts_with("group-")));

    let store = Store::open(&path).unwrap();
    let missing: Vec<&String> = store
        .read(|tx| {
            let mut missing = Vec::new();
            for key in &acknowledged {
                if !tx.contains(&NOTES, key)? {
                    missing.push(key);
                }
            }
            Ok(missing)
        })
        .unwrap();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    let audited = store.verify_audit_chain().unwrap();
    assert!(audited >= acknowledged.len() as u64);
    // The store stays writable after the crash.
    write_note(&store, "after-crash");
}

#[test]
#[ignore = "child process of acknowledged_writes_survive_sigkill"]
fn crash_child() {
    let Some(path) = std::env::var_os(CRASH_ENV) else {
        return;
    };
    let store = Arc::new(Store::open(Path::new(&path)).unwrap());
    let group = store.group_commit(32).unwrap();
    // Bounded so a child whose parent vanished ends by itself.
    const LIMIT: usize = 100_000;
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let group = group.clone();
            thread::spawn(move || {
                for i in 0..LIMIT {
                    let key = format!("group-{t}-{i}");
                    let k = key.clone();
                    group
                        .write(move |tx| {
                            tx.put(&NOTES, &k, &note(&k))?;
                            tx.audit(AuditEvent::new("child", "note.put", k.as_str()));
                            Ok(())
                        })
                        .unwrap();
                    println!("committed {key}");
                }
            })
        })
        .collect();
    for i in 0..LIMIT {
        let key = format!("plain-{i}");
        write_note(&store, &key);
        println!("committed {key}");
    }
    for writer in writers {
        writer.join().unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Creating and opening: a lost store is refused, never silently replaced by an empty one.

#[test]
fn open_existing_refuses_a_missing_store_and_create_refuses_an_existing_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    let err = Store::open_existing(&path).unwrap_err();
    assert!(matches!(err, StoreError::Missing { .. }), "{err:?}");
    assert!(chain(&err).contains("warden store init"), "{}", chain(&err));
    assert!(!path.exists(), "open_existing must not create the file");

    let store = Store::create(&path).unwrap();
    write_note(&store, "first");
    drop(store);
    let err = Store::create(&path).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    let store = Store::open_existing(&path).unwrap();
    assert_eq!(
        store.read(|tx| tx.get(&NOTES, "first")).unwrap(),
        Some(note("first")),
        "a refused create left the store as it was"
    );
}

#[test]
fn open_existing_refuses_an_empty_a_garbage_and_a_foreign_file() {
    let dir = tempfile::tempdir().unwrap();

    let empty = dir.path().join("empty.redb");
    std::fs::write(&empty, b"").unwrap();
    let err = Store::open_existing(&empty).unwrap_err();
    assert!(matches!(err, StoreError::Empty { .. }), "{err:?}");
    assert_eq!(
        std::fs::metadata(&empty).unwrap().len(),
        0,
        "left untouched"
    );

    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0x5a; 64 * 1024]).unwrap();
    let err = Store::open_existing(&garbage).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert!(
        chain(&err).contains("Not a redb database"),
        "the cause is named: {}",
        chain(&err)
    );

    // A truncated store: the integrity check on open reports it instead of trusting it.
    let whole = dir.path().join("whole.redb");
    {
        let store = Store::create(&whole).unwrap();
        write_note(&store, "x");
    }
    let truncated = dir.path().join("truncated.redb");
    let bytes = std::fs::read(&whole).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len().min(3000)]).unwrap();
    let err = Store::open_existing(&truncated).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert!(chain(&err).contains("truncated"), "{}", chain(&err));

    // A redb database that is not a store (no schema version).
    let foreign = dir.path().join("foreign.redb");
    {
        let db = redb::Database::create(&foreign).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(AUDIT)
            .unwrap()
            .insert(1, b"{}".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open_existing(&foreign).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err:?}");

    let directory = dir.path().join("a-directory");
    std::fs::create_dir(&directory).unwrap();
    let err = Store::open_existing(&directory).unwrap_err();
    assert!(matches!(err, StoreError::NotAFile { .. }), "{err:?}");
}

#[test]
fn a_store_held_open_elsewhere_names_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    let _held = Store::create(&path).unwrap();
    let err = Store::open_existing(&path).unwrap_err();
    let line = chain(&err);
    assert!(
        matches!(
            err,
            StoreError::Open {
                source: redb::DatabaseError::DatabaseAlreadyOpen,
                ..
            }
        ),
        "{line}"
    );
    assert!(line.contains("already open"), "{line}");
}

// ---------------------------------------------------------------------------------------
// A full disk: commits fail naming ENOSPC, and the store heals by itself once space is
// freed, without reopening the `Store`, with every acknowledged write kept.

fn chain(err: &StoreError) -> String {
    nfv_warden::error::chain(err)
}

/// A tmpfs of `size` mounted on a temporary directory; unmounted on drop.
struct Tmpfs {
    dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// `None` (with the reason printed) only when not running as root: CI runs as root and
    /// must run the test, so a failing mount as root is a test failure.
    fn mount(size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs this test as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs as root failed: {status}");
        Some(Tmpfs { dir: Some(dir) })
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// Writes `filler` until the file system refuses with ENOSPC.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xa5u8; 16 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Whatever the last partial write left: the file system has no page left.
        let _ = file.write(&[0u8; 1]);
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        // Lazy: a child process that still holds a file must not leave the mount behind.
        let status = Command::new("umount").arg("-l").arg(dir.path()).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("umount {} failed: {status:?}", dir.path().display());
        }
        drop(dir);
    }
}

/// A write with a value large enough that a full tmpfs runs out quickly.
fn big_note(key: &str) -> Note {
    note(&format!("{key}:{}", "n".repeat(8 * 1024)))
}

/// Writes until one fails; returns the acknowledged keys and the error. Fails the test if
/// no write fails within `bound` (the disk is full, so one must).
fn write_until_refused(
    write: &dyn Fn(&str) -> Result<(), StoreError>,
    prefix: &str,
    bound: usize,
) -> (Vec<String>, StoreError) {
    let mut acked = Vec::new();
    for i in 0..bound {
        let key = format!("{prefix}-{i:05}");
        match write(&key) {
            Ok(()) => acked.push(key),
            Err(err) => return (acked, err),
        }
    }
    panic!("{bound} writes of 8 KiB succeeded on a full 2 MiB tmpfs");
}

fn assert_names_enospc(err: &StoreError) {
    let line = chain(err);
    assert!(
        line.contains("No space left on device"),
        "the error names ENOSPC: {line}"
    );
    assert_eq!(
        err.os_error().and_then(std::io::Error::raw_os_error),
        Some(libc::ENOSPC),
        "{line}"
    );
}

fn assert_all_present(store: &Store, acked: &[String]) {
    let missing: Vec<&String> = store
        .read(|tx| {
            let mut missing = Vec::new();
            for key in acked {
                if tx.get(&NOTES, key)? != Some(big_note(key)) {
                    missing.push(key);
                }
            }
            Ok(missing)
        })
        .unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}

#[test]
fn group_commit_names_enospc_and_recovers_once_space_is_freed() {
    let Some(tmpfs) = Tmpfs::mount("2m") else {
        return;
    };
    let path = tmpfs.path().join("warden.redb");
    let store = Arc::new(Store::create(&path).unwrap());
    let group = store.group_commit(16).unwrap();
    let write = |key: &str| {
        let key = key.to_string();
        group.write(move |tx| {
            tx.put(&NOTES, &key, &big_note(&key))?;
            tx.audit(AuditEvent::new("test", "note.put", key.as_str()));
            Ok(())
        })
    };
    // Some room first, so there is acknowledged history to keep.
    let mut acked = Vec::new();
    for i in 0..8 {
        let key = format!("before-{i}");
        write(&key).unwrap();
        acked.push(key);
    }
    let filler = tmpfs.fill();
    let (more, err) = write_until_refused(&write, "full", 2_000);
    acked.extend(more);
    assert!(
        matches!(err, StoreError::GroupCommit(_)),
        "{err:?}: {}",
        chain(&err)
    );
    assert_names_enospc(&err);
    assert!(
        chain(&err).starts_with("group commit failed: "),
        "{}",
        chain(&err)
    );
    // Still full: refused again, and again with the cause (no stale "previous I/O error").
    let err = write("while-full").expect_err("the disk is still full");
    assert_names_enospc(&err);
    assert!(
        !store.accepting_commits(),
        "readiness sees the refused commits"
    );

    std::fs::remove_file(&filler).unwrap();
    // The same `Store` and the same committer: the next batch reopens and commits.
    write("after").expect("a write once space is freed");
    acked.push("after".into());
    assert!(
        store.reopen_count() >= 1,
        "the database was reopened inside the store"
    );
    assert!(store.accepting_commits());
    assert_all_present(&store, &acked);
    // The chain verifies and holds an entry per acknowledged write (a refused commit's
    // outcome is unknown, so it may hold more, never fewer).
    let entries = store.verify_audit_chain().unwrap();
    assert!(entries >= acked.len() as u64, "{entries} < {}", acked.len());
    drop(group);
    drop(store);
    // And on disk: a fresh open finds them.
    let reopened = Store::open_existing(&path).unwrap();
    assert_all_present(&reopened, &acked);
}

#[test]
fn plain_writes_name_enospc_and_recover_once_space_is_freed() {
    let Some(tmpfs) = Tmpfs::mount("2m") else {
        return;
    };
    let path = tmpfs.path().join("warden.redb");
    let store = Store::create(&path).unwrap();
    let write = |key: &str| {
        let key = key.to_string();
        store.write(|tx| tx.put(&NOTES, &key, &big_note(&key)))
    };
    write("before").unwrap();
    let filler = tmpfs.fill();
    let (mut acked, err) = write_until_refused(&write, "full", 2_000);
    acked.insert(0, "before".into());
    assert_names_enospc(&err);
    // Reads are not stopped for good by the failed commit either.
    let _ = store.read(|tx| tx.count(&NOTES));
    std::fs::remove_file(&filler).unwrap();
    write("after").expect("a write once space is freed");
    acked.push("after".into());
    assert_all_present(&store, &acked);
}

// ---------------------------------------------------------------------------------------
// The same through the `warden` binary.

use common::agent::Agent;
use common::cmf::{openssl_csr, CmfAgent};

#[test]
fn commands_refuse_a_missing_or_empty_store_and_store_init_never_overwrites() {
    let agent = Agent::new("");
    let path = agent.dir().join("warden.redb");
    assert!(path.exists(), "Agent::new ran `warden store init`");
    let err = agent.fails(&["store", "init"]);
    assert!(err.contains("already exists"), "{err}");

    std::fs::remove_file(&path).unwrap();
    let generate = [
        "keys",
        "generate",
        "--backend",
        "pkcs11",
        "--label",
        "k",
        "--purpose",
        "tls",
    ];
    for args in [&["serve"][..], &["ca", "init"], &generate] {
        let err = agent.fails(args);
        assert!(
            err.contains("does not exist") && err.contains("warden store init"),
            "warden {args:?}: {err}"
        );
        assert!(!path.exists(), "warden {args:?} must not create the store");
    }
    let out = agent.run(&["check"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL the store") && stdout.contains("does not exist"),
        "{stdout}"
    );
    assert!(!stdout.contains("entries verified"), "{stdout}");

    std::fs::write(&path, b"").unwrap();
    let err = agent.fails(&["serve"]);
    assert!(err.contains("is empty (0 bytes)"), "{err}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left as it was");

    std::fs::write(&path, vec![0x42; 8192]).unwrap();
    let err = agent.fails(&["ca", "init"]);
    assert!(err.contains("Not a redb database"), "{err}");

    std::fs::remove_file(&path).unwrap();
    let out = agent.ok(&["store", "init"]);
    assert!(out.contains("created"), "{out}");
    // The new store checks out (the CA key does not exist yet, so `check` still fails).
    let out = String::from_utf8_lossy(&agent.run(&["check"]).stdout).into_owned();
    assert!(out.contains("audit chain of 1 entries verified"), "{out}");
}

#[test]
fn a_store_held_by_another_process_is_named_on_the_cli() {
    let agent = Agent::new("");
    let _held = Store::open_existing(&agent.dir().join("warden.redb")).unwrap();
    let err = agent.fails(&["ca", "init"]);
    assert!(
        err.contains("cannot open the store") && err.contains("Database already open"),
        "{err}"
    );
}

/// `warden serve` with its store on a tmpfs that fills up: CSRs get 503 naming ENOSPC, and
/// 201 again once space is freed, with no restart; every certificate acknowledged is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_503_naming_enospc_and_issues_again_once_space_is_freed() {
    let Some(tmpfs) = Tmpfs::mount("4m") else {
        return;
    };
    let mut agent = CmfAgent::new("");
    // Put the initialized store on the tmpfs, behind the configured path.
    let configured = agent.store_path();
    let on_tmpfs = tmpfs.path().join("warden.redb");
    std::fs::copy(&configured, &on_tmpfs).unwrap();
    std::fs::remove_file(&configured).unwrap();
    std::os::unix::fs::symlink(&on_tmpfs, &configured).unwrap();
    agent.start();

    let client = agent.client(Some("vnfm-a"));
    let mut conn = client.connect().await.unwrap();
    let created = conn
        .post_json(
            "/certmgmt/v1/registrations",
            &serde_json::json!({
                "certType": "VNFCI_CERT",
                "subjectIds": ["vnfc-f"],
                "typeOfVnfcCertHandling": "DELEGATION_MODE",
            }),
        )
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.problem_detail());
    let csr = openssl_csr(agent.dir(), "f", "/CN=vnfc-f", &[]);
    let body = serde_json::json!({
        "vnfcId": "vnfc-f", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr,
    });
    const CSRS: &str = "/certmgmt/v1/certificate_signing_requests";
    let mut serials = Vec::new();
    let mut issue = |status: u16, json: Option<serde_json::Value>| {
        if status == 201 {
            let serial = json.unwrap()["serialNumber"].as_str().unwrap().to_string();
            serials.push(serial);
        }
    };
    for _ in 0..3 {
        let issued = conn.post_json(CSRS, &body).await.unwrap();
        assert_eq!(issued.status, 201, "{}", issued.problem_detail());
        issue(201, issued.json().ok());
    }

    let filler = tmpfs.fill();
    // Each refused commit is answered 503; a few may still fit in pages redb already holds.
    let mut refused = None;
    for _ in 0..2_000 {
        let answer = match conn.post_json(CSRS, &body).await {
            Ok(answer) => answer,
            Err(_) => {
                conn = client.connect().await.unwrap();
                continue;
            }
        };
        match answer.status {
            201 => issue(201, answer.json().ok()),
            503 => {
                refused = Some(answer.problem_detail());
                break;
            }
            other => panic!("unexpected {other}: {}", answer.problem_detail()),
        }
    }
    let refused = refused.expect("a CSR refused while the disk is full");
    assert!(
        refused.contains("No space left on device"),
        "the 503 names the cause: {refused}"
    );

    std::fs::remove_file(&filler).unwrap();
    let issued = match conn.post_json(CSRS, &body).await {
        Ok(answer) => answer,
        Err(_) => {
            conn = client.connect().await.unwrap();
            conn.post_json(CSRS, &body).await.unwrap()
        }
    };
    assert_eq!(
        issued.status,
        201,
        "issuance resumes once space is freed, without a restart: {}",
        issued.problem_detail()
    );
    issue(201, issued.json().ok());
    drop(conn);
    agent.stop();

    let store = Store::open_existing(&on_tmpfs).unwrap();
    let stored = store
        .read(|tx| tx.list(&nfv_warden::cmf::CERTIFICATES, ""))
        .unwrap();
    for serial in &serials {
        assert!(
            stored
                .iter()
                .any(|(key, _)| key.ends_with(&format!("/{serial}"))),
            "acknowledged certificate {serial} is stored"
        );
    }
    store.verify_audit_chain().unwrap();
    drop(store);
    drop(agent);
    drop(tmpfs);
}
